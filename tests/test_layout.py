"""Rules of the layout in docs/architecture.md, checked on the source itself."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import kodalle_cli

ROOT = Path(kodalle_cli.__file__).resolve().parent
CLI_MODULES = {"kodalle_cli.cli", "kodalle_cli.cli_options", "kodalle_cli.__main__"}


def library_modules() -> list[str]:
    """Every module of kodalle_cli and the built-in backbones, except the CLI's own."""
    import backbones

    names = []
    for package in (kodalle_cli, backbones):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return sorted(n for n in names if n not in CLI_MODULES)


def _modules_loaded_by(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_library_never_imports_typer():
    modules = library_modules()
    # the walk finds the library (not an empty list that passes by itself)
    assert {"kodalle_cli.configs", "kodalle_cli.options", "kodalle_cli.serve",
            "kodalle_cli.data.prepare", "backbones.klue"} <= set(modules)
    loaded = _modules_loaded_by(modules)
    assert set(modules) <= loaded
    assert "typer" not in loaded
    assert not any(m.startswith(("typer.", "click")) for m in loaded)


def test_the_cli_does_import_typer():
    """The check above can fail: the CLI module, imported the same way, loads Typer."""
    assert "typer" in _modules_loaded_by(["kodalle_cli.cli"])


# ---- atomic writes and encodings -------------------------------------------------------------
REPO = ROOT.parent
SHIPPED = ("kodalle_cli", "backbones", "benchmarks", "scripts", "examples")


def _calls(files):
    import ast

    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield path, node


def _shipped_python():
    return sorted(p for d in SHIPPED for p in (REPO / d).rglob("*.py"))


def test_renames_only_in_atomic():
    """Every write that must not be seen half-done goes through kodalle_cli.atomic: no other
    file renames files into place itself."""
    import ast

    renames = {"os.replace", "os.rename", "os.renames", "shutil.move"}
    found = []
    files = _shipped_python()
    assert ROOT / "atomic.py" in files
    for path, node in _calls(files):
        name = ast.unparse(node.func)
        if name in renames or (isinstance(node.func, ast.Attribute)
                               and node.func.attr == "rename"):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    outside = [f for f in found if not f.startswith("kodalle_cli/atomic.py:")]
    assert outside == []
    assert found  # atomic.py's own renames are seen: the scan works


def test_text_files_name_their_encoding():
    """Every text file is opened with an explicit encoding (ruff's PLW1514 sees only calls
    on an expression it knows is a Path; this sees every read_text/write_text/open)."""
    import ast

    missing = []
    for path, node in _calls(_shipped_python()):
        keywords = {k.arg for k in node.keywords}
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if "encoding" in keywords:
            continue
        if name in ("read_text", "write_text"):
            missing.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
        elif name == "open" and (isinstance(func, ast.Name) or ast.unparse(func) == "io.open"):
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            if not (isinstance(mode, ast.Constant) and "b" in str(mode.value)):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno}: open")
    assert missing == []


def test_image_shards_are_read_only_in_data():
    """One reader of image shards (data/shards.py, token shards in data/tokens.py): no other
    library module opens a tar itself."""
    import ast

    found = []
    files = sorted((REPO / "kodalle_cli").rglob("*.py")) + sorted((REPO / "backbones").rglob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("tarfile", "webdataset") for n in names):
                found.append(str(path.relative_to(REPO)))
    assert "kodalle_cli/data/shards.py" in found  # the scan sees the reader itself
    assert [f for f in found if not f.startswith("kodalle_cli/data/")] == []


# ---- no import circles -----------------------------------------------------------------------
def _import_graph() -> dict[str, set[str]]:
    """kodalle_cli module -> the kodalle_cli modules it imports anywhere (top level, inside
    functions, under TYPE_CHECKING: a lazy import hides a circle, it does not remove it)."""
    import ast

    modules = {}
    for path in (REPO / "kodalle_cli").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path

    def known(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                deps |= {known(a.name) for a in node.names if a.name.startswith("kodalle_cli")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "kodalle_cli") and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in modules else known(node.module))
        graph[name] = deps - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    graph = _import_graph()
    assert "kodalle_cli.train.task" in graph["kodalle_cli.train.checkpoint"]
    assert "kodalle_cli.configs" in graph["kodalle_cli.score"]
    assert _circles(graph) == []
    # the search finds a circle when there is one
    [circle] = _circles({**graph, "kodalle_cli.configs": graph["kodalle_cli.configs"]
                         | {"kodalle_cli.score"}})
    assert {"kodalle_cli.configs", "kodalle_cli.score"} <= set(circle)


def test_only_the_cli_and_the_experiments_import_the_experiments():
    """The experiments (demo, unseen words) use the library like a user; the library never
    imports them (the CLI's `demo` command does), and they share what they share through
    experiments/common.py, not through each other's private names."""
    graph = _import_graph()
    experiments = {m for m in graph if m.startswith("kodalle_cli.experiments")}
    importers = {m for m, deps in graph.items() if deps & experiments} - experiments
    assert importers == {"kodalle_cli.cli"}
    assert "kodalle_cli.experiments.common" in graph["kodalle_cli.experiments.unseen_words"]
    assert "kodalle_cli.experiments.demo" not in graph["kodalle_cli.experiments.unseen_words"]
    assert "kodalle_cli.experiments.demo" not in graph["kodalle_cli.experiments.unseen_words_ko"]
