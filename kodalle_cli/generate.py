"""``kodalle sample``: captions in, images out. The function the CLI calls, usable from Python.

>>> from kodalle_cli.generate import SampleConfig, sample
>>> results = sample(SampleConfig(["상의에서 색상은 레드이다."], n=4, seed=0, out=None))
>>> results[0].images[0].save("red.png"); results[0].metadata["seed"]
0

Steps: resolve the checkpoint (default: the ``latest`` checkpoint of the newest run under
``runs/``), tokenize every caption (warning when one is truncated or mostly unknown tokens),
put all (caption, image) rows in one list and generate them ``batch_size`` rows at a time
(captions share batches), decode each batch with the run's VQGAN, optionally rerank, and
write ``OUT/<caption-slug>/0000.png ...``, ``grid.png``, ``codes.npy`` and ``metadata.json``.
Each caption directory is written under a temporary name and renamed when complete, so an
interrupted call leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kodalle_cli.device import pick_device, pick_dtype
from kodalle_cli.errors import KodalleError, UsageError
from kodalle_cli.model.sample import (
    SamplingSettings,
    batches,
    generate_codes,
    new_seed,
    row_uniforms,
    top_k_count,
)

SLUG_MAX_CHARS = 60
UNKNOWN_WARN_FRACTION = 0.5


# ---- configuration and results ---------------------------------------------------------------
@dataclass
class SampleConfig:
    """Everything ``kodalle sample`` takes. ``out=None``: return images without writing."""

    captions: list[str]
    n: int = 16
    checkpoint: Path | None = None
    out: Path | None = Path("samples")
    batch_size: int = 16
    top_k: float | None = 0.9
    top_p: float | None = None
    temperature: float = 1.0
    cond_scale: float = 1.0
    seed: int | None = None
    rerank: Path | None = None
    keep: int | None = None
    device: str = "auto"
    precision: str = "auto"
    runs_dir: Path = Path("runs")
    backbone: str | None = None  # for a bare .pt: whose tokenizer
    vqgan: str | None = None  # for a bare .pt: which VQGAN (or to replace the run's)
    progress: bool = True

    def settings(self) -> SamplingSettings:
        return SamplingSettings(
            top_k=self.top_k, top_p=self.top_p, temperature=self.temperature,
            cond_scale=self.cond_scale,
        ).validate()


@dataclass
class CaptionResult:
    """One caption's images (best first when reranked) and what produced them."""

    caption: str
    images: list[Image.Image]
    metadata: dict
    directory: Path | None = None
    codes: torch.Tensor | None = None  # [n, image_seq_len]


@dataclass
class EncodedCaption:
    caption: str
    ids: list[int]  # exactly text_seq_len ids (padded)
    num_tokens: int  # before padding, after truncation
    full_length: int  # before truncation
    unknown_tokens: int
    warnings: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return self.full_length - self.num_tokens


# ---- captions --------------------------------------------------------------------------------
def read_captions(captions: Sequence[str] | None, captions_file: Path | None) -> list[str]:
    """Captions from the command line and/or a file (one per line, blank lines skipped)."""
    out = [c for c in (captions or [])]
    if captions_file is not None:
        try:
            text = Path(captions_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KodalleError(f"cannot read --captions-file {captions_file}: {exc}") from exc
        out += [line.strip() for line in text.splitlines() if line.strip()]
    out = [unicodedata.normalize("NFC", c) for c in out]
    if not out:
        raise UsageError("give at least one caption (or --captions-file FILE)")
    if any(not c.strip() for c in out):
        raise UsageError("a caption is empty")
    return out


def encode_caption(tokenizer, caption: str, text_seq_len: int, pad_id: int) -> EncodedCaption:
    """Token ids padded to ``text_seq_len``, the way training encoded captions.

    A caption longer than ``text_seq_len`` is cut (special tokens kept) with a warning that
    says how many tokens were dropped; one whose tokens are mostly the unknown token gets a
    warning too (the tokenizer does not know the language or the words).
    """
    full = tokenizer(caption, add_special_tokens=True)["input_ids"]
    if len(full) > text_seq_len:
        ids = tokenizer(caption, add_special_tokens=True, truncation=True,
                        max_length=text_seq_len)["input_ids"]
    else:
        ids = list(full)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    content = [i for i in full if i not in special or i == unk]
    unknown = sum(1 for i in content if unk is not None and i == unk)
    enc = EncodedCaption(caption, ids + [pad_id] * (text_seq_len - len(ids)), len(ids),
                         len(full), unknown)
    short = caption if len(caption) <= 40 else caption[:40] + "…"
    if enc.truncated:
        enc.warnings.append(
            f"caption {short!r} is {len(full)} tokens, longer than text_seq_len "
            f"{text_seq_len}: its last {enc.truncated} tokens "
            f"({100 * enc.truncated / len(full):.0f}% of it) are dropped"
        )
    if content and unknown / len(content) >= UNKNOWN_WARN_FRACTION:
        enc.warnings.append(
            f"caption {short!r}: {unknown} of its {len(content)} tokens are unknown to the "
            "tokenizer; the images will barely depend on it (is it in the training language?)"
        )
    return enc


def slugify(caption: str, max_chars: int = SLUG_MAX_CHARS) -> str:
    """A directory name for a caption: letters (Hangul included) and digits, ``-`` between.

    >>> slugify("하의에서 색상은 블루이다. 카테고리는 스커트이다.")
    '하의에서-색상은-블루이다-카테고리는-스커트이다'
    """
    text = unicodedata.normalize("NFC", caption).lower()
    slug = re.sub(r"[^\w]+|_+", "-", text, flags=re.UNICODE).strip("-")
    slug = slug[:max_chars].rstrip("-")
    return slug or "caption"


def unique_slugs(captions: Sequence[str], out: Path | None) -> list[str]:
    """One slug per caption, unique within the call and not naming a non-empty directory."""
    taken: set[str] = set()
    result = []
    for caption in captions:
        base = slugify(caption)
        slug, i = base, 1
        while slug in taken or (out is not None and _nonempty(out / slug)):
            i += 1
            slug = f"{base}-{i}"
        taken.add(slug)
        result.append(slug)
    return result


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


# ---- images and files ------------------------------------------------------------------------
def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [0, 1] -> PIL RGB images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def make_grid(images: Sequence[Image.Image], columns: int | None = None, pad: int = 2):
    """The images in a near-square grid (white gaps of ``pad`` pixels)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w + (columns + 1) * pad, rows * h + (rows + 1) * pad),
                     "white")
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(img, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def write_caption_dir(directory: Path, result: CaptionResult) -> Path:
    """Write images, grid, codes and metadata under a temporary name, then rename."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name[:20]}.", suffix=".tmp",
                                dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        for img, info in zip(result.images, result.metadata["images"], strict=True):
            img.save(tmp / info["file"])
        make_grid(result.images).save(tmp / "grid.png")
        if result.codes is not None:
            np.save(tmp / "codes.npy", result.codes.cpu().numpy().astype(np.int32))
        (tmp / "metadata.json").write_text(
            json.dumps(result.metadata, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        if directory.exists():  # empty (unique_slugs skips non-empty ones)
            directory.rmdir()
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


WarnFn = Callable[[str], None]


# ---- what sampling needs from a run ----------------------------------------------------------
@dataclass
class Sampler:
    """A loaded model ready to sample: the DALLE transformer, its tokenizer and VQGAN.

    ``source``: what was loaded (recorded in metadata.json); ``info``: anything else worth
    recording (run directory, step, config).
    """

    model: torch.nn.Module
    tokenizer: object
    vqgan: torch.nn.Module
    source: str
    info: dict = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return self.model.config.pad_id

    @property
    def text_seq_len(self) -> int:
        return self.model.config.text_seq_len


def load_sampler(checkpoint: Path | None, runs_dir: Path = Path("runs"), *,
                 backbone: str | None = None, vqgan: str | None = None) -> Sampler:
    """Load what ``--checkpoint`` names (default: the newest run under ``runs_dir``).

    A bare DALLE-pytorch / KoDALLE ``.pt`` holds neither tokenizer nor VQGAN: ``backbone``
    names the tokenizer's backbone and ``vqgan`` the VQGAN (a run's own are used otherwise).
    """
    from kodalle_cli.runs import load_run

    target = Path(checkpoint) if checkpoint is not None else default_checkpoint(runs_dir)
    model, config, tokenizer, vq = load_run(target, "cpu", backbone=backbone, vqgan=vqgan)
    if tokenizer is None or vq is None:
        missing = " and ".join(n for n, v in (("--backbone NAME (its tokenizer)", tokenizer),
                                              ("--vqgan PATH", vq)) if v is None)
        raise KodalleError(f"{target} comes without a tokenizer or VQGAN: pass {missing}")
    info = {"checkpoint_path": config.get("checkpoint"), "backbone": config.get("backbone"),
            "model": config.get("model"), "vqgan": config.get("vqgan")}
    return Sampler(model, tokenizer, vq, str(target), _jsonable(info))


def default_checkpoint(runs_dir: Path) -> Path:
    """The run under ``runs_dir`` whose ``latest`` checkpoint is the newest (DALLE runs only:
    VQGAN and reranker runs live there too)."""
    from kodalle_cli.train.trainer import latest_checkpoint

    runs_dir = Path(runs_dir)
    candidates = []
    for run in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        try:
            config = json.loads((run / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict) or config.get("kind", "dalle") != "dalle" or (
                "model" not in config):
            continue
        ckpt = latest_checkpoint(run)
        if ckpt is not None:
            candidates.append((ckpt.stat().st_mtime, str(run), run))
    if not candidates:
        raise KodalleError(
            f"no trained DALLE run with a checkpoint under {runs_dir}/: train one with "
            "`kodalle train`, or pass --checkpoint RUN_DIR|CHECKPOINT_DIR|FILE.pt"
        )
    return max(candidates)[2]


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    return repr(value)


# ---- generation ------------------------------------------------------------------------------
@dataclass
class Row:
    """One image to make: which caption, which of its images."""

    caption_index: int
    image_index: int


def generate_rows(
    model,
    texts: torch.Tensor,
    rows: Sequence[Row],
    seed: int,
    settings: SamplingSettings,
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[list[Row], torch.Tensor], None] | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Codes ``[len(rows), image_seq_len]``; row ``r`` draws from ``(seed, caption, image)``.

    ``texts [num_captions, text_seq_len]``. Rows of different captions share batches.
    ``on_batch(rows, codes)`` after each batch (decode there); ``on_tokens(n)`` every step.
    """
    steps = model.image_seq_len
    out = []
    for chunk in batches(list(rows), batch_size):
        text = texts[[r.caption_index for r in chunk]].to(device)
        uniforms = torch.stack([row_uniforms(seed, r.caption_index, r.image_index, steps)
                                for r in chunk])
        codes = generate_codes(model, text, uniforms, settings, progress=on_tokens)
        if on_batch is not None:
            on_batch(chunk, codes)
        out.append(codes.cpu())
    return torch.cat(out) if out else torch.empty(0, steps, dtype=torch.long)


def _progress(enabled: bool):
    from kodalle_cli.progress import progress_bar

    return progress_bar(enabled=enabled)


def _warn(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"Warning: {message}", style="yellow", markup=False,
                               highlight=False, soft_wrap=True)


def sample(config: SampleConfig, sampler: Sampler | None = None,
           warn: WarnFn | None = None) -> list[CaptionResult]:
    """Generate ``config.n`` images per caption; write them when ``config.out`` is set.

    Returns one :class:`CaptionResult` per caption (PIL images + metadata), in caption order.
    ``sampler``: an already loaded model (else ``config.checkpoint`` is loaded).
    """
    warn = warn or _warn
    settings = config.settings()
    captions = [unicodedata.normalize("NFC", c) for c in config.captions]
    if not captions:
        raise UsageError("give at least one caption")
    if config.n < 1 or config.batch_size < 1:
        raise UsageError("-n and --batch-size must be at least 1")
    if config.keep is not None and config.rerank is None:
        raise UsageError("--keep needs --rerank RERANKER")
    if config.keep is not None and not 1 <= config.keep <= config.n:
        raise UsageError(f"--keep {config.keep}: must be between 1 and -n {config.n}")
    device = pick_device(config.device)
    dtype = pick_dtype(config.precision, device)
    reranker = _load_reranker(config.rerank, device) if config.rerank is not None else None

    sampler = sampler or load_sampler(config.checkpoint, config.runs_dir,
                                     backbone=config.backbone, vqgan=config.vqgan)
    model = sampler.model.to(device=device, dtype=dtype).eval()
    vqgan = sampler.vqgan.to(device).eval()
    if vqgan.num_tokens != model.config.num_image_tokens:
        raise KodalleError(
            f"the VQGAN has {vqgan.num_tokens} codes, the model {model.config.num_image_tokens}"
        )
    seed = new_seed() if config.seed is None else int(config.seed)

    encoded = [encode_caption(sampler.tokenizer, c, sampler.text_seq_len, sampler.pad_id)
               for c in captions]
    for enc in encoded:
        for message in enc.warnings:
            warn(message)
    texts = torch.tensor([e.ids for e in encoded], dtype=torch.long)
    rows = [Row(c, i) for c in range(len(captions)) for i in range(config.n)]
    images: dict[tuple[int, int], Image.Image] = {}

    started = time.perf_counter()
    with _progress(config.progress) as progress, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SDPA/autocast chatter on some builds
        tokens = progress.add_task("tokens", total=len(rows) * model.image_seq_len)
        done = progress.add_task("images", total=len(rows))

        def decode(chunk: list[Row], codes: torch.Tensor) -> None:
            pixels = vqgan.decode(codes.to(vqgan.device))
            for row, img in zip(chunk, to_pil(pixels), strict=True):
                images[(row.caption_index, row.image_index)] = img
            progress.advance(done, len(chunk))

        codes = generate_rows(
            model, texts, rows, seed, settings, config.batch_size, device,
            on_batch=decode, on_tokens=lambda k: progress.advance(tokens, k),
        )
    seconds = time.perf_counter() - started

    results = []
    slugs = unique_slugs(captions, config.out) if config.out is not None else [
        slugify(c) for c in captions]
    for c, (caption, enc) in enumerate(zip(captions, encoded, strict=True)):
        order = list(range(config.n))
        mine = [images[(c, i)] for i in order]
        scores = None
        if reranker is not None:
            from kodalle_cli.rerank.rank import keep_best

            order, scores = keep_best(reranker, mine, caption, config.keep)
        caption_codes = codes[c * config.n : (c + 1) * config.n]
        meta = _metadata(config, settings, sampler, model, enc, seed, c, order, scores,
                         seconds, device, dtype)
        result = CaptionResult(caption, [mine[i] for i in order], meta, None,
                               caption_codes[order])
        if config.out is not None:
            result.directory = write_caption_dir(Path(config.out) / slugs[c], result)
        results.append(result)
    return results


def _metadata(config, settings, sampler, model, enc, seed, c, order, scores, seconds,
              device, dtype) -> dict:
    cfg = model.config
    fraction_base = cfg.num_text_logits + cfg.num_image_tokens
    return {
        "caption": enc.caption,
        "caption_index": c,
        "token_ids": enc.ids[: enc.num_tokens],
        "text_seq_len": cfg.text_seq_len,
        "num_tokens": enc.num_tokens,
        "truncated_tokens": enc.truncated,
        "unknown_tokens": enc.unknown_tokens,
        "warnings": enc.warnings,
        "seed": seed,
        "settings": {
            "n": config.n, "batch_size": config.batch_size, **settings.to_dict(),
            "top_k_kept": top_k_count(settings.top_k, fraction_base) if settings.top_k
            is not None else None,
            "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "rerank": str(config.rerank) if config.rerank is not None else None,
            "keep": config.keep,
        },
        "checkpoint": sampler.source,
        "run": sampler.info,
        "seconds_all_captions": round(seconds, 3),
        "images": [
            {"file": f"{rank:04d}.png", "image_index": i,
             **({"rerank_score": scores[i], "rank": rank} if scores is not None else {})}
            for rank, i in enumerate(order)
        ],
        **({"rerank_scores": scores} if scores is not None else {}),
    }


def _load_reranker(path: Path, device: torch.device):
    try:
        from kodalle_cli.rerank.rank import load_reranker
    except ImportError as exc:
        raise KodalleError(f"--rerank is not available in this build: {exc}") from exc
    return load_reranker(path, device=device)
