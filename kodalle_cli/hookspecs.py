"""The hooks a kodalle plugin can implement: one function per hook, one line each.

A plugin module decorates its implementations with :data:`hookimpl`::

    from kodalle_cli import hookimpl

    @hookimpl
    def kodalle_register_backbones(register):
        register(Backbone(name="my-lm", source="org/my-lm", language="xx"))
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "kodalle"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kodalle_register_backbones(register: Callable) -> None:
    """Call ``register(backbone)`` once per :class:`~kodalle_cli.backbone.Backbone` you provide."""
