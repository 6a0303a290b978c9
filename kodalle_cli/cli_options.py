"""Typer options from config dataclasses: the CLI side of :mod:`kodalle_cli.options`.

:func:`options_from` turns every field of a config made with
:func:`kodalle_cli.options.opt` into a Typer option of a command, with the field's default.
So a default such as ``lr=3e-5`` lives in one place, the dataclass, and the command body is
one line::

    @dataclass
    class TrainConfig:
        lr: float = opt(3e-5, "Peak learning rate.")
        resume: bool = opt(False, "Continue the run in --out.")

    @app.command()
    @options_from(TrainConfig)
    def train(**options):
        run_train(TrainConfig(**options))

Flag names follow the field: ``--field-name``. A bool that is off by default is one flag
(``--resume``); one that is on by default, or ``None`` for "the recipe decides", gets
``--x/--no-x``. A field whose type Typer cannot read (a tuple of any length) names a
``parser`` (``opt(..., parser=f)``) that turns the option's string into its value.
Parameters the command declares itself (arguments, options of its own) come first and their
fields are left out.

Only the CLI imports this module: the library never imports Typer.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable

import typer


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option(field: dataclasses.Field, annotation) -> typer.models.OptionInfo:
    meta = field.metadata
    default = field.default
    if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    if default is dataclasses.MISSING:
        default = ...  # required
    flag = _flag(field.name)
    names = [n for n in meta.get("names", ()) if n.startswith("--")] or [flag]
    shorts = [n for n in meta.get("names", ()) if not n.startswith("--")]
    if annotation is bool and default is False:
        declared = [names[0]]
    elif annotation in (bool, bool | None):
        declared = [f"{names[0]}/--no-{names[0][2:]}"]
    else:
        declared = names
    return typer.Option(default, *declared, *shorts, help=meta.get("help") or None,
                        **meta.get("click", {}))


def _typed(field: dataclasses.Field, hints: dict):
    """The type Typer reads: a field with a ``parser`` is read as a string and parsed."""
    if "parser" in field.metadata.get("click", {}):
        return str | None
    return hints[field.name]


def options_from(config: type, *, skip: tuple[str, ...] = ()) -> Callable:
    """Decorate a command: it also takes every field of ``config`` (except ``skip`` and the
    command's own parameters) as an option, passed on in ``**options``."""
    hints = typing.get_type_hints(config)

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in own} | set(skip)
        added = [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                              default=_option(f, hints[f.name]), annotation=_typed(f, hints))
            for f in dataclasses.fields(config)
            if "help" in f.metadata and f.name not in taken
        ]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            return fn(*args, **kwargs)

        own_hints = typing.get_type_hints(fn)
        params = [p.replace(annotation=own_hints.get(p.name, p.annotation)) for p in own]
        params = ([p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY] + added
                  + [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY])
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the new signature, not fn's
        return command

    return decorate
