"""``kodalle tokenize``: image shards -> token shards (text ids + VQGAN codes).

For every image shard ``SHARDS/{train,val}-NNNNNN.tar`` one token shard of the same name
is written to ``OUT`` (default ``SHARDS/tokens``), atomically; a shard already there
(with its ``_stats.json``) is skipped, so an interrupted run resumes per shard. The
manifest records the tokenizer and VQGAN identities and text_seq_len; a run whose
tokenizer, VQGAN or text_seq_len differ from an existing manifest's is refused instead of
mixing tokens. Captions become ids through :class:`kodalle_cli.text.CaptionEncoder`, the
encoder ``kodalle sample`` uses too.

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
    shards = Path(cfg.shards)
    out = Path(cfg.out) if cfg.out else shards / "tokens"
    inputs = {}
    for split in cfg.splits:
        try:
            inputs[split] = shard_paths(shards, split)
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
    )
    start = time.perf_counter()
    encoded = 0
    try:
        with writer, _progress(cfg.progress) as bar:
            task = bar.add_task("tokenize", total=len(todo), rate="")
            for split, shard in todo:
                stats = _finished_stats(out / shard.name, identity, old_grid, grid)
                if stats is not None:
                    summary.shards_skipped += 1
                    writer.add_finished(split, shard.name, stats["count"])
                else:
                    stats = _tokenize_shard(writer, split, shard, text, vqgan, cfg, identity,
                                            budget, size)
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
    raise KodalleError(f"no readable image in {shards[0].parent if shards else 'the shards'}")


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


def _finished_stats(target: Path, identity: dict, old_grid: int | None = None,
                    grid: int | None = None) -> dict | None:
    """Stats of a token shard finished by an earlier run (None: not there yet, or made on
    another grid than ``grid``, so to be redone)."""
    stats_file = stats_path(target)
    if not (target.is_file() and stats_file.is_file()):
        return None
    stats = json.loads(stats_file.read_text(encoding="utf-8"))
    _refuse_mismatch(stats, identity, str(target))
    if grid is not None and stats.get("image_fmap_size", old_grid) not in (None, grid):
        return None
    return stats


def _tokenize_shard(writer: token_shards.TokenShardsWriter, split: str, shard: Path,
                    text: CaptionEncoder, vqgan, cfg, identity: dict,
                    budget: _BadBudget, size: int) -> dict:
    """One image shard -> the token shard of the same name, with its stats file. Samples
    that cannot be read are skipped with a warning naming shard and key (and listed in the
    stats); the budget stops the run once too many are bad."""
    from kodalle_cli.data.images import to_tensor
    from kodalle_cli.data.shards import iter_image_samples
    from kodalle_cli.train.checkpoint import kill_hook

    stats = {"count": 0, "truncated": 0, "source": shard.name, **identity,
             "image_fmap_size": size // vqgan.downsample_factor}
    skipped: list[dict] = []
    writer.open_shard(split, shard.name)
    batch: list = []

    def flush():
        ids, truncated = text.encode_batch([s.caption for s in batch])
        images = to_tensor([s.image for s in batch], size=size)
        codes = vqgan.encode(images).cpu().numpy()
        for s, row_ids, row_codes in zip(batch, ids, codes, strict=True):
            writer.write(split, s.key, row_ids, row_codes, s.caption)
        stats["count"] += len(batch)
        stats["truncated"] += truncated
        batch.clear()
        kill_hook("KODALLE_TEST_KILL_IN_TOKENIZE", f"{shard.name}:{stats['count']}")

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
    listed = _image_shard_count(shard)  # samples lost to a truncated tar count as bad
    if skipped or (listed is not None and listed > stats["count"]):
        lost = listed - stats["count"] if listed is not None else 0
        stats["bad"] = max(len(skipped), lost)
        stats["skipped"] = skipped
        budget.check_running(stats["bad"])
    writer.finish_shard(split, stats)  # the stats file, renamed last, marks it finished
    return stats


def _image_shard_count(shard: Path) -> int | None:
    """The samples `kodalle prepare` wrote to an image shard (its stats file), if known."""
    try:
        stats = json.loads(stats_path(shard).read_text(encoding="utf-8"))
        return int(stats["samples"])
    except (OSError, ValueError, KeyError, TypeError):
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
