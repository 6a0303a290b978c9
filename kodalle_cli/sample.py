"""``kodalle sample``: captions in, images out. The function the CLI calls, usable from Python.

>>> from kodalle_cli.sample import SampleConfig, sample
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
from kodalle_cli.errors import warn as warn_user
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
from kodalle_cli.runs import LoadedRun, check_vqgan, load_run

WarnFn = Callable[[str], None]
ImageFn = Callable[[int, int, Image.Image], None]




def read_captions(captions: Sequence[str] | None, captions_file: Path | None,
                  allow_empty: bool = False) -> list[str]:
    """Captions from the command line and/or a file (one per line, blank lines skipped).
    ``allow_empty``: none is fine (--attr builds the caption; --init-image may go without)."""
    out = [c for c in (captions or [])]
    if captions_file is not None:
        try:
            text = Path(captions_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KodalleError(f"cannot read --captions-file {captions_file}: {exc}") from exc
        out += [line.strip() for line in text.splitlines() if line.strip()]
    if not out and not allow_empty:
        raise UsageError("give at least one caption (or --captions-file FILE)")
    return out  # empty or undecodable captions: SampleConfig.validate says which


def sample(config: SampleConfig, run: LoadedRun | None = None,
           warn: WarnFn | None = None, on_image: ImageFn | None = None,
           on_tokens: Callable[[int], None] | None = None,
           reranker=None) -> list[CaptionResult]:
    """Generate ``config.n`` images per caption; write them when ``config.out`` is set.

    Returns one :class:`~kodalle_cli.output.CaptionResult` per caption (PIL images +
    metadata), in caption order. ``run``: an already loaded model (else
    ``config.checkpoint`` is loaded). ``on_image(caption_index, image_index, image)`` as
    each image is decoded, in generation order (before any reranking); ``on_tokens(k)`` as
    ``k`` more image tokens are drawn (of ``captions * n * image_seq_len``). ``reranker``:
    ``config.rerank`` already loaded (a server loads it once).
    """
    from kodalle_cli.progress import progress_bar

    warn = warn or warn_user
    settings = config.validate()
    device = pick_device(config.device)
    dtype = pick_dtype(config.precision, device)
    if reranker is None and config.rerank is not None:
        reranker = _load_reranker(config.rerank, device)

    run = (run or load_run(config.checkpoint, "cpu", runs_dir=config.runs_dir,
                           backbone=config.backbone, vqgan=config.vqgan)).ready_to_sample()
    model = run.model.to(device=device, dtype=dtype).eval()
    vqgan = run.vqgan.to(device).eval()
    check_vqgan(model, vqgan, getattr(vqgan, "source", "given"), run.downsample_factor)
    for message in _setting_warnings(settings, run):
        warn(message)
    # any integer is a seed, negative ones included: the same seed, the same images
    seed = new_seed() if config.seed is None else int(config.seed)

    prompt = _image_prompt(config, model, vqgan) if config.init_image is not None else None
    encoded = [run.caption_encoder.encode(c) for c in _captions(config, run)]
    if not encoded:  # --init-image alone: the null caption (see _null_caption)
        encoded = [_null_caption(run, warn)]
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
                if on_image is not None:
                    on_image(row.caption_index, row.image_index, img)
            progress.advance(done, len(chunk))

        def drawn(k: int) -> None:
            progress.advance(tokens, k)
            if on_tokens is not None:
                on_tokens(k)

        codes, logprobs = generate_rows(
            model, texts, rows, seed, settings, config.batch_size, device,
            on_batch=decode, on_tokens=drawn, return_logprobs=True,
            init_codes=prompt.codes if prompt is not None else None,
        )
    seconds = time.perf_counter() - started

    recorded = _settings_record(config, settings, model, device, dtype)
    results = []
    named = [c or f"{Path(config.init_image).stem}-completed" for c in captions]
    slugs = unique_slugs(named, config.out) if config.out is not None else [
        slugify(c) for c in named]
    for c, (caption, enc) in enumerate(zip(captions, encoded, strict=True)):
        order = list(range(config.n))
        mine = [images[(c, i)] for i in order]
        scores = None
        if reranker is not None:
            from kodalle_cli.rerank.rank import keep_best

            order, scores = keep_best(reranker, mine, caption, config.keep)
        mean_logprobs = [round(float(x), 6) for x in
                         logprobs[c * config.n : (c + 1) * config.n]]
        if config.rank == "perplexity":  # ru-dalle's ranking: the model's own likelihood
            order = sorted(order, key=lambda i: (-mean_logprobs[i], i))[: config.keep]
        ranked_by = "rerank" if reranker is not None else config.rank
        caption_codes = codes[c * config.n : (c + 1) * config.n]
        meta = caption_metadata(enc, c, model.config.text_seq_len, seed, dict(recorded),
                                run.source, run.info, seconds, order, scores,
                                logprobs=mean_logprobs, ranked_by=ranked_by,
                                init_image=prompt.record() if prompt is not None else None)
        if config.attr:
            meta["attributes"] = list(config.attr)
        result = CaptionResult(caption, [mine[i] for i in order], meta, None,
                               caption_codes[order],
                               prompt=prompt.image if prompt is not None else None)
        if config.out is not None:
            result.directory = write_caption_dir(Path(config.out) / slugs[c], result)
        results.append(result)
    return results


def _captions(config: SampleConfig, run: LoadedRun) -> list[str]:
    """The captions to draw: as given, or built from ``--attr`` the way the run's training
    captions were (:mod:`kodalle_cli.attributes`)."""
    if not config.attr:
        return list(config.captions)
    from kodalle_cli.attributes import attribute_caption, record_of

    return [attribute_caption(record_of(run.config, run.source), config.attr)]


def _null_caption(run: LoadedRun, warn: WarnFn):
    """The caption a model trained with --cond-drop learnt as "no caption": all padding.
    A run trained without it never saw one: an error, not a silent bad image."""
    from kodalle_cli.text import EncodedCaption

    train = run.config.get("train")
    cond_drop = train.get("cond_drop") if isinstance(train, dict) else None
    if cond_drop is not None and not cond_drop > 0:
        raise UsageError(
            "--init-image without a caption needs a model trained with --cond-drop (it "
            "learns the empty caption); this one was not: give a caption too")
    if cond_drop is None:
        warn("--init-image without a caption: drawing under the empty caption, which only "
             "a model trained with --cond-drop has learnt (this checkpoint does not say)")
    cfg = run.model.config
    return EncodedCaption("", [cfg.pad_id] * cfg.text_seq_len, 0, 0, 0)


class ImagePrompt:
    """``--init-image``: the image at the model's size, its codes and how many are kept."""

    def __init__(self, source: Path, image: Image.Image, codes: torch.Tensor, kept: int,
                 fmap_size: int):
        self.source, self.image, self.kept, self.fmap_size = source, image, kept, fmap_size
        self.all_codes = codes  # [1, image_seq_len]
        self.codes = codes[:, :kept]

    def record(self) -> dict:
        """metadata.json's ``init_image``."""
        rows = self.kept / self.fmap_size
        return {"source": str(self.source), "file": "prompt.png", "kept_tokens": self.kept,
                "kept_rows": int(rows) if rows == int(rows) else round(rows, 3),
                "fmap_size": self.fmap_size, "codes": self.codes[0].tolist()}


def _image_prompt(config: SampleConfig, model, vqgan) -> ImagePrompt:
    """Encode ``--init-image`` (fitted to the model's image size, its grid times the
    VQGAN's downsampling factor, padded with white like ``prepare``'s default) and take
    its first ``--init-tokens`` codes, or its top ``--init-rows`` rows (default: half the
    rows)."""
    from kodalle_cli.data.images import ImageError, fit, open_image, to_tensor
    from kodalle_cli.errors import ConfigError

    path = Path(config.init_image)
    try:
        image = open_image(path)[0]
    except ImageError as exc:
        raise KodalleError(f"--init-image {path}: {exc}") from None
    size = model.config.image_fmap_size * vqgan.downsample_factor
    if image.size != (size, size):
        image = fit(image, size, "pad")
    codes = vqgan.encode(to_tensor([image]).to(vqgan.device)).cpu().long()
    steps, fmap = model.image_seq_len, model.config.image_fmap_size
    if codes.shape[1] != steps:
        raise KodalleError(f"--init-image: the VQGAN gives {codes.shape[1]} codes, the model "
                           f"draws {steps}")
    if config.init_tokens is not None:
        name, value, kept = "init_tokens", config.init_tokens, config.init_tokens
    else:
        rows = config.init_rows if config.init_rows is not None else max(fmap // 2, 1)
        name, value, kept = "init_rows", rows, rows * fmap
    if kept >= steps:
        raise ConfigError(name, value, f"must leave codes to draw: the model's images are "
                          f"{fmap} rows of {fmap} codes ({steps})")
    return ImagePrompt(path, image, codes, kept, fmap)


def _setting_warnings(settings: SamplingSettings, run: LoadedRun) -> list[str]:
    """What a user should hear about settings that run but will not do what they expect."""
    out = []
    cfg = run.model.config
    if settings.cond_scale != 1:
        train = run.config.get("train")
        cond_drop = train.get("cond_drop") if isinstance(train, dict) else None
        if cond_drop is not None and not cond_drop > 0:
            out.append(
                f"--cond-scale {settings.cond_scale}: this model was trained without "
                "--cond-drop, so it never learnt an image without a caption; guidance "
                "subtracts an untrained prediction and will likely make the images worse "
                "(train with --cond-drop 0.1 to use it)"
            )
    if settings.top_k is not None and settings.top_k >= 1 and settings.top_k >= (
            cfg.num_image_tokens):
        out.append(f"--top-k {settings.top_k:g} keeps every one of the model's "
                   f"{cfg.num_image_tokens} image codes: no top-k filtering")
    return out


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
        "rank": config.rank,
        "keep": config.keep,
    }


def _load_reranker(path: Path, device: torch.device):
    try:
        from kodalle_cli.rerank.rank import load_reranker
    except ImportError as exc:
        raise KodalleError(f"--rerank is not available in this build: {exc}") from exc
    return load_reranker(path, device=device)
