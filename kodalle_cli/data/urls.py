"""Where shards are: a local path, an ``http(s)://`` URL or a ``pipe:`` command, as webdataset
takes them, each possibly a brace pattern (``https://host/data/train-{000000..000099}.tar``).
The one place a shard or a manifest is opened; both shard readers (``data/tokens.py``,
``data/shards.py``) come here.

- :func:`expand`: a brace pattern's locations; :func:`join`: another file (a manifest, a shard
  the manifest names) in the same place: a folder's file, a URL's sibling, or the ``pipe:``
  command with its ``.tar`` word's file name swapped (``pipe:aws s3 cp s3://b/manifest.json -``).
- :func:`read_bytes` (a whole file) and :func:`open_stream` (a file object for a tar reader):
  a remote stream that breaks (a closed connection, a short body, a command that exits with an
  error) is opened again and read on from where it broke (HTTP: a ``Range`` request), up to
  :data:`RETRIES` times; then :class:`ShardLost` names the URL. The readers skip that shard
  with a warning and count it (:func:`lost`, :data:`STATS`). Local files are read as before:
  their errors are the readers' (a damaged or missing shard).
- :func:`stamp`: what the shard-check cache keys a shard's result by: a local file's size and
  mtime; an HTTP(S) URL's ``Content-Length`` with its ``ETag`` or ``Last-Modified`` (a HEAD
  request; neither header: no stamp); a ``pipe:`` command has none (read every time).

A :class:`Place` is a shard location with a manifest given apart (``--manifest``).

Limits: a cut body is seen by its ``Content-Length`` (an HTTP server that sends none and
closes early looks complete: the tar reader then finds the shard damaged); a ``pipe:``
command's exit status is read when its output ends, so a command that fails after writing
a whole tar is not noticed by a reader that stops at the tar's end; :data:`STATS` counts
what this process met; a data-loader worker starts its own and sends it with each batch
(:meth:`StreamStats.add` puts them together: ``kodalle train``'s metrics.csv counts both).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kodalle_cli.errors import KodalleError, UsageError

RETRIES = 3  # reopenings of a broken remote stream before its shard is skipped
RETRY_DELAY = 0.2  # seconds before the first reopening, doubled after each
TIMEOUT = 60.0  # seconds without a byte from an HTTP server
REMOTE = ("http://", "https://", "pipe:")


class ShardLost(KodalleError):
    """A remote file that could not be read whole, :data:`RETRIES` reopenings included."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


@dataclass
class StreamStats:
    """What this process's remote reads met: reopenings, and the shards skipped."""

    retries: int = 0
    lost: list[str] = field(default_factory=list)  # "URL: reason", each once

    def metrics(self) -> dict[str, int]:
        return {"stream_retries": self.retries, "shards_lost": len(self.lost)}

    def add(self, other: StreamStats) -> StreamStats:
        """Two processes' counts together (a data-loader worker's beside the main one's);
        a shard both skipped is counted once."""
        return StreamStats(self.retries + other.retries,
                           self.lost + [line for line in other.lost if line not in self.lost])

    def copy(self) -> StreamStats:
        return StreamStats(self.retries, list(self.lost))


STATS = StreamStats()


@dataclass(frozen=True)
class Place:
    """Shards at ``where`` (a folder, URL, brace pattern or ``pipe:`` command) whose
    manifest is at ``manifest`` (None: the one in the same place)."""

    where: str
    manifest: str | None = None

    def __str__(self) -> str:
        return self.where


def place(where: str | Path | Place, manifest: str | Path | None = None) -> Place:
    """``where`` as a :class:`Place` (``manifest``, when given, replaces its manifest)."""
    if isinstance(where, Place):
        return Place(where.where, str(manifest) if manifest is not None else where.manifest)
    check(str(where))
    return Place(str(where), str(manifest) if manifest is not None else None)


def source(data: str | Path, manifest: str | Path | None = None) -> str | Path | Place:
    """What a command reads shards from: ``--data`` as it is, or a :class:`Place` when
    ``--manifest`` is given (one line for a location no reader takes)."""
    if manifest is not None:
        return place(data, manifest)
    check(str(data))
    return data


def is_remote(where: str | Path | Place) -> bool:
    return str(where).startswith(REMOTE)


def check(where: str) -> None:
    """One line for a location no reader takes (e.g. ``s3://``: read it through ``pipe:``)."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", where)
    scheme = match.group(1).lower() if match else ""
    if scheme and scheme not in ("http", "https", "file") and not where.startswith("pipe:"):
        raise UsageError(
            f"{where}: kodalle reads local paths, http(s):// URLs and pipe: commands; read "
            f"{scheme}:// through a command, e.g. pipe:aws s3 cp {where} -")


def expand(where: str | Path) -> list[str]:
    """The locations a brace pattern stands for (itself when it has none)."""
    from braceexpand import braceexpand

    return list(braceexpand(str(where)))


def _tar_word(command: str) -> int | None:
    """The index of the last word of a ``pipe:`` command that names a ``.tar`` (a pattern
    too), None when there is none."""
    words = command.split(" ")
    for i in range(len(words) - 1, -1, -1):
        if words[i].endswith(".tar") or (words[i].endswith("}") and ".tar" in words[i]):
            return i
    return None


def _is_file_like(where: str) -> bool:
    """A location that names one file (or a pattern of files) rather than a folder."""
    name = where.rstrip("/").rsplit("/", 1)[-1]
    return not where.endswith("/") and (name.endswith(".tar") or "{" in name)


def selected(root: str | Path | Place) -> set[str] | None:
    """The shard names a pattern (or one ``.tar``) picks; None for a folder, whose manifest
    lists its shards."""
    where = str(root)
    if where.startswith("pipe:"):
        i = _tar_word(where)
        return None if i is None else {name(x) for x in expand(where.split(" ")[i])}
    if not is_remote(where) and Path(where.removeprefix("file://")).is_dir():
        return None
    if not _is_file_like(where):
        return None
    return {x.rsplit("/", 1)[-1] for x in expand(where)}


def join(root: str | Path | Place, name: str) -> Path | str:
    """The file ``name`` in the same place as ``root``: a local folder (or the folder of a
    local tar or pattern) gives a Path, a URL the URL beside it (or in it, for a folder URL),
    a ``pipe:`` command the same command with its ``.tar`` word's file name replaced."""
    where = str(root)
    if where.startswith("pipe:"):
        words = where.split(" ")
        i = _tar_word(where)
        if i is None:
            raise UsageError(f"{where}: no .tar in this command, so kodalle cannot tell where "
                             f"{name} is; give it with --manifest")
        words[i] = f"{words[i].rsplit('/', 1)[0]}/{name}" if "/" in words[i] else name
        return " ".join(words)
    if where.startswith(("http://", "https://")):
        base = where.rsplit("/", 1)[0] if _is_file_like(where) else where.rstrip("/")
        return f"{base}/{name}"
    where = where.removeprefix("file://")
    path = Path(where)
    if path.is_dir() or not _is_file_like(where):
        return path / name
    return path.parent / name


def name(location: str | Path) -> str:
    """A shard's file name (the ``.tar`` word of a ``pipe:`` command)."""
    where = str(location)
    if where.startswith("pipe:"):
        i = _tar_word(where)
        where = where.split(" ")[i] if i is not None else where
    return where.rstrip("/").rsplit("/", 1)[-1]


def manifest_location(root: str | Path | Place, default: str) -> Path | str:
    """Where the manifest of ``root`` is: given apart, or ``default`` in the same place."""
    if isinstance(root, Place) and root.manifest is not None:
        return Path(root.manifest) if not is_remote(root.manifest) else root.manifest
    return join(root, default)


def exists(location: str | Path) -> bool:
    """A local file that exists, or a remote file that answers (HTTP: a HEAD request;
    ``pipe:``: assumed)."""
    if not is_remote(location):
        return Path(location).is_file()
    if str(location).startswith("pipe:"):
        return True
    try:
        _head(str(location))
    except (OSError, http.client.HTTPException, ValueError):
        return False
    return True


def cache_key(location: str | Path) -> str:
    """The shard-check cache's key of a shard: a local file's resolved path, else the URL."""
    return str(location) if is_remote(location) else str(Path(location).resolve())


def stamp(location: str | Path) -> dict | None:
    """What says a shard is unchanged (see the module docstring); None: always read it."""
    if not is_remote(location):
        try:
            st = Path(location).stat()
        except OSError:
            return None
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if str(location).startswith("pipe:"):
        return None
    try:
        headers = _head(str(location))
    except (OSError, http.client.HTTPException, ValueError):
        return None
    size, etag, modified = (headers.get("Content-Length"), headers.get("ETag"),
                            headers.get("Last-Modified"))
    if size is None or not (etag or modified):
        return None
    return {"size": int(size), **({"etag": etag} if etag else {"last_modified": modified})}


def _head(url: str):
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return response.headers


def read_bytes(location: str | Path) -> bytes:
    """A whole file: local as it is, remote with retries (:class:`ShardLost` at the end)."""
    if not is_remote(location):
        return Path(location).read_bytes()
    with open_stream(location) as stream:
        return stream.read()


def read_utf8(location: str | Path) -> str:
    """A small UTF-8 file (a manifest): local, or remote with retries; OSError (a local file
    that is missing) and :class:`ShardLost` as they come."""
    return read_bytes(location).decode("utf-8")


def open_stream(location: str | Path):
    """A binary file object over a shard: a local file, or a remote stream that reopens
    where it broke (:data:`RETRIES` times, then :class:`ShardLost`)."""
    if not is_remote(location):
        return open(location, "rb")  # noqa: SIM115 (the caller closes it)
    check(str(location))
    return _Retrying(str(location))


def lost(error: ShardLost, report=None) -> None:
    """A shard skipped because its stream broke: warned about once, naming the URL, and
    counted in :data:`STATS`."""
    from kodalle_cli.errors import warn

    line = f"{error.url}: {error.reason}"
    if line not in STATS.lost:
        STATS.lost.append(line)
    (report or warn)(f"{line}; shard skipped")


# ---- remote streams ---------------------------------------------------------------------------
class _Pipe:
    """The stdout of a shell command; EOF with a failed exit status is an error."""

    def __init__(self, command: str):
        self.command = command
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close)
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE,  # noqa: S602
                                     stderr=self._err, stdin=subprocess.DEVNULL)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n) if n is not None and n >= 0 else self.proc.stdout.read()
        if not data and n != 0:
            status = self.proc.wait()
            if status != 0:
                self._err.seek(0)
                said = self._err.read().decode("utf-8", "replace").strip().splitlines()
                raise OSError(f"exit status {status}{': ' + said[-1] if said else ''}")
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdout.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._err.close()


class _Http:
    """The body of a GET from byte ``start`` on (a ``Range`` request; a server that ignores
    it has its first ``start`` bytes skipped here)."""

    def __init__(self, url: str, start: int = 0):
        headers = {"Range": f"bytes={start}-"} if start else {}
        request = urllib.request.Request(url, headers=headers)
        try:
            self.response = urllib.request.urlopen(request, timeout=TIMEOUT)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 403, 401, 410):
                raise _Refused(f"HTTP {exc.code} {exc.reason}") from None
            raise OSError(f"HTTP {exc.code} {exc.reason}") from None
        length = self.response.headers.get("Content-Length")
        self.left = int(length) if length is not None else None  # bytes still to come
        if start and self.response.status != 206:
            left = start
            if self.left is not None:
                self.left -= start
            while left:
                chunk = self.response.read(min(left, 1 << 20))
                if not chunk:
                    raise OSError("the body ended before the point to read on from")
                left -= len(chunk)

    def read(self, n: int = -1) -> bytes:
        data = self.response.read(n if n is not None and n >= 0 else None)
        if self.left is not None:
            if not data and n != 0 and self.left > 0:  # http.client returns b"" for a cut body
                raise OSError(f"the connection closed with {self.left} bytes still to come")
            self.left -= len(data)
        return data

    def close(self) -> None:
        self.response.close()


class _Refused(OSError):
    """A remote file that is not there (HTTP 404 and the like): not retried."""


_BROKEN = (OSError, http.client.HTTPException, ValueError)


class _Retrying:
    """A remote stream that, when a read fails, is opened again from the byte it got to."""

    def __init__(self, url: str):
        self.url, self.pos, self.tries, self.inner = url, 0, 0, None
        self.closed = False
        self.inner = self._again(None)

    def _open(self):
        if self.url.startswith("pipe:"):
            inner = _Pipe(self.url[len("pipe:"):])
            left = self.pos
            while left:  # a command cannot seek: read past what was already read
                chunk = inner.read(min(left, 1 << 20))
                if not chunk:
                    inner.close()
                    raise OSError("the stream ended before the point to read on from")
                left -= len(chunk)
            return inner
        return _Http(self.url, self.pos)

    def _again(self, error: BaseException | None):
        """Open (again, after ``error``); :class:`ShardLost` when out of retries."""
        while True:
            if error is not None:
                if isinstance(error, _Refused) or self.tries >= RETRIES:
                    tried = f" after {self.tries} retries" if self.tries else ""
                    raise ShardLost(self.url, f"{_said(error)}{tried}") from None
                time.sleep(RETRY_DELAY * 2 ** self.tries)
                self.tries += 1
                STATS.retries += 1
            try:
                return self._open()
            except _BROKEN as exc:
                error = exc

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks = []
            while chunk := self.read(1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        while True:
            try:
                data = self.inner.read(n)
            except _BROKEN as exc:
                with contextlib.suppress(*_BROKEN):
                    self.inner.close()
                self.inner = self._again(exc)
                continue
            self.pos += len(data)
            return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed and self.inner is not None:
            with contextlib.suppress(*_BROKEN):
                self.inner.close()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def _said(error: BaseException) -> str:
    if isinstance(error, http.client.IncompleteRead):
        return f"the connection closed early ({len(error.partial)} bytes of a read)"
    text = str(error) or type(error).__name__
    return text if len(text) < 200 else text[:200] + "..."

