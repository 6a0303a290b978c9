"""Attribute captions: what a run's K-Fashion training captions say, and captions built from
``PART.NAME=VALUE`` the way they were built.

At ``train`` time a run records (config.json ``"captions"``, :func:`caption_record`) how its
captions were made and what they hold: the image shards' format and caption options from
their manifest (``prepare``'s ``--caption-style``, ``--include-style``), and every part,
attribute name and value of the training split's labels with counts, in the order the
captions put them::

    "captions": {"format": "kfashion", "style": "per-part", "include_style": false,
                 "image_shards": "shards", "samples": 1200,
                 "parts": {"하의": {"samples": 400, "attributes": {"색상": {"블루": 41, ...},
                                                                   "카테고리": {...}}},
                           "상의": {...}}}

``parts`` and each part's ``attributes`` are in caption order (the labels' order, by majority
when labels disagree); values are most frequent first. List-valued attributes (소재, 프린트,
디테일) count each item. With ``--include-style`` the 스타일 entry is a part too.

- :func:`run_attributes`: a run's record (older runs: read from their shards), or one error
  for a run whose shards did not come from ``prepare --format kfashion``; what
  ``kodalle attributes`` prints and a web server can serve;
- :func:`attribute_caption`: ``["상의.색상=레드", "상의.카테고리=티셔츠"]`` -> the caption,
  through :func:`kodalle_cli.data.captions.caption_from_label` with the run's style and
  order; an unknown part, name or value is a one-line error naming the closest known ones.
"""

from __future__ import annotations

import difflib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from kodalle_cli.data.kfashion import (
    LIST_ATTRIBUTES,
    PARTS,
    STYLE,
    part_attributes,
    style_attributes,
    wrap_labeling,
)
from kodalle_cli.data.shards import iter_shard_meta
from kodalle_cli.errors import KodalleError, UsageError
from kodalle_cli.text import normalize

CONFIG_KEY = "captions"  # where a run's config.json keeps the record
KFASHION = "kfashion"


# ---- what the training captions hold ---------------------------------------------------------
def _items(name: str, value: str) -> list[str]:
    """A value's items: list-valued attributes hold several, joined with ", "."""
    if name in LIST_ATTRIBUTES:
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def _majority_order(sequences: Counter, prior: Sequence[str] = ()) -> list[str]:
    """The names of ``sequences`` (tuple -> count) in the order most sequences put them: a
    topological order of "a before b in more sequences than after"; names that never meet
    (or tie) follow ``prior``, then first-seen order; cycles are broken by the fewest
    majority predecessors."""
    first: dict[str, int] = {}
    before: Counter = Counter()
    for seq, n in sequences.items():
        for i, a in enumerate(seq):
            first.setdefault(a, len(first))
            for b in seq[i + 1:]:
                before[(a, b)] += n
    rank = {name: i for i, name in enumerate(prior)}
    names = sorted(first, key=lambda a: (rank.get(a, len(rank)), first[a]))
    preds = {a: {b for b in names if before[(b, a)] > before[(a, b)]} for a in names}
    order: list[str] = []
    left = list(names)
    while left:
        ready = [a for a in left if not (preds[a] & set(left))]
        pick = ready[0] if ready else min(left, key=lambda a: len(preds[a] & set(left)))
        order.append(pick)
        left.remove(pick)
    return order


def _shard_labels(tar_path: Path) -> Iterable[Mapping]:
    """The ``labels`` (라벨링 block) of every sample's ``KEY.json`` in one image shard; only
    the small JSON members are read (the images are skipped over)."""
    for _, meta in iter_shard_meta(tar_path):
        labels = meta.get("labels")
        if isinstance(labels, Mapping):
            yield labels


def scan_labels(labels: Iterable[Mapping], include_style: bool = False) -> dict:
    """``{"samples", "parts"}`` (see the module docstring) of labels' ``라벨링`` blocks."""
    part_seqs: Counter = Counter()
    attr_seqs: dict[str, Counter] = defaultdict(Counter)
    values: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    part_samples: Counter = Counter()
    samples = 0
    for block in labels:
        label = wrap_labeling(block)
        try:
            parts = part_attributes(label)
            style = style_attributes(label) if include_style else []
        except (KeyError, TypeError, AttributeError):
            continue
        samples += 1
        if style:
            parts = [(STYLE, style), *parts]
        part_seqs[tuple(dict.fromkeys(p for p, _ in parts))] += 1
        for part in {p for p, _ in parts}:
            part_samples[part] += 1
        for part, attrs in parts:
            attr_seqs[part][tuple(dict.fromkeys(n for n, _ in attrs))] += 1
            for name, value in attrs:
                values[part][name].update(_items(name, value))
    out: dict = {}
    for part in _majority_order(part_seqs, (STYLE, *PARTS)):  # the style sentence first
        out[part] = {"samples": part_samples[part], "attributes": {
            name: dict(sorted(values[part][name].items(), key=lambda kv: (-kv[1], kv[0])))
            for name in _majority_order(attr_seqs[part])
        }}
    return {"samples": samples, "parts": out}


def _image_shards(tokens_dir: Path, token_manifest: Mapping | None) -> Path | None:
    """The image shards token shards were made from: the token manifest's ``image_shards``
    (as given to tokenize, so relative to where it ran), else the folder above the tokens."""
    candidates = []
    named = (token_manifest or {}).get("image_shards")
    if named:
        candidates += [Path(named), tokens_dir.parent / Path(named).name]
    candidates.append(tokens_dir.parent)
    for c in candidates:
        try:
            manifest = json.loads((c / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and "options" in manifest and "format" in manifest:
            return c
    return None


def caption_record(tokens_dir: str | os.PathLike, token_manifest: Mapping | None = None,
                   split: str = "train") -> dict:
    """What a run records about its captions at train time (never raises: a run whose image
    shards cannot be found records why)."""
    tokens_dir = Path(tokens_dir)
    try:
        shards = _image_shards(tokens_dir, token_manifest)
        if shards is None:
            return {"format": None, "note": f"no image shards found for {tokens_dir}"}
        manifest = json.loads((shards / "manifest.json").read_text(encoding="utf-8"))
        options = manifest.get("options") or {}
        record = {"format": manifest.get("format"), "style": options.get("caption_style"),
                  "include_style": bool(options.get("include_style")),
                  "image_shards": str(shards), "split": split}
        if record["format"] == KFASHION:
            tars = sorted(shards.glob(f"{split}-*.tar"))
            record.update(scan_labels((lab for t in tars for lab in _shard_labels(t)),
                                      record["include_style"]))
        return record
    except Exception as exc:  # noqa: BLE001 - recording is a courtesy; training goes on
        return {"format": None, "note": f"could not read the captions' labels: {exc}"}


# ---- a run's record --------------------------------------------------------------------------
def _run_dir(run: str | os.PathLike | None) -> Path:
    from kodalle_cli.runs import CONFIG, newest_run

    if run is None:
        return newest_run("runs")
    path = Path(run).expanduser()
    for candidate in (path, path.parent.parent, path.parent.parent.parent):
        if (candidate / CONFIG).is_file():
            return candidate
    raise KodalleError(f"{path} is not a kodalle run directory (no config.json)")


def record_of(config: Mapping, where: str) -> dict:
    """The attribute record of a run's config (computed from its shards for a run trained
    before runs recorded it), or one clear error when it has none."""
    record = config.get(CONFIG_KEY)
    if not isinstance(record, Mapping):
        tokens = (config.get("data") or {}).get("tokens") if isinstance(
            config.get("data"), Mapping) else None
        if not tokens:
            raise KodalleError(
                f"{where} records no training captions (a converted .pt or a run without "
                "token shards): attribute captions need a run trained on "
                "`prepare --format kfashion` shards")
        manifest = None
        try:
            manifest = json.loads((Path(tokens) / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        record = caption_record(tokens, manifest)
    fmt = record.get("format")
    if fmt != KFASHION:
        why = (f"its shards came from `prepare --format {fmt}`" if fmt else
               record.get("note") or "its image shards are unknown")
        raise KodalleError(
            f"{where}: no K-Fashion attributes ({why}); attribute captions need a run whose "
            "shards came from `prepare --format kfashion`")
    if not record.get("parts"):
        raise KodalleError(f"{where}: its training labels hold no attributes")
    return dict(record)


def run_attributes(run: str | os.PathLike | None = None) -> dict:
    """The parts, attribute names and values of a run's training captions, with counts:
    ``{"run", "format", "style", "include_style", "samples", "parts": {...}}`` (module
    docstring). ``run``: a run or checkpoint directory (default: the newest run under
    ``runs/``). Raises :class:`KodalleError` for a run not trained on K-Fashion shards."""
    from kodalle_cli.runs import read_config

    run_dir = _run_dir(run)
    return {"run": str(run_dir), **record_of(read_config(run_dir), str(run_dir))}


# ---- captions from attributes ----------------------------------------------------------------
def _closest(word: str, known: Mapping[str, int] | Sequence[str], n: int = 3) -> str:
    counts = known if isinstance(known, Mapping) else dict.fromkeys(known, 0)
    ranked = sorted(counts, key=lambda k: (-difflib.SequenceMatcher(None, word, k).ratio(),
                                          -counts[k], k))
    return ", ".join(ranked[:n])


def parse_attr(text: str) -> tuple[str, str, str]:
    """``"상의.색상=레드"`` -> ``("상의", "색상", "레드")`` (NFC, spaces around parts dropped)."""
    text = normalize(text)
    head, eq, value = text.partition("=")
    part, dot, name = head.partition(".")
    part, name, value = part.strip(), name.strip(), " ".join(value.split())
    if not (eq and dot and part and name and value):
        raise UsageError(f"--attr {text!r}: write PART.NAME=VALUE, e.g. 상의.색상=레드")
    return part, name, value


def attribute_caption(record: Mapping, attrs: Sequence[str]) -> str:
    """The caption for ``attrs`` (``PART.NAME=VALUE`` each) built as the run's training
    captions were: its caption style, its part and attribute order. A list-valued attribute
    may be given several times or as ``소재=니트,우븐``. Raises :class:`UsageError` (one line,
    the closest known part, name or value) for anything its training captions never held."""
    from kodalle_cli.data.captions import caption_from_label

    parts = record["parts"]
    chosen: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for text in attrs:
        part, name, value = parse_attr(text)
        if part not in parts:
            raise UsageError(
                f"--attr {text}: no part {part!r} in the training captions; closest: "
                f"{_closest(part, {p: v['samples'] for p, v in parts.items()})}")
        names = parts[part]["attributes"]
        if name not in names:
            raise UsageError(
                f"--attr {text}: {part} has no attribute {name!r} in the training captions; "
                f"closest: {_closest(name, {k: sum(v.values()) for k, v in names.items()})}")
        items = _items(name, value)
        for item in items:
            if item not in names[name]:
                elsewhere = [p for p, info in parts.items()
                             if item in info["attributes"].get(name, {})]
                also = (f" (it does as {', '.join(f'{p}.{name}' for p in elsewhere)})"
                        if elsewhere else "")
                raise UsageError(
                    f"--attr {text}: {item!r} never occurs as {part}.{name} in the training "
                    f"captions{also}; closest: {_closest(item, names[name])}")
        if name in chosen[part] and name not in LIST_ATTRIBUTES:
            raise UsageError(f"--attr {text}: {part}.{name} is given twice "
                             f"({chosen[part][name][0]} and {value})")
        chosen[part].setdefault(name, []).extend(i for i in items
                                                 if i not in chosen[part].get(name, []))
    block: dict = {}
    for part, info in parts.items():  # the training captions' order
        if part in chosen:
            block[part] = [{name: ", ".join(chosen[part][name])
                            for name in info["attributes"] if name in chosen[part]}]
    include_style = bool(record.get("include_style")) and STYLE in block
    return caption_from_label(wrap_labeling(block), record.get("style") or "per-part", include_style)


def attribute_rows(record: Mapping) -> list[tuple[str, str, str]]:
    """(part, attribute, "value count, ...") rows for a table."""
    return [(part, name, ", ".join(f"{v} {n}" for v, n in values.items()))
            for part, info in record["parts"].items()
            for name, values in info["attributes"].items()]
