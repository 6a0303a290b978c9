"""Image shards: the WebDataset tar files ``kodalle prepare`` writes and every later stage reads.

Layout of a shard directory (img2dataset-compatible)::

    shards/train-000000.tar          KEY.jpg (RGB JPEG), KEY.txt (caption, UTF-8), KEY.json (meta)
    shards/train-000000_stats.json   per-shard counts and every skipped input with its reason
    shards/val-000000.tar ...        with --val-fraction
    shards/manifest.json             the run: options, samples, skipped, shards

Writing (:class:`ShardWriter`): members go to a hidden temporary file; :meth:`commit` renames
the tar and then its stats file into place, so a shard exists only when complete, and a
``*_stats.json`` beside a tar marks it as finished (what resume looks for). Tar members have
fixed mtime/uid/gid/mode and a fixed order, so the same samples give byte-identical shards.

Reading: this module is the one reader of image shards. :func:`iter_image_samples` for
every sample::

    from kodalle_cli.data.shards import iter_image_samples
    for s in iter_image_samples("shards", split="train"):
        s.key, s.image (PIL RGB), s.caption (str), s.meta (dict)

:func:`iter_shard_meta` for the ``KEY.json`` of one shard without reading its images, and
:func:`read_image` for one sample's image. A sample's image is its ``KEY.jpg`` (what
``prepare`` writes) or any other of :data:`IMAGE_EXTENSIONS`.

``source`` is a shard directory, a glob (``shards/train-*.tar``), one tar, or a list of tars;
or shards elsewhere (:mod:`kodalle_cli.data.urls`): an ``http(s)://`` URL or a ``pipe:``
command, of one tar or a brace pattern (``https://host/data/train-{000000..000099}.tar``), or
a folder URL (``https://host/data/``) whose ``manifest.json`` lists them. A remote stream that
breaks is opened again where it broke, a few times; then the rest of that shard is skipped
with a warning naming the URL, and counted (``urls.STATS``).
Inside a torch DataLoader with several workers (or under torch.distributed) each worker
reads its own share of the shards (webdataset's worker/node info), so wrapping the iterator
in an ``IterableDataset`` needs no extra code.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kodalle_cli.atomic import (
    discard,
    disk_full_error,
    is_disk_full,
    leftovers,
    rename_into_place,
    temp_path,
    write_json_atomic,
)
from kodalle_cli.data import urls
from kodalle_cli.errors import KodalleError

SPLITS = ("train", "val")
IMAGE_EXTENSION = "jpg"  # what ShardWriter writes: the JPEG of encode_jpeg
# what a reader takes as a sample's image (shards from other WebDataset tools too)
IMAGE_EXTENSIONS = (IMAGE_EXTENSION, "jpeg", "png", "webp")
SHARD_PATTERN = "{split}-{index:06d}.tar"


def shard_name(split: str, index: int) -> str:
    return SHARD_PATTERN.format(split=split, index=index)


def stats_path(tar: Path) -> Path:
    return tar.with_name(tar.name[: -len(".tar")] + "_stats.json")


def is_complete(tar: Path) -> bool:
    """A shard is complete when its tar and its stats file (renamed last) both exist."""
    return tar.is_file() and stats_path(tar).is_file()


class ShardWriter:
    """Writes one shard under a temporary name; :meth:`commit` makes it appear atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        # plain tarfile (webdataset's TarWriter would import torch into every worker)
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        # fixed mtime, owner and mode: the same samples give byte-identical tar files
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = "kodalle"
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, jpg: bytes, caption: str, meta: dict) -> None:
        if not key or "." in key or "/" in key:
            raise ValueError(f"shard keys must be non-empty, without dots or slashes: {key!r}")
        with self._disk_full():
            self._add(f"{key}.{IMAGE_EXTENSION}", jpg)
            self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
            self._add(f"{key}.txt", caption.encode("utf-8"))
        self.count += 1

    def commit(self, stats: dict) -> None:
        with self._disk_full():
            self._tar.close()
            rename_into_place(self.tmp, self.path)
            write_json_atomic(stats_path(self.path), stats)

    @contextlib.contextmanager
    def _disk_full(self):
        """A full disk: the temporary file goes, and one line says so."""
        try:
            yield
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self.abort()
            raise disk_full_error(
                f"shard {self.path.name}", self.path.parent, "the shards finished so far are "
                "kept and no partial one is left; free space and run the same command to go on"
            ) from None

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # closing may fail again (a full disk)
            self._tar.close()
        discard(self.tmp)


def remove_stale_temporaries(out: Path) -> None:
    """Drop temporary files left by a killed run (their shards are rebuilt)."""
    for p in leftovers(out):
        discard(p)


# ---- reading ---------------------------------------------------------------------------------
@dataclass
class ImageSample:
    key: str
    image: object  # PIL.Image.Image (RGB) or the JPEG bytes with decode=False
    caption: str
    meta: dict = field(default_factory=dict)
    shard: str = ""


def shard_paths(
    source: str | Path | Sequence[str | Path], split: str | None = "train"
) -> list[Path | str]:
    """The shards of ``split`` in ``source`` (directory, glob, tar file or list, or a remote
    location: see the module docstring), sorted; remote ones are strings. ``split`` only
    filters a directory, local or a folder URL (None: every shard in it).

    Raises KodalleError when there are none."""
    if isinstance(source, list | tuple):
        paths = [p if urls.is_remote(p) else Path(p) for p in source]
    elif urls.is_remote(source) or isinstance(source, urls.Place) or "{" in str(source):
        return _remote_paths(source, split)
    else:
        text = str(source)
        p = Path(text)
        if p.is_dir():
            paths = sorted(p.glob(f"{split}-*.tar" if split else "*.tar"))
        elif any(ch in text for ch in "*?["):
            paths = [Path(x) for x in sorted(glob.glob(text))]
        else:
            paths = [p] if p.is_file() else []
    paths = [p for p in paths
             if urls.is_remote(p) or (p.suffix == ".tar" and not p.name.startswith("."))]
    if not paths:
        where = f"{source}" if not isinstance(source, list | tuple) else "the given list"
        hint = " (run `kodalle prepare` first)" if split in SPLITS else ""
        raise KodalleError(f"no {split} shards in {where}{hint}")
    return paths


def _remote_paths(source, split: str | None) -> list[Path | str]:
    """The shards a URL, ``pipe:`` command or brace pattern names; a folder URL: those of
    ``split`` its manifest (``manifest.json``, or ``urls.Place.manifest``) lists."""
    if urls.selected(source) is not None:
        paths = [x if urls.is_remote(x) else Path(x) for x in urls.expand(str(source))]
    else:
        where = urls.manifest_location(source, "manifest.json")
        try:
            listed = json.loads(urls.read_utf8(where))["shards"]
            paths = [urls.join(source, e["name"]) for e in listed
                     if split is None or e.get("split") == split]
        except (OSError, ValueError, KeyError, TypeError, KodalleError) as exc:
            raise KodalleError(
                f"{source}: cannot list its shards from {where} ({exc}); name them with a "
                "pattern (.../train-{000000..000009}.tar) or give --manifest") from None
    if not paths:
        raise KodalleError(f"no {split} shards in {source}")
    return paths


def iter_image_samples(
    source: str | Path | Sequence[str | Path],
    split: str | None = "train",
    *,
    decode: bool = True,
    shuffle_shards: bool = False,
    seed: int = 0,
    repeat: bool = False,
    split_by_worker: bool = True,
    limit: int | None = None,
    on_bad: Callable[[str, str, str], None] | None = None,
) -> Iterator[ImageSample]:
    """Yield the samples of image shards: key, PIL RGB image, caption and metadata.

    - ``decode=False`` yields the JPEG bytes instead of a PIL image (for a caller that
      decodes in its own workers or just copies them).
    - ``shuffle_shards``: visit shards in a random order drawn from ``seed`` (a new order
      for every pass when ``repeat``); samples inside a shard keep their order.
    - ``repeat``: loop forever (training); otherwise one pass.
    - ``split_by_worker``: inside a torch DataLoader worker or a torch.distributed process,
      read only this worker's share of the shards (shard ``i`` goes to worker
      ``i % total``); with fewer shards than workers some workers read nothing.
    - ``limit``: stop after this many samples (per worker).
    - ``on_bad(shard, key, reason)``: a sample without an image, an image that does not
      decode (with ``decode``) or a damaged tar (key: the last good one, or "") is passed
      to it and skipped; without it, such a sample is an error naming shard and key.

    For a fixed-size float batch, pass the images to
    :func:`kodalle_cli.data.images.to_tensor`.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander
    from webdataset.utils import pytorch_worker_info

    paths = [str(p) for p in shard_paths(source, split)]
    if split_by_worker:
        rank, world, worker, workers = pytorch_worker_info()
        total, index = world * workers, rank * workers + worker
        paths = paths[index::total]
    def bad(shard: str, key: str, reason: str) -> None:
        if on_bad is None:
            raise KodalleError(f"{shard}{': ' + key if key else ''}: {reason}")
        on_bad(shard, key, reason)

    rng = random.Random(seed)
    emitted = 0
    gone: set[str] = set()  # remote shards lost in an earlier pass: not tried again
    while True:
        order = [p for p in paths if p not in gone]
        if shuffle_shards:
            rng.shuffle(order)
        for path in order:
            try:
                stream = urls.open_stream(path)
            except urls.ShardLost as exc:  # retried: skipped with a warning, counted
                urls.lost(exc)
                gone.add(path)
                continue
            except OSError as exc:
                bad(path, "", f"unreadable tar from its start ({exc}); rest of shard skipped")
                continue
            with contextlib.closing(stream):  # a pipe: command ends with its shard
                samples = group_by_keys(tar_file_expander([{"url": path, "stream": stream}]))
                last = ""
                while True:
                    try:
                        sample = next(samples)
                    except StopIteration:
                        break
                    except urls.ShardLost as exc:  # retried: the rest is skipped, warned, counted
                        urls.lost(exc)
                        gone.add(path)
                        break
                    except Exception as exc:  # a truncated or damaged tar: the rest is lost
                        where = f"after {last}" if last else "from its start"
                        bad(path, last, f"unreadable tar {where} ({exc}); rest of shard skipped")
                        break
                    key = last = sample["__key__"]
                    data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
                    if data is None:
                        if on_bad is not None:
                            on_bad(path, key, f"no image (.{IMAGE_EXTENSION})")
                        continue
                    try:
                        image = _decoded(data) if decode else data
                        caption = sample.get("txt", b"").decode("utf-8")
                        meta = json.loads(sample["json"]) if "json" in sample else {}
                    except Exception as exc:  # PIL, UnicodeDecodeError, JSONDecodeError
                        bad(path, key, f"unreadable sample ({type(exc).__name__}: {exc})")
                        continue
                    yield ImageSample(key=key, image=image, caption=caption, meta=meta,
                                      shard=sample["__url__"])
                    emitted += 1
                    if limit is not None and emitted >= limit:
                        return
        if repeat and len(gone) == len(paths):
            raise KodalleError(f"every shard of {source} was lost (their streams kept "
                               "breaking; see the warnings)")
        if not repeat or not paths:
            return


def iter_shard_meta(tar: str | Path) -> Iterator[tuple[str, dict]]:
    """``(key, KEY.json)`` of every sample of one shard, in order; only the small JSON
    members are read (the images are skipped over). A member that is not a JSON object in
    UTF-8 is skipped."""
    with tarfile.open(tar, "r") as archive:
        for member in archive:
            if not member.isfile() or not member.name.endswith(".json"):
                continue
            fh = archive.extractfile(member)
            if fh is None:
                continue
            try:
                meta = json.loads(fh.read().decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(meta, dict):
                yield member.name[: -len(".json")], meta


def read_image(tar: str | Path, key: str, *, decode: bool = True):
    """The image of ``key`` in one shard: PIL RGB (its bytes with ``decode=False``); None
    when the shard, the sample or its image is missing or does not read."""
    try:
        with tarfile.open(tar, "r") as archive:
            names = set(archive.getnames())
            name = next((f"{key}.{e}" for e in IMAGE_EXTENSIONS if f"{key}.{e}" in names), None)
            member = archive.extractfile(name) if name else None
            data = member.read() if member else None
    except (KeyError, OSError, tarfile.TarError):
        return None
    if data is None or not decode:
        return data
    try:
        return _decoded(data)
    except Exception:  # whatever PIL raises for bytes that are no image (as iter_image_samples)
        return None


def _decoded(jpg: bytes):
    """The RGB image of JPEG (or any PIL-readable) bytes, fully decoded."""
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as im:
        return im.convert("RGB")
