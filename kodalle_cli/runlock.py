"""One run per directory: ``OUT/lock`` while a run writes to ``OUT``.

:func:`run_lock` is held by ``kodalle train`` (and ``train vqgan``, ``train reranker``) and by
the trainer they call; a second run on the same directory fails with one line naming the
pid that holds it. The lock is an ``flock`` on the file, which the kernel drops when its
owner dies, so a lock left by a killed run is taken over; the file names the owner (pid,
host, process start time) for the message and for systems where flock does not work.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kodalle_cli.errors import KodalleError

LOCK = "lock"  # OUT/lock: the pid of the process writing the run

_held: dict[str, list] = {}  # lock path -> [open file, depth]: a process may re-enter its lock


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, enabled: bool = True):
    """Hold ``OUT/lock`` while a run writes to ``out``: a second run on the same directory
    fails with one line naming the pid that holds it.

    The file holds the owner's pid (first line), host and start time; the lock itself is an
    ``flock`` on it, which the kernel drops when the owner dies, so a lock left by a killed
    run is taken over. Re-entrant within a process (the DALLE, VQGAN and reranker commands
    take it, and so does the trainer they call); ``enabled=False`` (DDP ranks but 0) does
    nothing. A directory it created and nothing was written to is removed again."""
    if not enabled:
        yield
        return
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = str((out / LOCK).resolve())
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    handle = _acquire(Path(path))
    _held[path] = [handle, 1]
    try:
        yield
    finally:
        del _held[path]
        with contextlib.suppress(OSError):
            os.unlink(path)
        handle.close()  # releases the flock
        if created:  # a run refused before it wrote anything leaves no empty directory
            with contextlib.suppress(OSError):
                out.rmdir()


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` (Linux /proc, clock ticks since boot), None if unknown;
    "" for a dead or zombie process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "" if Path("/proc/self/stat").is_file() else None
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return "" if fields[0] in ("Z", "X") else fields[19]


def _pid_alive(pid: int) -> bool:
    if _process_start(pid) == "":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_owner(text: str) -> dict:
    lines = text.splitlines()
    owner = {"pid": None, "host": None, "start": None}
    if lines and lines[0].strip().isdigit():
        owner["pid"] = int(lines[0])
    for line in lines[1:]:
        key, _, value = line.partition("=")
        if key in owner:
            owner[key] = value.strip()
    return owner


def _still_running(owner: dict) -> bool:
    """A lock file whose flock is free is stale, unless flock does not work here and the
    owner it names is a live process on this host (the same one: same start time)."""
    import socket

    pid = owner["pid"]
    if pid is None or pid == os.getpid():
        return False
    if owner["host"] not in (None, socket.gethostname()):
        return True  # another machine: its pid cannot be checked from here
    if not _pid_alive(pid):
        return False
    return owner["start"] is None or owner["start"] == _process_start(pid)


def _busy(path: Path, owner: dict) -> KodalleError:
    import socket

    pid = owner["pid"] if owner["pid"] is not None else "unknown"
    host = owner["host"]
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return KodalleError(
        f"{path.parent} is in use by another run (pid {pid}{where}, lock file {path}): wait "
        "for it to end or use another --out; delete the lock file only if that run is gone"
    )


def _acquire(path: Path):
    """Open ``path``, take its flock and write our pid into it; raise if another run has it."""
    import socket

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the pid check alone
        fcntl = None
    for _ in range(5):
        handle = open(path, "a+", encoding="utf-8")
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    raise _busy(path, _lock_owner(handle.read())) from None
                # the file may have been unlinked (its owner ended) between open and flock
                if os.fstat(handle.fileno()).st_ino != os.stat(path).st_ino:
                    handle.close()
                    continue
            handle.seek(0)
            owner = _lock_owner(handle.read())
            if _still_running(owner):
                raise _busy(path, owner)
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\nhost={socket.gethostname()}\n"
                         f"start={_process_start(os.getpid()) or ''}\n")
            handle.flush()
            return handle
        except FileNotFoundError:  # unlinked by its ending owner: try again
            handle.close()
        except BaseException:
            handle.close()
            raise
    raise KodalleError(f"could not take the lock {path}: another run keeps replacing it")
