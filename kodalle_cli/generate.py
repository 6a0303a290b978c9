"""``kodalle sample``: captions in, images out. The function the CLI calls, usable from Python.

>>> from kodalle_cli.generate import SampleConfig, sample
>>> results = sample(SampleConfig(["상의에서 색상은 레드이다."], n=4, seed=0, out=None))
>>> results[0].images[0].save("red.png"); results[0].metadata["seed"]
0

This module owns the command's options (:class:`SampleConfig`, validated in one place) and
the order of the steps; each step belongs elsewhere: the run is opened by
:func:`kodalle_cli.runs.load_run` (default: the newest run under ``runs/``), captions become
ids through the run's :class:`kodalle_cli.text.CaptionEncoder` (warning when one is cut or
mostly unknown tokens), all (caption, image) rows are generated ``batch_size`` at a time by
:func:`kodalle_cli.model.sampling.generate_rows` (captions share batches) and decoded with
the run's VQGAN, optionally reranked (:mod:`kodalle_cli.rerank.rank`), and written by
:mod:`kodalle_cli.output` (``OUT/<caption-slug>/0000.png ...``, ``grid.png``, ``codes.npy``,
``metadata.json``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from kodalle_cli.configs import SampleConfig
from kodalle_cli.device import pick_device, pick_dtype
from kodalle_cli.errors import KodalleError, UsageError
from kodalle_cli.model.sampling import (
    Row,
    SamplingSettings,
    generate_rows,
    new_seed,
    top_k_count,
)
from kodalle_cli.output import (
    CaptionResult,
    caption_metadata,
    slugify,
    to_pil,
    unique_slugs,
    write_caption_dir,
)
from kodalle_cli.runs import LoadedRun, load_run

WarnFn = Callable[[str], None]




def read_captions(captions: Sequence[str] | None, captions_file: Path | None) -> list[str]:
    """Captions from the command line and/or a file (one per line, blank lines skipped)."""
    out = [c for c in (captions or [])]
    if captions_file is not None:
        try:
            text = Path(captions_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KodalleError(f"cannot read --captions-file {captions_file}: {exc}") from exc
        out += [line.strip() for line in text.splitlines() if line.strip()]
    if not out:
        raise UsageError("give at least one caption (or --captions-file FILE)")
    if any(not c.strip() for c in out):
        raise UsageError("a caption is empty")
    return out


def _warn(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"Warning: {message}", style="yellow", markup=False,
                               highlight=False, soft_wrap=True)


def sample(config: SampleConfig, run: LoadedRun | None = None,
           warn: WarnFn | None = None) -> list[CaptionResult]:
    """Generate ``config.n`` images per caption; write them when ``config.out`` is set.

    Returns one :class:`~kodalle_cli.output.CaptionResult` per caption (PIL images +
    metadata), in caption order. ``run``: an already loaded model (else
    ``config.checkpoint`` is loaded).
    """
    from kodalle_cli.progress import progress_bar

    warn = warn or _warn
    settings = config.validate()
    device = pick_device(config.device)
    dtype = pick_dtype(config.precision, device)
    reranker = _load_reranker(config.rerank, device) if config.rerank is not None else None

    run = (run or load_run(config.checkpoint, "cpu", runs_dir=config.runs_dir,
                           backbone=config.backbone, vqgan=config.vqgan)).ready_to_sample()
    model = run.model.to(device=device, dtype=dtype).eval()
    vqgan = run.vqgan.to(device).eval()
    if vqgan.num_tokens != model.config.num_image_tokens:
        raise KodalleError(
            f"the VQGAN has {vqgan.num_tokens} codes, the model {model.config.num_image_tokens}"
        )
    seed = new_seed() if config.seed is None else int(config.seed)

    encoded = [run.caption_encoder.encode(c) for c in config.captions]
    for enc in encoded:
        for message in enc.warnings:
            warn(message)
    captions = [enc.caption for enc in encoded]  # NFC-normalised by the encoder
    texts = torch.tensor([e.ids for e in encoded], dtype=torch.long)
    rows = [Row(c, i) for c in range(len(captions)) for i in range(config.n)]
    images: dict[tuple[int, int], Image.Image] = {}

    started = time.perf_counter()
    with progress_bar(enabled=config.progress) as progress, warnings.catch_warnings():
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

    recorded = _settings_record(config, settings, model, device, dtype)
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
        meta = caption_metadata(enc, c, model.config.text_seq_len, seed, dict(recorded),
                                run.source, run.info, seconds, order, scores)
        result = CaptionResult(caption, [mine[i] for i in order], meta, None,
                               caption_codes[order])
        if config.out is not None:
            result.directory = write_caption_dir(Path(config.out) / slugs[c], result)
        results.append(result)
    return results


def _settings_record(config: SampleConfig, settings: SamplingSettings, model, device,
                     dtype) -> dict:
    """metadata.json's ``settings``: how this call sampled."""
    cfg = model.config
    fraction_base = cfg.num_text_logits + cfg.num_image_tokens
    return {
        "n": config.n, "batch_size": config.batch_size, **settings.to_dict(),
        "top_k_kept": top_k_count(settings.top_k, fraction_base) if settings.top_k
        is not None else None,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "rerank": str(config.rerank) if config.rerank is not None else None,
        "keep": config.keep,
    }


def _load_reranker(path: Path, device: torch.device):
    try:
        from kodalle_cli.rerank.rank import load_reranker
    except ImportError as exc:
        raise KodalleError(f"--rerank is not available in this build: {exc}") from exc
    return load_reranker(path, device=device)
