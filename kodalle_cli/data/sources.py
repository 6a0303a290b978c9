"""Readers that turn a source (K-Fashion tree, image folder, jsonl/csv manifest) into candidates.

A :class:`Candidate` is one would-be sample: a key, an image path and either a caption or a
K-Fashion label path (read, captioned and checked later, in the shard workers). Problems found
while scanning (invalid JSON, a label whose image is missing, an image without a label, a
path escaping the source directory, an empty caption) come back as :class:`Skip` records.
Everything is returned in a deterministic order.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kodalle_cli.data.kfashion import LabelError, image_file_name, is_label, read_label
from kodalle_cli.errors import KodalleError, UsageError

FORMATS = ("auto", "kfashion", "folder", "jsonl", "csv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_FIELDS = ("image", "image_path", "file", "path", "filepath", "file_name")
CAPTION_FIELDS = ("caption", "text", "txt", "prompt")
_KEY_UNSAFE = re.compile(r"[^\w\-]+")


@dataclass(frozen=True)
class Candidate:
    key: str
    image: str  # absolute path
    source: str  # what a user recognises: path relative to the source
    caption: str | None = None  # folder/jsonl/csv: the caption
    label: str | None = None  # kfashion: absolute path of the label JSON


@dataclass(frozen=True)
class Skip:
    source: str
    reason: str

    def as_dict(self) -> dict:
        return {"source": self.source, "reason": self.reason}


def sanitize_key(text: str) -> str:
    """A WebDataset key: no dots, no slashes, nothing but word characters and dashes."""
    key = _KEY_UNSAFE.sub("_", text).strip("_")
    return key or "sample"


def _walk(root: Path, exclude: Path | None = None) -> list[Path]:
    """Every file under ``root`` (symlinked folders not followed, hidden ones and ``exclude``
    skipped), in sorted order."""
    skip = exclude.resolve() if exclude is not None else None
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and (Path(dirpath) / d).resolve() != skip
        )
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def inside(path: str, root: Path) -> Path | None:
    """``root / path`` when it stays inside ``root`` (lexically), else None."""
    if not path or os.path.isabs(path) or re.match(r"^[A-Za-z]:", path):
        return None
    normal = os.path.normpath(path.replace("\\", "/"))
    if normal == ".." or normal.startswith("../") or normal.startswith("/"):
        return None
    return root / normal


def _unique_keys(items: list[tuple[str, Path, Path]]) -> list[str]:
    """Keys from stems; a stem seen twice falls back to the relative path without suffix."""
    stems = defaultdict(int)
    for stem, _, _ in items:
        stems[stem] += 1
    return [
        sanitize_key(stem if stems[stem] == 1 else path.relative_to(root).with_suffix("").as_posix())
        for stem, path, root in items
    ]


def detect_format(source: Path, exclude: Path | None = None) -> str:
    """Guess the format of ``source`` (a directory or a manifest file)."""
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        if suffix in (".csv", ".tsv"):
            return "csv"
        raise UsageError(f"cannot tell the format of {source}: use --format jsonl|csv")
    files = _walk(source, exclude)
    suffixes = {f.suffix.lower() for f in files}
    for f in files:
        if f.suffix.lower() == ".json":
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if is_label(data):
                return "kfashion"
    if ".txt" in suffixes and suffixes & set(IMAGE_EXTENSIONS):
        return "folder"
    top = sorted(p for p in source.iterdir() if p.is_file())
    for f in top:
        if f.suffix.lower() in (".jsonl", ".ndjson"):
            return "jsonl"
        if f.suffix.lower() in (".csv", ".tsv"):
            return "csv"
    if any(f.suffix.lower() == ".json" for f in files):
        return "kfashion"
    raise KodalleError(
        f"cannot tell the format of {source}: no K-Fashion labels, image+txt pairs or manifest "
        "found (use --format)"
    )


def manifest_path(source: Path, fmt: str) -> Path:
    if source.is_file():
        return source
    exts = (".jsonl", ".ndjson", ".json") if fmt == "jsonl" else (".csv", ".tsv")
    found = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if not found:
        raise KodalleError(f"no {fmt} manifest in {source}")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UsageError(f"several {fmt} manifests in {source} ({names}): name one")
    return found[0]


# ---- kfashion --------------------------------------------------------------------------------
def label_image_name(label_path: str) -> tuple[str | None, str | None]:
    """(``이미지 정보.이미지 파일명`` or None, error) for one label file. Runs in workers."""
    try:
        return image_file_name(read_label(label_path)), None
    except LabelError as exc:
        return None, str(exc)


def scan_kfashion(
    root: Path,
    map_fn: Callable[[Callable, Iterable], Iterable] = map,
    exclude: Path | None = None,
) -> tuple[list[Candidate], list[Skip]]:
    """Pair every label JSON below ``root`` with its image: the file named in
    ``이미지 정보.이미지 파일명`` when it exists, else the image with the label's stem."""
    files = _walk(root, exclude)
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    labels = [f for f in files if f.suffix.lower() == ".json"]
    by_name: dict[str, Path] = {}
    by_stem: dict[str, Path] = {}
    for img in images:  # sorted: the first of equal names wins
        by_name.setdefault(img.name, img)
        by_stem.setdefault(img.stem, img)
    skips: list[Skip] = []
    paired: dict[Path, Path] = {}  # image -> label
    broken: set[str] = set()
    results = map_fn(label_image_name, [str(p) for p in labels])
    for label, (name, error) in zip(labels, results, strict=True):
        rel = _rel(label, root)
        if error:
            skips.append(Skip(rel, error))
            broken.add(label.stem)  # its image is not reported a second time
            continue
        image = None
        if name:
            if "/" in name or "\\" in name:
                joined = f"{label.parent.relative_to(root).as_posix()}/{name}"
                target = None if os.path.isabs(name) else inside(joined, root)
                if target is None:
                    skips.append(Skip(rel, f"image path {name!r} escapes the source directory"))
                    continue
                image = target if target.is_file() else None
            else:
                image = by_name.get(name)
        image = image or by_stem.get(label.stem)
        if image is None:
            skips.append(Skip(rel, "the label's image is missing"))
            continue
        if image in paired:
            skips.append(Skip(rel, f"image {_rel(image, root)} already has a label"))
            continue
        paired[image] = label
    for img in images:
        if img not in paired and img.stem not in broken:
            skips.append(Skip(_rel(img, root), "image has no label"))
    items = sorted(paired.items())
    keys = _unique_keys([(img.stem, img, root) for img, _ in items])
    cands = [
        Candidate(key, str(img), _rel(img, root), label=str(lbl))
        for key, (img, lbl) in zip(keys, items, strict=True)
    ]
    return cands, skips


# ---- folder ----------------------------------------------------------------------------------
def _read_caption_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8-sig")
    return [line.strip() for line in text.splitlines() if line.strip()]


def scan_folder(
    root: Path, pick: str = "all", exclude: Path | None = None
) -> tuple[list[Candidate], list[Skip]]:
    """``stem.jpg|png|jpeg|webp`` beside ``stem.txt``; each caption line a sample (``all``)
    or only the first line (``first``)."""
    if pick not in ("first", "all"):
        raise UsageError(f"--caption-pick must be first or all, not {pick!r}")
    files = _walk(root, exclude)
    texts = {f.with_suffix(""): f for f in files if f.suffix.lower() == ".txt"}
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    skips: list[Skip] = []
    used = set()
    pairs: list[tuple[Path, list[str]]] = []
    for img in images:
        txt = texts.get(img.with_suffix(""))
        if txt is None:
            skips.append(Skip(_rel(img, root), "image has no caption file"))
            continue
        used.add(txt)
        try:
            lines = _read_caption_lines(txt)
        except (OSError, UnicodeDecodeError) as exc:
            skips.append(Skip(_rel(txt, root), f"unreadable caption file: {exc}"))
            continue
        if not lines:
            skips.append(Skip(_rel(img, root), "caption is empty"))
            continue
        pairs.append((img, lines if pick == "all" else lines[:1]))
    for txt in texts.values():
        if txt not in used:
            skips.append(Skip(_rel(txt, root), "caption file has no image"))
    keys = _unique_keys([(img.stem, img, root) for img, _ in pairs])
    cands = []
    for key, (img, lines) in zip(keys, pairs, strict=True):
        for i, line in enumerate(lines):
            k = key if len(lines) == 1 else f"{key}_{i}"
            cands.append(Candidate(k, str(img), _rel(img, root), caption=line))
    return cands, skips


# ---- jsonl / csv -----------------------------------------------------------------------------
def _field(row: dict, names: tuple[str, ...]) -> str | None:
    for n in names:
        if n in row and row[n] not in (None, ""):
            return str(row[n])
    return None


def scan_manifest(path: Path, fmt: str) -> tuple[list[Candidate], list[Skip]]:
    """A jsonl or csv manifest: one row per sample with an image path (relative to the
    manifest) and a caption (fields ``image``/``path``/``file`` and ``caption``/``text``)."""
    root = path.parent
    rows: list[tuple[str, dict | None, str | None]] = []  # (where, row, error)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            if fmt == "jsonl":
                for i, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    where = f"{path.name}:{i}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        rows.append((where, None, f"invalid JSON: {exc.msg}"))
                        continue
                    if not isinstance(row, dict):
                        rows.append((where, None, "invalid row: not a JSON object"))
                        continue
                    rows.append((where, row, None))
            else:
                dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
                for i, row in enumerate(csv.DictReader(fh, dialect=dialect), 2):
                    rows.append((f"{path.name}:{i}", row, None))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise KodalleError(f"cannot read manifest {path}: {exc}") from None
    skips: list[Skip] = []
    found: list[tuple[Path, str, str]] = []
    for where, row, error in rows:
        if error:
            skips.append(Skip(where, error))
            continue
        image = _field(row, IMAGE_FIELDS)
        caption = _field(row, CAPTION_FIELDS)
        if image is None:
            skips.append(Skip(where, f"row has no image path (one of {', '.join(IMAGE_FIELDS)})"))
            continue
        target = inside(image, root)
        if target is None:
            skips.append(Skip(where, f"image path {image!r} escapes the source directory"))
            continue
        caption = " ".join((caption or "").split())
        if not caption:
            skips.append(Skip(where, "caption is empty"))
            continue
        found.append((target, caption, where))
    keys = _unique_keys([(t.stem, t, root) for t, _, _ in found])
    seen: dict[str, int] = defaultdict(int)
    cands = []
    for key, (target, caption, _) in zip(keys, found, strict=True):
        n = seen[key]
        seen[key] += 1
        cands.append(Candidate(key if n == 0 else f"{key}_{n}", str(target), _rel(target, root),
                               caption=caption))
    return cands, skips


def scan(
    source: Path,
    fmt: str = "auto",
    caption_pick: str = "all",
    map_fn: Callable[[Callable, Iterable], Iterable] = map,
    exclude: Path | None = None,
) -> tuple[str, list[Candidate], list[Skip]]:
    """(format, candidates sorted by key, scan-time skips) for a source; ``exclude`` is a
    folder below the source that is not input (the output folder)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if not source.exists():
        raise KodalleError(f"source {source} does not exist")
    if source.is_dir() and not any(source.iterdir()):
        raise KodalleError(f"source {source} is empty")
    if fmt == "auto":
        fmt = detect_format(source, exclude)
    if fmt == "kfashion":
        if not source.is_dir():
            raise UsageError(f"--format kfashion needs a directory, not {source}")
        cands, skips = scan_kfashion(source, map_fn, exclude)
    elif fmt == "folder":
        if not source.is_dir():
            raise UsageError(f"--format folder needs a directory, not {source}")
        cands, skips = scan_folder(source, caption_pick, exclude)
    else:
        cands, skips = scan_manifest(manifest_path(source, fmt), fmt)
    # keys unique across the run (a stem shared by several manifest rows, say)
    counts: dict[str, int] = defaultdict(int)
    unique = []
    for c in cands:
        n = counts[c.key]
        counts[c.key] += 1
        unique.append(c if n == 0 else Candidate(f"{c.key}_{n}", c.image, c.source, c.caption, c.label))
    unique.sort(key=lambda c: c.key)
    return fmt, unique, skips
