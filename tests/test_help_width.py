"""Every command's help renders whole at 80 columns (issue 27 item 4): no option name,
choice list, metavar, default or help word is cut with an ellipsis."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from kodalle_cli.cli import app


def _commands(group, prefix: tuple[str, ...] = ()):
    yield prefix
    if hasattr(group, "commands"):  # a group (typer's own click or click's)
        for name, command in sorted(group.commands.items()):
            yield from _commands(command, (*prefix, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


def test_every_command_is_walked():
    names = {" ".join(c) for c in COMMANDS}
    assert {"", "prepare", "tokenize", "train", "train vqgan", "train reranker", "sample",
            "serve", "score", "rerank"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "kodalle")
@pytest.mark.parametrize("columns", [80])
def test_help_is_whole_at_80_columns(command, columns):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": str(columns)},
                                prog_name="kodalle")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= columns
    cut = [line for line in lines if "…" in line]
    assert not cut, "\n".join(cut)
