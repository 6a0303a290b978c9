"""Files that appear whole or not at all: write under a temporary name, then rename.

:func:`jsonable` makes run information (paths, tuples, configs) safe for JSON files.

A write that fails (a full disk, an interrupt) removes its temporary file, so nothing
partial is left; :func:`is_disk_full` / :func:`disk_full_error` turn ``ENOSPC`` (and an
exceeded quota) into the one-line :class:`~kodalle_cli.errors.KodalleError` every writer
of big files (checkpoints, shards) raises.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from kodalle_cli.errors import KodalleError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the disk or quota is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if "No space left on device" in str(exc):  # libraries that wrap the OSError
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(what: str, where: str | os.PathLike, after: str = "") -> KodalleError:
    """The one line for a full disk: ``disk full (no space left on device) while writing
    WHAT in WHERE`` and ``after`` (what is still intact, how to go on)."""
    tail = f"; {after}" if after else ""
    return KodalleError(
        f"disk full (no space left on device) while writing {what} in {where}{tail}")


def jsonable(value):
    """``value`` with paths as strings, tuples as lists, configs (``to_dict``) as dicts and
    anything else unknown as its repr: safe for ``json.dumps``."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    return repr(value)
