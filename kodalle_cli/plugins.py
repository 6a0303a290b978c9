"""Loading plugins: pluggy hooks found through the ``kodalle`` entry-point group.

A plugin is any installed distribution with an entry point in the ``kodalle`` group whose
module implements hooks of :mod:`kodalle_cli.hookspecs` (see there for an example).

``KODALLE_PLUGINS`` (a comma list of entry-point or distribution names) limits which
plugins load; set to an empty string it loads none.
"""

from __future__ import annotations

import importlib.metadata as md
import os

import pluggy

from kodalle_cli import hookspecs
from kodalle_cli.hookspecs import PROJECT, hookimpl

__all__ = ["get_plugin_manager", "hookimpl", "plugin_label", "reset_plugin_manager"]

_pm: pluggy.PluginManager | None = None
_dists: dict[str, str] = {}  # plugin name -> distribution that provides it


def _allowed() -> set[str] | None:
    value = os.environ.get("KODALLE_PLUGINS")
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every allowed entry-point plugin loaded."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        allowed = _allowed()
        for ep in md.entry_points(group=PROJECT):
            dist = ep.dist.name if ep.dist else ""
            if allowed is not None and ep.name not in allowed and dist not in allowed:
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            pm.register(ep.load(), name=ep.name)
            _dists[ep.name] = dist
        _pm = pm
    return _pm


def reset_plugin_manager() -> None:
    """Forget loaded plugins (tests, or after installing a plugin in-process)."""
    global _pm
    _pm = None


def plugin_label(plugin: object) -> str:
    """``distribution:entry-point`` for an entry-point plugin, its name when registered in-process."""
    pm = get_plugin_manager()
    name = pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))
    return f"{_dists[name]}:{name}" if _dists.get(name) else name
