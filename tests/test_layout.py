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
