"""The command line: help with examples, versions, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kodalle_cli import __version__
from kodalle_cli.cli import main
from kodalle_cli.errors import KodalleError

COMMANDS = ["prepare", "tokenize", "train", "train vqgan", "train reranker", "sample",
            "attributes", "rerank", "score", "serve", "backbones", "demo"]


def run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_version(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"kodalle {__version__}"


def test_help_lists_every_subcommand(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for name in ("prepare", "tokenize", "train", "sample", "rerank", "score", "backbones", "demo"):
        assert name in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_subcommand_help_shows_an_example(command, capsys):
    code, out, _ = run([*command.split(), "--help"], capsys)
    assert code == 0 and "Example: kodalle" in out


def test_usage_error_is_one_red_line_with_exit_2(capsys):
    code, out, err = run(["train", "--no-such-option"], capsys)
    assert code == 2
    assert err.strip().startswith("Error: No such option") and "Traceback" not in err


def test_missing_backbone_is_a_usage_error(capsys):
    code, _, err = run(["train"], capsys)
    assert code == 2 and "--backbone" in err and len(err.strip().splitlines()) == 1


def test_failure_is_one_line_exit_1_and_traceback_only_with_debug(capsys, monkeypatch):
    def broken():
        raise KodalleError("the registry is broken")

    monkeypatch.setattr("kodalle_cli.backbone.registered_backbones", broken)
    code, _, err = run(["backbones"], capsys)
    assert code == 1 and err.strip() == "Error: the registry is broken"
    with pytest.raises(KodalleError):
        main(["--debug", "backbones"])


def test_console_script_and_module_entry_points():
    out = subprocess.run(
        [sys.executable, "-m", "kodalle_cli", "--version"], capture_output=True, text=True,
        check=True,
    ).stdout
    assert out.strip() == f"kodalle {__version__}"


def test_every_option_name_is_whole_in_80_column_help():
    """Names are what users type: `--help` in an 80-column terminal may wrap descriptions
    but never cuts an option or a subcommand name."""
    import os

    import typer

    from kodalle_cli.cli import app

    script = (
        "import sys\nfrom kodalle_cli.cli import main\n"
        "for args in sys.argv[1:]:\n"
        "    print('=====', args)\n"
        "    try:\n        main(args.split() + ['--help'])\n"
        "    except SystemExit:\n        pass\n"
    )
    env = {**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80", "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-c", script, *COMMANDS], capture_output=True,
                         text=True, env=env, check=True).stdout
    helps = dict(zip(COMMANDS, out.split("===== ")[1:], strict=True))
    root = typer.main.get_command(app)
    for name in COMMANDS:
        command = root
        for part in name.split():
            command = command.commands[part]
        text = helps[name]
        assert max(len(line) for line in text.splitlines()) <= 80
        for param in command.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("--"):
                    assert opt in text.replace("\n", " "), f"{name}: {opt} cut in --help"
        for sub in getattr(command, "commands", {}):
            assert sub in text, f"{name}: subcommand {sub} cut"


def test_options_come_from_the_config_dataclasses_with_their_defaults():
    """A default is written once, on the config: the CLI shows the same value and the same
    help, and every CLI-facing field is an option."""
    import dataclasses

    import typer

    from kodalle_cli import configs
    from kodalle_cli.cli import app

    root = typer.main.get_command(app)
    commands = {
        "prepare": (root.commands["prepare"], configs.PrepareConfig),
        "tokenize": (root.commands["tokenize"], configs.TokenizeConfig),
        "train": (root.commands["train"], configs.DalleTrainConfig),
        "train vqgan": (root.commands["train"].commands["vqgan"], configs.VQGANTrainConfig),
        "train reranker": (root.commands["train"].commands["reranker"],
                           configs.RerankerTrainConfig),
        "sample": (root.commands["sample"], configs.SampleConfig),
        "score": (root.commands["score"], configs.ScoreConfig),
    }
    for name, (command, config) in commands.items():
        params = {p.name: p for p in command.params}
        for field in dataclasses.fields(config):
            if "help" not in field.metadata:
                continue
            param = params[field.name]
            assert param.help == field.metadata["help"], (name, field.name)
            factory = field.default_factory
            if field.default is dataclasses.MISSING and factory is dataclasses.MISSING:
                assert param.required, (name, field.name)
            else:
                default = field.default if factory is dataclasses.MISSING else factory()
                assert param.default == (str(default) if isinstance(default, Path)
                                         and not isinstance(param.default, Path) else default), (
                    name, field.name, param.default, default)


def test_an_option_reaches_the_library_config(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("kodalle_cli.train.dalle.run_train", fake_train)
    run(["train", "--backbone", "b", "--lr", "0.5", "--freeze-text-emb", "--no-progress",
         "--max-steps", "7"], capsys)
    cfg = seen["cfg"]
    assert (cfg.backbone, cfg.lr, cfg.freeze_text_emb, cfg.progress, cfg.max_steps) == (
        "b", 0.5, True, False, 7)
    assert cfg.depth == 16 and cfg.weight_decay == 3e-3  # untouched: the dataclass defaults


def test_train_vqgan_options_override_the_recipe(monkeypatch, capsys):
    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("kodalle_cli.vqgan.train.train_vqgan", fake_train)
    run(["train", "vqgan", "--recipe", "small-flat", "--ch-mult", "1,2", "--lr", "0.5",
         "--no-l2-codes", "-o", "here"], capsys)
    cfg = seen["cfg"]
    assert (cfg.ch_mult, cfg.lr, cfg.l2_codes, str(cfg.out)) == ((1, 2), 0.5, False, "here")
    assert (cfg.ch, cfg.n_embed, cfg.max_steps) == (64, 512, 2000)  # the recipe's
    code, _, err = run(["train", "vqgan", "--ch-mult", "1,x"], capsys)
    assert code == 2 and "--ch-mult must be integers like 1,1,2,2,4, got '1,x'" in err


def test_the_cli_starts_without_importing_torch_or_numpy():
    """`kodalle --help` and every command's option parsing stay fast: the heavy libraries
    load only inside the command that needs them."""
    code = "import sys, kodalle_cli.cli; print(sorted({'torch', 'numpy', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
