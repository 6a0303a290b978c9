"""Files and folders that appear whole or not at all: write under a temporary name beside
the target, then rename. Every write that must never be seen half-done goes through here
(no other module calls ``os.replace``).

:func:`replacing` is the one writer::

    with replacing(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp))          # renamed onto the target when the block ends

    with replacing(ckpts / "step-0000100", directory=True) as tmp:
        ...                                   # a fresh folder, renamed into place whole

:func:`write_text_atomic`, :func:`write_json_atomic` and :func:`write_bytes_atomic` are
the common cases. A writer that lives across calls (a shard filled sample by sample) takes
:func:`temp_path`, then :func:`rename_into_place` or :func:`discard`. A write that fails (a
full disk, an interrupt) removes its temporary, so nothing partial is left; what a killed
process left is found by :func:`leftovers`.

Text is UTF-8 whatever the locale says; JSON keeps non-ASCII text as it is
(``ensure_ascii=False``). :func:`jsonable` makes run information (paths, tuples, configs)
safe for JSON files; :func:`is_disk_full` / :func:`disk_full_error` turn ``ENOSPC`` (and an
exceeded quota) into the one-line :class:`~kodalle_cli.errors.KodalleError` every writer
of big files (checkpoints, shards) raises.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from kodalle_cli.errors import KodalleError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# hidden names beside the target: ".NAME.tmp-PID" (being written), ".NAME.old-PID" (the
# folder being replaced), ".NAME.del-PID" (a folder being removed)
_KINDS = ("tmp", "old", "del")


def _beside(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name :func:`rename_into_place` later renames onto ``path``."""
    return _beside(Path(path), "tmp")


def leftovers(directory: str | os.PathLike) -> list[Path]:
    """Temporaries a killed process left in ``directory`` (none of them is a finished file)."""
    directory = Path(directory)
    return sorted(p for kind in _KINDS for p in directory.glob(f".*.{kind}-*"))


def discard(path: str | os.PathLike) -> None:
    """Remove a temporary file or folder, if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def rename_into_place(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished ``tmp`` onto ``path`` in one step. A folder already at ``path`` is
    first renamed aside and removed afterwards, so ``path`` is never a half-deleted folder."""
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir() and path.is_dir():
        old = _beside(path, "old")
        discard(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a folder by renaming it aside first: it is never seen half-deleted."""
    path = Path(path)
    gone = _beside(path, "del")
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (with ``directory``, a fresh empty folder);
    when the block ends without an exception it is renamed onto ``path``
    (:func:`rename_into_place`), else removed. ``path``'s parent is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    discard(tmp)
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        rename_into_place(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` as UTF-8 (whatever the locale's encoding)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data, *, default=None) -> None:
    """``data`` as indented UTF-8 JSON, non-ASCII text kept as it is; ``default`` as for
    :func:`json.dumps` (e.g. ``str`` for values JSON has no type for)."""
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2, default=default)
                      + "\n")


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
