"""``kodalle tokenize``: image shards -> token shards (text ids + VQGAN codes).

For every image shard ``SHARDS/{train,val}-NNNNNN.tar`` one token shard of the same name
is written to ``OUT`` (default ``SHARDS/tokens``), atomically; a shard already there
(with its ``_stats.json``) is skipped, so an interrupted run resumes per shard. The
manifest records the tokenizer and VQGAN identities and text_seq_len; a run whose
tokenizer, VQGAN or text_seq_len differ from an existing manifest's is refused instead of
mixing tokens. Captions become ids through :class:`kodalle_cli.text.CaptionEncoder`, the
encoder ``kodalle sample`` uses too. K-Fashion image shards (``prepare --format kfashion``)
keep each sample's labels: their token shards hold the caption in every style too
(``KEY.styles.npy``, for ``train --caption-style``).

A killed run, re-run, gives the same bytes as a clean one (a shard is redone unless its stats
file says it is finished). Unreadable samples (bad image bytes, a truncated tar) are skipped
with a warning naming shard and key and listed in the shard's stats; more than
``max_bad_fraction`` of them stops the run without a manifest. A full disk is one line
saying so; no partial shard is left.

Python use::

    from kodalle_cli.tokenize_shards import TokenizeConfig, tokenize
    summary = tokenize(TokenizeConfig(shards="shards", vqgan="runs/vqgan",
                                      backbone="klue-roberta-large"))
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from kodalle_cli.atomic import disk_full_error, is_disk_full
from kodalle_cli.configs import TokenizeConfig
from kodalle_cli.data import tokens as token_shards
from kodalle_cli.data import urls
from kodalle_cli.data.captions import CAPTION_STYLES, style_captions
from kodalle_cli.data.kfashion import wrap_labeling
from kodalle_cli.data.shards import remove_stale_temporaries, stats_path
from kodalle_cli.errors import KodalleError, UsageError, warn
from kodalle_cli.text import CaptionEncoder


@dataclass
class TokenizeSummary:
    out: Path
    samples: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    images_encoded: int = 0  # this run (skipped shards not counted)
    bad: int = 0  # unreadable samples skipped (earlier runs' shards included)
    lost: list[str] = field(default_factory=list)  # remote shards whose stream broke: not written

    @property
    def images_per_second(self) -> float:
        return self.images_encoded / self.seconds if self.seconds > 0 else 0.0


# ---- text (captions -> ids: kodalle_cli.text.CaptionEncoder) --------------------------------
def tokenizer_identity(backbone) -> str:
    """sha256 of the tokenizer's files (names and bytes)."""
    from kodalle_cli.backbone import TOKENIZER_FILES

    directory = backbone.tokenizer_dir()
    h = hashlib.sha256()
    for name in sorted(TOKENIZER_FILES):
        path = directory / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return "sha256:" + h.hexdigest()


# ---- the run ---------------------------------------------------------------------------------
def tokenize(cfg: TokenizeConfig) -> TokenizeSummary:
    """Tokenize every image shard of ``cfg.shards``; returns counts and speed."""
    from kodalle_cli.backbone import get_backbone
    from kodalle_cli.data.shards import shard_paths
    from kodalle_cli.device import pick_device
    from kodalle_cli.vqgan import load_vqgan

    if cfg.text_seq_len < 2:
        raise UsageError("--text-seq-len must be at least 2")
    if cfg.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    remote = urls.is_remote(cfg.shards) or "{" in str(cfg.shards) or cfg.manifest is not None
    shards = urls.source(cfg.shards, cfg.manifest) if remote else Path(cfg.shards)
    if cfg.out is not None and urls.is_remote(cfg.out):
        raise UsageError(f"--out {cfg.out}: tokenize writes to a local folder only")
    if cfg.out is None and urls.is_remote(cfg.shards):
        raise UsageError(f"{cfg.shards} is remote: give --out, the local folder the token "
                         "shards go to")
    out = Path(cfg.out) if cfg.out else Path(urls.join(shards, "tokens"))
    picked = remote and urls.selected(shards) is not None  # a pattern: split by shard name
    inputs = {}
    for split in cfg.splits:
        try:
            paths = shard_paths(shards, None if picked else split)
            if picked:
                paths = [p for p in paths if urls.name(p).startswith("val-") == (split == "val")]
                if not paths:
                    raise KodalleError(f"no {split} shards in {shards}")
            inputs[split] = paths
        except KodalleError:
            if split == "train":
                raise
    device = pick_device(cfg.device)
    backbone = get_backbone(cfg.backbone, str(cfg.backbone_path) if cfg.backbone_path else None)
    text = CaptionEncoder.for_backbone(backbone, cfg.text_seq_len)
    vqgan = load_vqgan(cfg.vqgan, cfg.vqgan_config, device=device)
    identity = {
        "text_seq_len": cfg.text_seq_len,
        "tokenizer_hash": tokenizer_identity(backbone),
        "vqgan_hash": vqgan.identity(),
    }
    out.mkdir(parents=True, exist_ok=True)
    old_grid = _check_existing_manifest(out, identity)
    remove_stale_temporaries(out)  # left by a killed run; their shards are redone

    summary = TokenizeSummary(out=out)
    todo = [(split, p) for split, paths in inputs.items() for p in paths]
    # the shards' images are encoded at their own size: a taming VQGAN is convolutional, so
    # one trained at another resolution gives a grid of (image size / its factor)
    size = _images_size([p for _, p in todo])
    grid = _grid(size, vqgan, cfg.vqgan)
    if old_grid is not None and old_grid != grid:
        warn(f"{out} holds token shards on a {old_grid}x{old_grid} grid, these {size} px "
             f"images make {grid}x{grid} with VQGAN {cfg.vqgan}: its finished shards are redone")
    budget = _BadBudget(cfg.max_bad_fraction, _expected_samples([p for _, p in todo]))
    styles = _caption_styles(shards)
    writer = token_shards.TokenShardsWriter(
        out, text_seq_len=cfg.text_seq_len, num_image_tokens=vqgan.num_tokens,
        image_fmap_size=grid, pad_id=text.pad_id,
        tokenizer_hash=identity["tokenizer_hash"],
        vqgan={"hash": identity["vqgan_hash"], "source": str(cfg.vqgan),
               "num_tokens": vqgan.num_tokens, "image_size": size, "fmap_size": grid,
               "downsample_factor": vqgan.downsample_factor,
               "resolution": vqgan.image_size},
        tokenizer={"backbone": backbone.name, "source": backbone.location,
                   "vocab_size": len(text.tokenizer)},
        shard_size=None,  # one token shard per image shard, named after it
        extra={"truncated": 0, "image_shards": str(shards)},
        caption_styles=list(CAPTION_STYLES) if styles is not None else None,
    )
    start = time.perf_counter()
    encoded = 0
    try:
        with writer, _progress(cfg.progress) as bar:
            task = bar.add_task("tokenize", total=len(todo), rate="")
            for split, shard in todo:
                stats = _finished_stats(out / urls.name(shard), identity, old_grid, grid,
                                        styles is not None)
                if stats is not None:
                    summary.shards_skipped += 1
                    writer.add_finished(split, urls.name(shard), stats["count"])
                else:
                    stats = _tokenize_shard(writer, split, shard, text, vqgan, cfg, identity,
                                            budget, size, styles)
                    if stats is None:  # its stream broke for good: a re-run fetches it
                        summary.lost.append(str(shard))
                        bar.update(task, advance=1)
                        continue
                    summary.shards_written += 1
                    encoded += stats["count"]
                summary.samples[split] = summary.samples.get(split, 0) + stats["count"]
                summary.truncated += stats["truncated"]
                budget.add(stats["count"], stats.get("bad", 0))
                rate = encoded / (time.perf_counter() - start)
                bar.update(task, advance=1, rate=f"{rate:.1f} images/s")
            budget.check_total()  # before the manifest: too many bad ones leave none
            writer.extra["truncated"] = summary.truncated
            if budget.bad:
                writer.extra["bad"] = budget.bad
    except KodalleError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(
                "token shards", out, "the shards finished so far are kept and no partial one "
                "is left; free space and run the same command to go on") from None
        raise
    summary.bad = budget.bad
    summary.seconds = time.perf_counter() - start
    summary.images_encoded = encoded
    return summary


def ensure_tokens(cfg: TokenizeConfig) -> Path:
    """The token-shard directory for ``cfg``: reused when its manifest matches (same
    tokenizer, VQGAN and text_seq_len, every image shard tokenized), else (re)built by
    :func:`tokenize`. What ``kodalle train`` calls on image shards."""
    return tokenize(cfg).out


def _check_existing_manifest(out: Path, identity: dict) -> int | None:
    """Refuse an existing manifest of another tokenizer, VQGAN or text_seq_len; returns its
    grid (None: no manifest yet)."""
    path = out / token_shards.MANIFEST
    if not path.is_file():
        return None
    old = json.loads(path.read_text(encoding="utf-8"))
    found = {"text_seq_len": old.get("text_seq_len"),
             "tokenizer_hash": old.get("tokenizer_hash"),
             "vqgan_hash": (old.get("vqgan") or {}).get("hash")}
    _refuse_mismatch(found, identity, str(path))
    grid = old.get("image_fmap_size")
    return grid if isinstance(grid, int) else None


def _images_size(shards: list[Path]) -> int:
    """The side of the image shards' images: the first readable one's (``prepare`` writes
    them all at one size; any other is fitted to it)."""
    from kodalle_cli.data.shards import iter_image_samples

    for shard in shards:
        for sample in iter_image_samples(shard, split=None, split_by_worker=False,
                                         on_bad=lambda *_: None):
            return max(sample.image.size)
    where = urls.join(shards[0], "") if shards else "the shards"
    raise KodalleError(f"no readable image in {where}")


def _grid(size: int, vqgan, source) -> int:
    """The code grid of ``size`` px images through ``vqgan`` (one line when it does not
    divide)."""
    f = vqgan.downsample_factor
    if size % f:
        raise KodalleError(
            f"the image shards hold {size} px images, which VQGAN {source} (downsampling by "
            f"{f}) cannot cut into whole codes: prepare them at a multiple of {f} px")
    return size // f


def _refuse_mismatch(found: dict, identity: dict, where: str) -> None:
    names = {"text_seq_len": "text_seq_len", "tokenizer_hash": "tokenizer",
             "vqgan_hash": "VQGAN"}
    diff = [names[k] for k in identity if found.get(k) != identity[k]]
    if diff:
        raise KodalleError(
            f"{where} holds tokens made with another {' and '.join(diff)}; "
            "pass another --out or delete that directory"
        )


def _caption_styles(shards: Path | str | urls.Place) -> dict | None:
    """``{"include_style": bool}`` when the image shards are K-Fashion's (their samples keep
    the labels every caption style is built from), else None."""
    try:
        manifest = json.loads(urls.read_utf8(urls.manifest_location(shards, "manifest.json")))
    except (OSError, ValueError, KodalleError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != "kfashion":
        return None
    return {"include_style": bool((manifest.get("options") or {}).get("include_style"))}


def _finished_stats(target: Path, identity: dict, old_grid: int | None = None,
                    grid: int | None = None, styles: bool = False) -> dict | None:
    """Stats of a token shard finished by an earlier run (None: not there yet, made on
    another grid than ``grid``, or without the caption ``styles`` wanted, so to be redone)."""
    stats_file = stats_path(target)
    if not (target.is_file() and stats_file.is_file()):
        return None
    stats = json.loads(stats_file.read_text(encoding="utf-8"))
    _refuse_mismatch(stats, identity, str(target))
    if grid is not None and stats.get("image_fmap_size", old_grid) not in (None, grid):
        return None
    if styles and stats.get("caption_styles") != list(CAPTION_STYLES):
        return None
    return stats


def _tokenize_shard(writer: token_shards.TokenShardsWriter, split: str, shard: Path | str,
                    text: CaptionEncoder, vqgan, cfg, identity: dict,
                    budget: _BadBudget, size: int, styles: dict | None = None) -> dict | None:
    """One image shard -> the token shard of the same name, with its stats file. Samples
    that cannot be read are skipped with a warning naming shard and key (and listed in the
    stats); the budget stops the run once too many are bad. With ``styles`` (K-Fashion
    shards) every sample's caption is also written in every style, from its labels. A
    remote shard whose stream broke for good (warned about, naming its URL) is not written:
    None."""
    from kodalle_cli.data.images import to_tensor
    from kodalle_cli.data.shards import iter_image_samples
    from kodalle_cli.train.checkpoint import kill_hook

    name, lost_before = urls.name(shard), len(urls.STATS.lost)
    stats = {"count": 0, "truncated": 0, "source": name, **identity,
             "image_fmap_size": size // vqgan.downsample_factor}
    if styles is not None:
        stats.update(caption_styles=list(CAPTION_STYLES), truncated_styles=0)
    skipped: list[dict] = []
    writer.open_shard(split, name)
    batch: list = []

    def flush():
        ids, truncated = text.encode_batch([s.caption for s in batch])
        images = to_tensor([s.image for s in batch], size=size)
        codes = vqgan.encode(images).cpu().numpy()
        rows = [None] * len(batch)
        if styles is not None:
            variants = [_style_captions(s, styles["include_style"]) for s in batch]
            flat, cut = text.encode_batch([c for v in variants for c in v])
            rows = flat.reshape(len(batch), len(CAPTION_STYLES), -1)
            stats["truncated_styles"] += cut
        for s, row_ids, row_codes, row_styles in zip(batch, ids, codes, rows, strict=True):
            writer.write(split, s.key, row_ids, row_codes, s.caption, row_styles)
        stats["count"] += len(batch)
        stats["truncated"] += truncated
        batch.clear()
        kill_hook("KODALLE_TEST_KILL_IN_TOKENIZE", f"{name}:{stats['count']}")

    def bad(path: str, key: str, reason: str) -> None:
        skipped.append({"key": key, "reason": reason})
        warn(f"{path}{': ' + key if key else ''}: {reason}; skipped")
        budget.check_running(len(skipped))

    for sample in iter_image_samples(shard, split=None, split_by_worker=False, on_bad=bad):
        batch.append(sample)
        if len(batch) == cfg.batch_size:
            flush()
    if batch:
        flush()
    if len(urls.STATS.lost) > lost_before:  # the rest of the shard never came
        writer.abort()
        return None
    listed = _image_shard_count(shard)  # samples lost to a truncated tar count as bad
    if skipped or (listed is not None and listed > stats["count"]):
        lost = listed - stats["count"] if listed is not None else 0
        stats["bad"] = max(len(skipped), lost)
        stats["skipped"] = skipped
        budget.check_running(stats["bad"])
    writer.finish_shard(split, stats)  # the stats file, renamed last, marks it finished
    return stats


def _style_captions(sample, include_style: bool) -> list[str]:
    """A K-Fashion sample's caption in every style, from the labels its metadata keeps (its
    own caption for each style when it has none)."""
    labels = sample.meta.get("labels") if isinstance(sample.meta, dict) else None
    if isinstance(labels, dict):
        try:
            return style_captions(wrap_labeling(labels), include_style)
        except (KeyError, TypeError, AttributeError, ValueError):
            pass
    return [sample.caption] * len(CAPTION_STYLES)


def _image_shard_count(shard: Path | str) -> int | None:
    """The samples `kodalle prepare` wrote to an image shard (its stats file, also beside an
    http(s) one), if known."""
    if str(shard).startswith("pipe:"):
        return None
    try:
        where = urls.join(shard, urls.name(shard)[: -len(".tar")] + "_stats.json")
        stats = json.loads(urls.read_utf8(where))
        return int(stats["samples"])
    except (OSError, ValueError, KeyError, TypeError, KodalleError):
        return None


def _expected_samples(shards: list[Path]) -> int | None:
    counts = [_image_shard_count(p) for p in shards]
    return None if any(c is None for c in counts) else sum(counts)


class _BadBudget:
    """``--max-bad-fraction``: stops as soon as the bad samples exceed the share of all the
    samples the image shards list (when their stats say), else when the run ends."""

    def __init__(self, fraction: float, expected: int | None):
        self.fraction, self.expected = fraction, expected
        self.good = self.bad = 0

    def add(self, good: int, bad: int) -> None:
        self.good += good
        self.bad += bad

    def _error(self, bad: int, total: int) -> KodalleError:
        return KodalleError(
            f"{bad} of {total} samples are unreadable (more than --max-bad-fraction "
            f"{self.fraction:g}; the warnings above name them): repair or re-run "
            "`kodalle prepare`, or allow more with --max-bad-fraction"
        )

    def check_running(self, bad_in_shard: int) -> None:
        bad = self.bad + bad_in_shard
        if self.expected is not None and bad > self.fraction * self.expected:
            raise self._error(bad, self.expected)

    def check_total(self) -> None:
        total = self.good + self.bad
        if self.bad > self.fraction * max(total, 1):
            raise self._error(self.bad, total)


def _progress(enabled: bool):
    from kodalle_cli.progress import progress_bar

    return progress_bar("shards", "{task.fields[rate]}", enabled=enabled, eta=False)
