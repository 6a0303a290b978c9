"""CLI options declared once: on the config dataclass the library function takes.

A config field made with :func:`opt` carries its CLI help (and, where needed, its flag names
and click settings) as plain field metadata; the CLI's
:func:`kodalle_cli.cli_options.options_from` turns those fields into Typer options. This
module is library code and does not import Typer.
"""

from __future__ import annotations

import dataclasses


def opt(default=dataclasses.MISSING, help: str = "", *names: str, factory=None, **click):
    """A dataclass field that is also a CLI option (fields made without it are not options).
    ``default=...``: required. ``names``: flags other than the field's own (``"-n"``);
    ``click``: extra settings such as ``min=1`` or ``hidden=True``."""
    meta = {"help": help, "names": names, "click": click}
    if default is ...:  # required: no default in Python either
        default = dataclasses.MISSING
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
