"""Token shards: captions as text ids and images as VQGAN codes, ready for training.

Layout (also in docs/architecture.md, "Formats on disk")::

    shards/tokens/train-000000.tar ...   KEY.ids.npy   int32 [text_seq_len], padded with pad_id
                                         KEY.codes.npy int16 [fmap*fmap] (int32 for codebooks
                                                       larger than 32767)
                                         KEY.txt       the caption, UTF-8
                                         KEY.styles.npy int32 [styles, text_seq_len]: the
                                                       caption in every style (K-Fashion
                                                       shards; ``train --caption-style``)
    shards/tokens/val-000000.tar ...
    shards/tokens/manifest.json          tokenizer hash, VQGAN identity, text_seq_len,
                                         pad_id, image grid, and every shard with its count

Writing: :class:`TokenShardsWriter`, the one writer of this format (each shard is written
under a temporary name and renamed when complete, then its ``*_stats.json`` when it has one;
the manifest is written last, so a killed run leaves no shard or manifest that looks
complete). Reading: :class:`TokenBatches`, an ``IterableDataset`` that
yields whole batches, split by distributed rank and data-loader worker, shuffled from a seed,
and resumable at any batch: the position is just the number of batches consumed.

Caption styles: token shards made from K-Fashion image shards hold each caption in every
style ``prepare`` can build (the manifest's ``caption_styles``). :class:`TokenBatches` reads
the caption ``prepare`` wrote (``as-prepared``), one style, or ``mixed``: a style drawn per
sample and epoch from ``(seed, epoch, shard)``, so that a resumed run reads what an
uninterrupted one would.

Damaged shards: :func:`check_shards` reads every shard once before training and checks each
sample against the manifest (ids of ``text_seq_len``, codes inside the codebook, whole
tars); bad samples are reported by shard and key and left out by every reader, and more
than ``max_bad_fraction`` of them is an error. What it found is cached (``cache``: the
run's ``shard_check.json``) by each shard's path, size and mtime, so a restart reads only
shards that are new or changed. :func:`check_vqgan` refuses shards that a VQGAN cannot
decode.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kodalle_cli.atomic import discard, rename_into_place, temp_path, write_json_atomic
from kodalle_cli.data import urls
from kodalle_cli.data.captions import CAPTION_STYLES
from kodalle_cli.data.shards import stats_path
from kodalle_cli.errors import KodalleError

MANIFEST = "manifest.json"
FORMAT = "kodalle-tokens"
SPLITS = ("train", "val")
AS_PREPARED, MIXED = "as-prepared", "mixed"
# `train --caption-style`: the shards' caption, a style drawn per sample and epoch, or one style
TRAIN_CAPTION_STYLES = (AS_PREPARED, MIXED, *CAPTION_STYLES)


# ---- identity --------------------------------------------------------------------------------
def files_hash(path: str | Path) -> str:
    """sha256 over a file, or over every file of a directory (relative names and contents)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise KodalleError(f"nothing to hash at {path}")
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def codes_dtype(num_image_tokens: int) -> np.dtype:
    """int16 when every code fits, else int32."""
    return np.dtype(np.int16) if num_image_tokens <= np.iinfo(np.int16).max + 1 else np.dtype(
        np.int32
    )


def pad_ids(ids, text_seq_len: int, pad_id: int) -> np.ndarray:
    """Truncate or right-pad a list of token ids to ``text_seq_len`` (int32)."""
    ids = list(ids)[:text_seq_len]
    return np.asarray(ids + [pad_id] * (text_seq_len - len(ids)), dtype=np.int32)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple] = {}  # header bytes -> (dtype, shape, fortran order)


def _npy_load(data: bytes) -> np.ndarray:
    """An ``.npy`` (no pickles); the few distinct headers of a shard are parsed once."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10 or data[6] != 1:
        return np.load(io.BytesIO(data), allow_pickle=False)
    offset = 10 + int.from_bytes(data[8:10], "little")
    head = data[:offset]
    info = _NPY_HEADERS.get(head)
    if info is None:
        fp = io.BytesIO(head)
        np.lib.format.read_magic(fp)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        if dtype.hasobject:
            raise ValueError("an .npy of Python objects (pickles are not loaded)")
        if len(_NPY_HEADERS) > 256:
            _NPY_HEADERS.clear()
        info = _NPY_HEADERS[head] = (dtype, shape, fortran)
    dtype, shape, fortran = info
    count = int(np.prod(shape))
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} data bytes, {count} x {dtype} expected")
    array = np.frombuffer(data, dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


# ---- writing ---------------------------------------------------------------------------------
@dataclass
class _OpenShard:
    writer: object  # webdataset.TarWriter
    tmp: Path
    final: Path
    count: int = 0


class TokenShardsWriter:
    """Write ``{train,val}-%06d.tar`` token shards and, on close, ``manifest.json``: the one
    writer of the token-shard format (``kodalle tokenize``, tests and benchmarks).

    Example::

        with TokenShardsWriter("shards/tokens", text_seq_len=128, num_image_tokens=16384,
                               image_fmap_size=16, pad_id=1, tokenizer_hash=h,
                               vqgan={"name": "imagenet-f16-16384", "hash": v}) as w:
            w.write("train", key, ids, codes, caption)

    ``ids`` must already be padded to ``text_seq_len`` (see :func:`pad_ids`); ``codes`` are
    the flattened fmap*fmap VQGAN indices. Shards are cut in one of two ways:

    - by count: :meth:`write` opens ``{split}-%06d.tar`` and starts the next one every
      ``shard_size`` samples;
    - by name (``shard_size=None``): :meth:`open_shard` starts a shard of a given name (in
      ``kodalle tokenize``, the name of the image shard it is made from) and
      :meth:`finish_shard` ends it, with a ``*_stats.json`` beside it when given stats (renamed
      last: it marks the shard finished for a resumed run); :meth:`add_finished` lists a
      shard that an earlier run finished.

    ``tokenizer`` (what made the ids) and ``extra`` are stored in the manifest as they are;
    ``extra`` may still be updated before :meth:`close`.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        text_seq_len: int,
        num_image_tokens: int,
        image_fmap_size: int,
        pad_id: int,
        tokenizer_hash: str,
        vqgan: dict,
        shard_size: int | None = 10000,
        tokenizer: dict | None = None,
        extra: dict | None = None,
        caption_styles: list[str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.caption_styles = list(caption_styles) if caption_styles else None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.text_seq_len = text_seq_len
        self.num_image_tokens = num_image_tokens
        self.image_fmap_size = image_fmap_size
        self.pad_id = pad_id
        self.tokenizer_hash = tokenizer_hash
        self.vqgan = dict(vqgan)
        self.tokenizer = dict(tokenizer) if tokenizer is not None else None
        self.shard_size = shard_size
        self.extra = dict(extra or {})
        self.codes_dtype = codes_dtype(num_image_tokens)
        self.shards: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self._open: dict[str, _OpenShard] = {}

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def open_shard(self, split: str, name: str | None = None) -> Path:
        """Start the next shard of ``split``, named ``name`` (default ``{split}-%06d.tar`` by
        count); it is written under a temporary name until :meth:`finish_shard`."""
        import webdataset as wds

        self._check_split(split)
        if split in self._open:
            raise ValueError(f"a {split} shard is already open")
        final = self.out_dir / (name or f"{split}-{len(self.shards[split]):06d}.tar")
        tmp = temp_path(final)
        self._open[split] = _OpenShard(wds.TarWriter(str(tmp), encoder=False, mtime=0.0), tmp,
                                       final)
        return final

    def write(self, split: str, key: str, ids, codes, caption: str, styles=None) -> None:
        """One sample; ``styles`` ([len(caption_styles), text_seq_len] ids) is required when
        the writer was given ``caption_styles`` and refused otherwise."""
        self._check_split(split)
        if "." in key:
            raise ValueError(f"shard keys contain no dots: {key!r}")
        ids = np.asarray(ids)
        if ids.shape != (self.text_seq_len,):
            raise ValueError(f"ids of {key} have shape {ids.shape}, want ({self.text_seq_len},)")
        if (styles is None) != (self.caption_styles is None):
            raise ValueError(f"{key}: styles are given exactly when the writer has "
                             "caption_styles")
        if styles is not None:
            styles = np.asarray(styles)
            want = (len(self.caption_styles), self.text_seq_len)
            if styles.shape != want:
                raise ValueError(f"styles of {key} have shape {styles.shape}, want {want}")
        codes = np.asarray(codes).reshape(-1)
        if codes.shape[0] != self.image_fmap_size**2:
            raise ValueError(f"codes of {key}: {codes.shape[0]} != {self.image_fmap_size}^2")
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_image_tokens):
            raise ValueError(f"codes of {key} out of range [0, {self.num_image_tokens})")
        if split not in self._open:
            self.open_shard(split)
        shard = self._open[split]
        sample = {
            "__key__": key,
            "ids.npy": _npy_bytes(ids.astype(np.int32)),
            "codes.npy": _npy_bytes(codes.astype(self.codes_dtype)),
            "txt": caption.encode("utf-8"),
        }
        if styles is not None:
            sample["styles.npy"] = _npy_bytes(styles.astype(np.int32))
        shard.writer.write(sample)
        shard.count += 1
        if self.shard_size is not None and shard.count >= self.shard_size:
            self.finish_shard(split)

    def finish_shard(self, split: str, stats: dict | None = None) -> dict:
        """Close the open shard of ``split`` and rename it into place, then write ``stats``
        (when given) to its ``*_stats.json``; returns its manifest entry."""
        shard = self._open.pop(split)
        try:
            shard.writer.close()
            rename_into_place(shard.tmp, shard.final)
        except BaseException:  # e.g. a full disk: no partial shard stays
            discard(shard.tmp)
            raise
        if stats is not None:
            write_json_atomic(stats_path(shard.final), stats)  # last: the shard is finished
        return self.add_finished(split, shard.final.name, shard.count)

    def add_finished(self, split: str, name: str, count: int) -> dict:
        """List a complete shard (one an earlier run wrote) in the manifest."""
        self._check_split(split)
        entry = {"name": name, "count": count}
        self.shards[split].append(entry)
        return entry

    def manifest(self) -> dict:
        """The manifest of the shards listed so far."""
        return {
            "format": FORMAT,
            "version": 1,
            "text_seq_len": self.text_seq_len,
            "pad_id": self.pad_id,
            "num_image_tokens": self.num_image_tokens,
            "image_fmap_size": self.image_fmap_size,
            "codes_dtype": self.codes_dtype.name,
            "tokenizer_hash": self.tokenizer_hash,
            "vqgan": self.vqgan,
            **({"tokenizer": self.tokenizer} if self.tokenizer is not None else {}),
            **({"caption_styles": self.caption_styles} if self.caption_styles else {}),
            "splits": {
                s: {"count": sum(x["count"] for x in v), "shards": v}
                for s, v in self.shards.items()
            },
            **self.extra,
        }

    def close(self) -> dict:
        """Finish the open shards and write ``manifest.json`` (last); returns the manifest."""
        for split in list(self._open):
            self.finish_shard(split)
        manifest = self.manifest()
        write_json_atomic(self.out_dir / MANIFEST, manifest)
        return manifest

    def abort(self) -> None:
        """Drop the open shards (nothing that looks complete is left)."""
        for shard in self._open.values():
            with contextlib.suppress(Exception):  # closing may fail again (a full disk)
                shard.writer.close()
            discard(shard.tmp)
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---- reading ---------------------------------------------------------------------------------
def read_manifest(root: str | Path | urls.Place) -> dict:
    """The manifest of token shards (one clear error when there is none): in a folder, in
    the same place as a URL, pattern or ``pipe:`` command, or given apart (``urls.Place``).
    A pattern keeps the manifest's shards it names."""
    path = urls.manifest_location(root, MANIFEST)
    if not urls.is_remote(path) and not Path(path).is_file():
        raise KodalleError(
            f"{root} has no {MANIFEST}: not a token-shard directory "
            "(run `kodalle tokenize` on image shards first, or pass --vqgan)"
        )
    try:
        manifest = json.loads(urls.read_utf8(path))
    except urls.ShardLost as exc:
        raise KodalleError(f"cannot read the token manifest {exc}: check the address, or "
                           "give the manifest with --manifest") from None
    except (OSError, ValueError) as exc:
        raise KodalleError(f"{path} is unreadable ({exc}): re-run `kodalle tokenize`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KodalleError(f"{path} is not a kodalle token manifest")
    missing = [k for k in ("text_seq_len", "num_image_tokens", "image_fmap_size", "splits")
               if k not in manifest]
    if missing:
        raise KodalleError(f"{path} lacks {', '.join(missing)}: re-run `kodalle tokenize`")
    picked = urls.selected(root)
    if picked is not None and isinstance(manifest["splits"], dict):  # a pattern: its shards
        manifest["splits"] = {
            split: {"count": sum(int(e["count"]) for e in kept), "shards": kept}
            for split, info in manifest["splits"].items()
            for kept in [[e for e in info.get("shards", []) if e.get("name") in picked]]}
    return manifest


_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # KEY.SUFFIX, as webdataset groups them
_FILE_TYPES = (b"0", b"\0", b"7")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for big numbers
        return int.from_bytes(field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    return int(text, 8) if text else 0


def _tar_members(data: bytes):
    """(name, bytes) of each file in an (uncompressed) tar held in memory; raises ValueError
    where the tar is damaged or cut. Reads ustar, GNU long names and pax paths."""
    pos, end, long_name = 0, len(data), None
    while pos + 512 <= end:
        header = data[pos:pos + 512]
        if header.count(0) == 512:
            return
        if _octal(header[148:156]) != sum(header) - sum(header[148:156]) + 256:
            raise ValueError(f"a damaged tar header at byte {pos}")
        size, kind = _octal(header[124:136]), header[156:157]
        start = pos + 512
        if start + size > end:
            raise ValueError(f"the tar ends inside a member (byte {end})")
        body = data[start:start + size]
        pos = start + (size + 511) // 512 * 512
        if kind == b"L":  # GNU long name of the next member
            long_name = body.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == b"x":  # pax header of the next member: "LEN path=NAME\n" records
            for record in body.decode("utf-8", "replace").split("\n"):
                key, _, value = record.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
            continue
        if kind not in _FILE_TYPES:
            long_name = None if kind != b"g" else long_name
            continue
        name = long_name or header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if long_name is None and header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        long_name = None
        yield name, body
    if data[pos:].strip(b"\0"):
        raise ValueError(f"the tar ends inside a header (byte {end})")


def _tar_samples(path: Path) -> tuple[list[dict], str | None]:
    """The samples of a tar in file order (``{"__key__", SUFFIX: bytes}``), and why reading
    stopped early (a missing, truncated or damaged tar), or None. A sample cut by the
    damage is left out."""
    samples: list[dict] = []
    current: dict | None = None
    try:
        data = urls.read_bytes(path)  # a remote one retried, then urls.ShardLost
        for name, body in _tar_members(data):
            match = _MEMBER.match(name)
            if match is None:
                continue
            key, suffix = match.groups()
            if current is None or current["__key__"] != key:
                if current is not None:
                    samples.append(current)
                current = {"__key__": key}
            current[suffix] = body
    except (OSError, ValueError) as exc:
        return samples, f"unreadable after {len(samples)} samples ({exc})"
    if current is not None:
        samples.append(current)
    return samples, None


def _parse(raw: dict, manifest: dict, num_text_tokens: int | None) -> tuple[dict | None, str]:
    """A token sample, checked against the manifest (and the model's vocabulary), or
    ``(None, why it is bad)``."""
    styles_wanted = len(manifest.get("caption_styles") or ())
    try:
        ids = _npy_load(raw["ids.npy"]) if "ids.npy" in raw else None
        codes = _npy_load(raw["codes.npy"]) if "codes.npy" in raw else None
        styles = _npy_load(raw["styles.npy"]) if styles_wanted and "styles.npy" in raw else None
    except (ValueError, OSError, EOFError) as exc:
        return None, f"unreadable .npy ({exc})"
    if ids is None or codes is None:
        return None, "no ids.npy" if ids is None else "no codes.npy"
    length, n_codes = manifest["text_seq_len"], manifest["image_fmap_size"] ** 2
    vocab, codebook = num_text_tokens, manifest["num_image_tokens"]
    if not (np.issubdtype(ids.dtype, np.integer) and np.issubdtype(codes.dtype, np.integer)):
        return None, f"ids/codes of type {ids.dtype}/{codes.dtype}, not integers"
    if ids.shape != (length,):
        return None, f"ids.npy has shape {ids.shape}, the manifest says ({length},)"
    if codes.shape != (n_codes,):
        return None, f"codes.npy has shape {codes.shape}, the manifest says ({n_codes},)"
    if ids.min() < 0 or (vocab is not None and ids.max() >= vocab):
        return None, f"text ids outside the vocabulary [0, {vocab}): {ids.min()}..{ids.max()}"
    if codes.min() < 0 or codes.max() >= codebook:
        return None, (f"{OUT_OF_RANGE} [0, {codebook}): "
                      f"{codes.min()}..{codes.max()}")
    if styles_wanted:
        if styles is None:
            return None, "no styles.npy (the manifest lists caption styles)"
        if not np.issubdtype(styles.dtype, np.integer) or styles.shape != (styles_wanted,
                                                                             length):
            return None, (f"styles.npy has shape {styles.shape} ({styles.dtype}), the manifest "
                          f"says ({styles_wanted}, {length})")
        if styles.min() < 0 or (vocab is not None and styles.max() >= vocab):
            return None, (f"styles.npy ids outside the vocabulary [0, {vocab}): "
                          f"{styles.min()}..{styles.max()}")
    try:
        text = raw["txt"].decode("utf-8") if "txt" in raw else ""
    except UnicodeDecodeError:
        return None, "txt is not UTF-8"
    sample = {"key": raw["__key__"], "ids": ids.astype(np.int64),
              "codes": codes.astype(np.int64), "txt": text}
    if styles is not None:
        sample["styles"] = styles.astype(np.int64)
    return sample, ""


@dataclass
class BadSample:
    shard: str
    key: str  # "" when the samples of a damaged tar cannot be named
    reason: str


def good_samples(path: str | Path, manifest: dict, *, expected: int | None = None,
                 num_text_tokens: int | None = None) -> tuple[list[dict], list[BadSample]]:
    """The samples of one token shard that fit ``manifest`` (and a vocabulary of
    ``num_text_tokens``), in file order, and the bad ones with their reasons; ``expected``
    (the manifest's count) turns samples lost to a truncated tar into bad ones too."""
    path = path if urls.is_remote(path) else Path(path)
    raws, damage = _tar_samples(path)
    good, bad = [], []
    for raw in raws:
        sample, why = _parse(raw, manifest, num_text_tokens)
        if sample is None:
            bad.append(BadSample(urls.name(path), raw["__key__"], why))
        else:
            good.append(sample)
    lost = (expected - len(raws)) if expected is not None else 0
    if damage is not None or lost > 0:
        why = damage or "the tar ends early"
        if not urls.exists(path):
            why = "the file is missing"
        after = f"after {raws[-1]['__key__']}" if raws else "from its start"
        bad.extend(BadSample(urls.name(path), "", f"sample lost {after}: {why}")
                   for _ in range(max(lost, 1 if damage else 0)))
    return good, bad


def read_shard(path: str | Path) -> list[dict]:
    """Every sample of one token shard: {"key", "ids" int64 [T], "codes" int64 [N], "txt"}
    and "styles" int64 [S, T] when it has them (no checks: see :func:`good_samples`)."""
    raws, damage = _tar_samples(path)
    if damage is not None:
        raise KodalleError(f"{path} is {damage}")
    samples = []
    for raw in raws:
        samples.append({
            "key": raw["__key__"],
            "ids": _npy_load(raw["ids.npy"]).astype(np.int64),
            "codes": _npy_load(raw["codes.npy"]).astype(np.int64),
            "txt": raw["txt"].decode("utf-8") if "txt" in raw else "",
            **({"styles": _npy_load(raw["styles.npy"]).astype(np.int64)}
               if "styles.npy" in raw else {}),
        })
    return samples


OUT_OF_RANGE = "codes outside the VQGAN's codebook"  # the reason of such a bad sample
CHECK_CACHE = "shard_check.json"  # in the run directory: what check_shards found per shard
CHECK_MODES = ("full", "new", "off")
_CHECK_VERSION = 1
WORKER_STREAMS = "worker_streams"  # a worker's batch: (worker id, its urls.StreamStats)


@dataclass
class SplitCheck:
    """What :func:`check_shards` found in one split."""

    counts: dict[str, int]  # shard name -> good samples
    listed: int  # samples the manifest lists
    bad: list[BadSample]
    out_of_range: dict[str, int] = field(default_factory=dict)  # shard -> such bad samples
    read: int = 0  # shards read by this check
    reused: int = 0  # shards whose cached result was taken (unchanged since)
    lost: list[str] = field(default_factory=list)  # remote shards whose stream broke: skipped

    @property
    def good(self) -> int:
        return sum(self.counts.values())

    def metrics(self, split: str) -> dict[str, int]:
        """What metrics.csv records: skipped samples, remote shards skipped because their
        stream broke, and samples with codes outside the codebook in all and per shard
        (``{split}_out_of_range/{shard}``)."""
        out = {f"{split}_skipped": len(self.bad), f"{split}_shards_lost": len(self.lost),
               f"{split}_out_of_range": sum(self.out_of_range.values())}
        out.update({f"{split}_out_of_range/{name}": n
                    for name, n in sorted(self.out_of_range.items()) if n})
        return out


def _check_context(manifest: dict, num_text_tokens: int | None) -> dict:
    """What a cached result depends on besides the shard's bytes."""
    return {"version": _CHECK_VERSION, "text_seq_len": manifest["text_seq_len"],
            "num_image_tokens": manifest["num_image_tokens"],
            "image_fmap_size": manifest["image_fmap_size"], "num_text_tokens": num_text_tokens}


def read_check_cache(path: Path, context: dict) -> dict[str, dict]:
    """The cached results by shard path (empty when missing, damaged or made for another
    manifest or vocabulary)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("context") != context:
        return {}
    shards = data.get("shards")
    return shards if isinstance(shards, dict) else {}


def _cached_result(entry, stamp: dict | None, expected: int) -> dict | None:
    if not isinstance(entry, dict) or stamp is None:
        return None
    # a local file's size and mtime, an HTTP one's size and ETag or Last-Modified (urls.stamp)
    if entry.get("expected") != expected or any(entry.get(k) != v for k, v in stamp.items()):
        return None
    if not isinstance(entry.get("good"), int) or not isinstance(entry.get("bad"), list):
        return None
    return entry


def check_shards(root: str | Path, *, num_text_tokens: int | None = None,
                 max_bad_fraction: float = 0.01, splits: tuple[str, ...] = SPLITS,
                 report=None, mode: str = "full", cache: str | Path | None = None,
                 write_cache: bool = True) -> dict[str, SplitCheck]:
    """Check every token shard's samples against the manifest before training: ids of
    ``text_seq_len`` within the vocabulary, ``fmap*fmap`` codes within the codebook, whole
    tars. Bad samples are reported (``report(message)``, default a warning naming shard and
    key) and left out by the readers; more than ``max_bad_fraction`` of a split bad is an
    error. Returns the good counts that :class:`TokenBatches` takes.

    ``mode`` (``--check-shards``): ``full`` reads every shard; ``new`` takes the result
    ``cache`` holds for a shard whose path, size and mtime are unchanged (and the manifest
    and vocabulary the same) and reads the others; ``off`` reads nothing and trusts the
    manifest's counts (a shard that turns out bad stops training when it is reached).
    ``cache`` (a JSON file, e.g. the run's :data:`CHECK_CACHE`) is rewritten with what was
    found, good and bad counts, the bad keys and their reasons, and the samples with codes
    outside the codebook, unless ``write_cache`` is False (DDP ranks but 0)."""
    from kodalle_cli.atomic import write_json_atomic
    from kodalle_cli.errors import ConfigError, warn

    if mode not in CHECK_MODES:
        raise ConfigError("check_shards", mode, f"must be one of {', '.join(CHECK_MODES)}")
    report = report or warn
    root = root if isinstance(root, urls.Place) or urls.is_remote(root) else Path(root)
    manifest = read_manifest(root)
    context = _check_context(manifest, num_text_tokens)
    cache = Path(cache) if cache is not None else None
    old = read_check_cache(cache, context) if cache is not None and mode == "new" else {}
    found: dict[str, dict] = {}
    checks = {}
    try:
        for split in splits:
            listed = manifest["splits"].get(split, {"shards": []})["shards"]
            check = SplitCheck({}, sum(int(e["count"]) for e in listed), [])
            for entry in listed:
                name, expected = entry["name"], int(entry["count"])
                if mode == "off":
                    check.counts[name] = expected
                    continue
                path = urls.join(root, name)
                key = urls.cache_key(path)  # a URL: itself; pipe: has no stamp, never cached
                stamp = urls.stamp(path)  # before reading: a shard changed meanwhile is read again
                cached = _cached_result(old.get(key), stamp, expected)
                if cached is not None:
                    good = cached["good"]
                    wrong = [BadSample(name, str(b.get("key", "")), str(b.get("reason", "")))
                             for b in cached["bad"] if isinstance(b, dict)]
                    check.reused += 1
                else:
                    try:
                        samples, wrong = good_samples(path, manifest, expected=expected,
                                                      num_text_tokens=num_text_tokens)
                    except urls.ShardLost as exc:  # retried: skipped, warned, counted
                        urls.lost(exc, report)
                        check.lost.append(exc.url)
                        check.counts[name] = 0
                        continue
                    good = len(samples)
                    check.read += 1
                check.counts[name] = good
                check.bad.extend(wrong)
                check.out_of_range[name] = sum(b.reason.startswith(OUT_OF_RANGE) for b in wrong)
                if stamp is not None:
                    found[key] = {**stamp, "name": name, "expected": expected, "good": good,
                                  "bad_count": len(wrong), "out_of_range": check.out_of_range[name],
                                  "bad": [{"key": b.key, "reason": b.reason} for b in wrong]}
            checks[split] = check
            bad = check.bad
            shown = 20
            for b in bad[:shown]:
                report(f"{urls.join(root, b.shard)}{': ' + b.key if b.key else ''}: {b.reason}; "
                       "skipped")
            if len(bad) > shown:
                report(f"{len(bad) - shown} more bad {split} samples in {root}; skipped")
            if bad and len(bad) > max_bad_fraction * max(check.listed, 1):
                raise KodalleError(
                    f"{len(bad)} of {check.listed} {split} samples in {root} are bad (more than "
                    f"--max-bad-fraction {max_bad_fraction:g}; first: {bad[0].shard}"
                    f"{' ' + bad[0].key if bad[0].key else ''}: {bad[0].reason}): re-run "
                    "`kodalle tokenize`, or allow more with --max-bad-fraction"
                )
    finally:  # what was found stays found, a refused run included
        if cache is not None and write_cache and mode != "off":
            with contextlib.suppress(OSError):  # a cache that cannot be written: checked again
                write_json_atomic(cache, {"context": context, "root": urls.cache_key(str(root)),
                                          "shards": found})
    return checks


def manifest_downsample_factor(manifest: dict) -> int | None:
    """The downsampling factor of the VQGAN that made a token manifest's codes (older
    manifests: their image size over their grid), None when not recorded."""
    recorded = manifest.get("vqgan") if isinstance(manifest.get("vqgan"), dict) else {}
    if isinstance(recorded.get("downsample_factor"), int):
        return recorded["downsample_factor"]
    size, grid = recorded.get("image_size"), recorded.get("fmap_size")
    if isinstance(size, int) and isinstance(grid, int) and grid > 0 and size % grid == 0:
        return size // grid
    return None


def check_vqgan(manifest: dict, vqgan, where: str | Path, what: str = "the VQGAN") -> None:
    """Refuse token shards that ``vqgan`` cannot decode: another codebook size or
    downsampling factor, or (when the manifest records one) another VQGAN's identity. The
    grid is the shards'; the resolution the VQGAN was trained at does not matter."""
    recorded = manifest.get("vqgan") or {}
    factor = manifest_downsample_factor(manifest)
    if manifest["num_image_tokens"] > vqgan.num_tokens or (
            factor is not None and factor != vqgan.downsample_factor):
        raise KodalleError(
            f"the token shards in {where} hold codes of a {manifest['num_image_tokens']}-entry "
            f"codebook{f' (downsampled by {factor})' if factor else ''} but {what} has "
            f"{vqgan.num_tokens} entries and downsamples by {vqgan.downsample_factor}: re-run "
            "`kodalle tokenize` with it"
        )
    if recorded.get("hash") and recorded["hash"] != vqgan.identity():
        raise KodalleError(
            f"the token shards in {where} were made with another VQGAN than {what}: re-run "
            "`kodalle tokenize` with it, or train with the VQGAN the shards name"
        )


MIXED_INDEX = -1  # style_index of `mixed`


def style_index(manifest: dict, caption_style: str, where: str | Path) -> int | None:
    """What ``train --caption-style`` reads: None (the caption ``prepare`` wrote), the index
    of one of the manifest's ``caption_styles``, or :data:`MIXED_INDEX`; one line for a style
    these shards cannot give."""
    if caption_style not in TRAIN_CAPTION_STYLES:
        raise KodalleError(f"--caption-style must be one of {', '.join(TRAIN_CAPTION_STYLES)}, "
                           f"not {caption_style!r}")
    if caption_style == AS_PREPARED:
        return None
    styles = manifest.get("caption_styles") or []
    if not styles:
        raise KodalleError(
            f"--caption-style {caption_style}: the token shards in {where} hold one caption per "
            "sample; caption styles need K-Fashion image shards (`kodalle prepare --format "
            "kfashion`) tokenized by this version of `kodalle tokenize`")
    if caption_style == MIXED:
        return MIXED_INDEX
    if caption_style not in styles:
        raise KodalleError(f"--caption-style {caption_style}: the token shards in {where} hold "
                           f"{', '.join(styles)}")
    return styles.index(caption_style)


@dataclass
class _Shard:
    path: Path | str  # a URL or pipe: command for remote shards
    count: int


class TokenBatches(torch.utils.data.IterableDataset):
    """An endless, seeded stream of batches for one rank: ``{"ids": [B,T], "codes": [B,N]}``.

    The global sample order depends only on ``seed``: epoch ``e`` visits the shards in a
    permutation drawn from ``(seed, e)`` and each shard's samples in a permutation drawn from
    ``(seed, e, shard)``. The stream is split between ``S = world_size * num_workers`` slots
    (one per rank and data-loader worker): by whole shards when there are at least S of them,
    else by sample index (slot ``i`` keeps samples ``i, i+S, ...``). Each slot yields whole
    batches and the ``DataLoader`` (``batch_size=None``) takes them round-robin, so the
    position of a rank is only ``start_batch``, the number of batches it has consumed:
    resuming skips exactly those, cheaply (whole epochs and shards by count).

    Samples that do not fit the manifest (see :func:`good_samples`) are left out: pass
    ``counts``, the good samples per shard from :func:`check_shards`, so that positions
    count good samples only (without it, a shard must hold what the manifest says).

    ``caption_style`` (see :data:`TRAIN_CAPTION_STYLES`): which caption of a sample is read;
    ``mixed`` draws one of the manifest's ``caption_styles`` per sample and epoch from
    ``(seed, epoch, shard)``, independent of ranks and workers.

    In a data-loader worker, each batch also carries :data:`WORKER_STREAMS`: the worker's id
    and what its remote reads met so far (:class:`kodalle_cli.data.urls.StreamStats`).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        shuffle: bool = True,
        counts: dict[str, int] | None = None,
        num_text_tokens: int | None = None,
        caption_style: str = AS_PREPARED,
    ):
        super().__init__()
        self.root = root if isinstance(root, urls.Place) or urls.is_remote(root) else Path(root)
        self.manifest = read_manifest(root)
        self.style_index = style_index(self.manifest, caption_style, root)
        info = self.manifest["splits"].get(split, {"shards": []})
        counts = counts or {}
        self.shards = [_Shard(urls.join(self.root, s["name"]),
                              int(counts.get(s["name"], s["count"])))
                       for s in info["shards"]]
        self.num_text_tokens = num_text_tokens
        self.shards = [s for s in self.shards if s.count > 0]
        if not self.shards:
            raise KodalleError(f"{root}: no {split} samples")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.shuffle = shuffle
        self.split = split

    def __len__(self) -> int:  # samples per epoch, all ranks together
        return sum(s.count for s in self.shards)

    # -- the order -------------------------------------------------------------------------
    def _shard_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.shards)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def _sample_order(self, epoch: int, shard: int) -> np.ndarray:
        n = self.shards[shard].count
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, shard]).permutation(n)

    def _styles(self, epoch: int, shard: int) -> np.ndarray | None:
        """Per sample of ``shard`` (file order): the index of the caption style read in
        ``epoch``, or None for the caption ``prepare`` wrote."""
        if self.style_index is None:
            return None
        n = self.shards[shard].count
        if self.style_index == MIXED_INDEX:
            k = len(self.manifest["caption_styles"])
            return np.random.default_rng([self.seed, epoch, shard, 1]).integers(k, size=n)
        return np.full(n, self.style_index)

    def _plan(self, epoch: int, slot: int, slots: int) -> list[tuple[int, np.ndarray]]:
        """(shard, positions within the shuffled shard) that this slot reads in ``epoch``."""
        order = self._shard_order(epoch)
        if len(self.shards) >= slots:
            return [(s, np.arange(self.shards[s].count)) for s in order[slot::slots]]
        plan, start = [], 0
        for s in order:
            n = self.shards[s].count
            first = (slot - start) % slots  # first local index i with (start + i) % slots == slot
            plan.append((s, np.arange(first, n, slots)))
            start += n
        return plan

    def _samples(self, slot: int, slots: int, skip: int):
        epoch = 0
        while True:
            plan = self._plan(epoch, slot, slots)
            length = sum(len(p) for _, p in plan)
            if length == 0:
                raise KodalleError(
                    f"{self.root}: too few samples for {slots} ranks x data-loader workers"
                )
            if skip >= length:
                skip -= length
                epoch += 1
                continue
            read, lost = False, []  # a stream whose every shard is lost must not spin
            for shard, positions in plan:
                if skip >= len(positions):
                    skip -= len(positions)
                    read = True
                    continue
                try:
                    samples, _ = good_samples(self.shards[shard].path, self.manifest,
                                              num_text_tokens=self.num_text_tokens)
                except urls.ShardLost as exc:  # retried: skipped with a warning, counted
                    urls.lost(exc)
                    lost.append(exc.url)
                    skip = 0
                    continue
                read = True
                if len(samples) != self.shards[shard].count:
                    raise KodalleError(
                        f"{self.shards[shard].path} has {len(samples)} good samples, "
                        f"{self.shards[shard].count} were expected: it changed since it was "
                        "checked, or it is damaged (train checks the shards first)"
                    )
                order = self._sample_order(epoch, shard)
                styles = self._styles(epoch, shard)
                for i in positions[skip:]:
                    sample = samples[order[i]]
                    if styles is not None:
                        sample = {**sample, "ids": sample["styles"][styles[order[i]]]}
                    yield sample
                skip = 0
            if lost and not read:
                raise KodalleError(
                    f"{self.root}: every {self.split} shard one data stream reads broke off "
                    f"({len(lost)} lost, first {lost[0]}): nothing left to read"
                )
            epoch += 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if info is not None:  # Ctrl-C reaches the whole process group: the trainer decides
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            urls.STATS = urls.StreamStats()  # this worker's own; sent with each batch
        # The DataLoader takes batch j of this iteration from worker j % workers, so batch
        # i = start_batch + j of the rank comes from stream i % workers: worker w plays
        # stream (w + start_batch) % workers, which has already given `done` batches.
        stream_id = (worker + self.start_batch) % workers
        slots, slot = self.world_size * workers, self.rank * workers + stream_id
        done = (self.start_batch - stream_id + workers - 1) // workers
        stream = self._samples(slot, slots, done * self.batch_size)
        while True:
            batch = [next(stream) for _ in range(self.batch_size)]
            out = {
                "ids": torch.from_numpy(np.stack([s["ids"] for s in batch])),
                "codes": torch.from_numpy(np.stack([s["codes"] for s in batch])),
            }
            if info is not None:  # remote streams reopened and shards skipped in this worker
                out[WORKER_STREAMS] = (worker, urls.STATS.copy())
            yield out


def iter_split(root: str | Path, split: str = "val", limit: int | None = None,
               num_text_tokens: int | None = None):
    """The good samples of a split in file order (for validation and fixed sample captions);
    bad ones (see :func:`check_shards`, which reports them) are left out."""
    manifest = read_manifest(root)
    n = 0
    for shard in manifest["splits"].get(split, {"shards": []})["shards"]:
        try:
            samples = good_samples(urls.join(root, shard["name"]), manifest,
                                   num_text_tokens=num_text_tokens)[0]
        except urls.ShardLost as exc:  # retried: skipped with a warning, counted
            urls.lost(exc)
            continue
        for sample in samples:
            if limit is not None and n >= limit:
                return
            yield sample
            n += 1
