"""Backbone plugins: built-ins through entry points, third-party packages, KODALLE_PLUGINS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from kodalle_cli import hookimpl
from kodalle_cli.backbone import Backbone, get_backbone, registered_backbones
from kodalle_cli.plugins import get_plugin_manager, reset_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = {"klue-roberta-large", "klue-roberta-base", "kogpt-trinity", "kakaobrain-kogpt", "hf"}
KODALLE = [sys.executable, "-m", "kodalle_cli"]


def backbones_json(env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    out = subprocess.run(
        [*KODALLE, "backbones", "--json"], capture_output=True, text=True, env=env, check=True
    ).stdout
    return {row["name"]: row for row in json.loads(out)}


@pytest.fixture
def fresh_plugins():
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.mark.slow
def test_builtins_come_from_entry_points():
    rows = backbones_json()
    assert BUILTINS <= set(rows)
    for name in BUILTINS:
        assert rows[name]["plugin"].startswith("kodalle:")
        assert {"name", "source", "language", "plugin"} <= set(rows[name])
    assert rows["kakaobrain-kogpt"]["source"] == "kakaobrain/kogpt@KoGPT6B-ryan1.5b-float16"


def test_core_never_imports_a_backbone_by_name():
    for path in (ROOT / "kodalle_cli").rglob("*.py"):
        text = path.read_text()
        assert "import backbones" not in text and "from backbones" not in text, path


@pytest.mark.slow
def test_kodalle_plugins_limits_what_loads():
    assert set(backbones_json({"KODALLE_PLUGINS": "klue"})) == {
        "klue-roberta-large", "klue-roberta-base",
    }
    assert backbones_json({"KODALLE_PLUGINS": ""}) == {}


def register_in_process(name: str, backbone: Backbone) -> None:
    """A plugin module made here, registering one backbone, loaded under ``name``."""
    plugin = types.ModuleType(name)

    @hookimpl
    def kodalle_register_backbones(register):
        register(backbone)

    plugin.kodalle_register_backbones = kodalle_register_backbones
    get_plugin_manager().register(plugin, name=name)


def test_in_process_plugin_registers_a_backbone(fresh_plugins):
    register_in_process("my-plugin", Backbone(name="my-lm", source="org/my-lm", language="xx"))
    found = registered_backbones()
    assert found["my-lm"].plugin == "my-plugin" and found["my-lm"].language == "xx"
    assert get_backbone("my-lm").location == "org/my-lm"


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory):
    """The example package, pip-installed into a private target dir (not the venv)."""
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target),
         str(ROOT / "examples" / "kodalle-backbone-minilm")],
        check=True, capture_output=True,
    )
    return target


def test_example_plugin_is_listed_with_its_real_sizes(example_plugin):
    rows = backbones_json({"PYTHONPATH": str(example_plugin)})
    row = rows["all-minilm-l6-v2"]
    assert row["plugin"] == "kodalle-backbone-minilm:minilm" and row["language"] == "en"
    assert (row["vocab"], row["dim"], row["positions"]) == (30522, 384, 512)
    assert BUILTINS <= set(rows)


def test_example_plugin_tables_equal_the_real_bert(example_plugin, fresh_plugins, monkeypatch):
    from transformers import AutoModel

    monkeypatch.syspath_prepend(str(example_plugin))
    backbone = get_backbone("all-minilm-l6-v2")
    emb = backbone.load_embeddings()
    model = AutoModel.from_pretrained(backbone.source)
    assert torch.equal(emb.token, model.get_input_embeddings().weight)
    assert torch.equal(emb.position, model.embeddings.position_embeddings.weight)
    assert emb.position_offset == 0 and emb.pad_id == 0
    ids = backbone.load_tokenizer()("a red t-shirt").input_ids
    assert ids[0] == 101 and ids[-1] == 102  # a real BERT vocabulary: [CLS] ... [SEP]


def test_a_duplicate_backbone_name_warns_naming_both_plugins(fresh_plugins, capsys):
    register_in_process(
        "copycat", Backbone(name="klue-roberta-large", source="someone/else", language="ko"))
    found = registered_backbones()
    err = " ".join(capsys.readouterr().err.split())
    assert "'klue-roberta-large' is registered by both kodalle:klue and copycat" in err
    assert found["klue-roberta-large"].source == "klue/roberta-large"  # the first one stays


def test_hookspecs_document_every_hook():
    from kodalle_cli import hookspecs

    pm = get_plugin_manager()
    for name in vars(pm.hook):
        if name.startswith("kodalle_"):
            doc = getattr(hookspecs, name).__doc__
            assert doc and len(doc.strip().splitlines()) == 1, name


def test_backbones_table_shows_names_and_headers_whole_at_80_columns():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80", "NO_COLOR": "1"}
    out = subprocess.run([*KODALLE, "backbones"], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    cells = {cell.strip() for line in out.splitlines() for cell in line.split("│")}
    header = {cell.strip() for cell in out.splitlines()[1].split("┃")}
    assert BUILTINS <= cells  # each name whole on one line, the two klue rows distinct
    assert {"name", "language", "source", "vocab", "dim", "positions", "plugin"} <= header
