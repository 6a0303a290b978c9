"""What each command takes: its config dataclass, with every default and its help in one place.

The library functions take these objects (``run_train(DalleTrainConfig(...))``); the CLI
turns their fields into options (:func:`kodalle_cli.cli_options.options_from`), so a default such
as ``lr=3e-5`` is written once, here. The module imports nothing heavy (no torch): the CLI
reads it on every start-up, ``kodalle --help`` included. Checks that need the library run in
the library (``SampleConfig.validate`` imports the sampling settings when called).

``kodalle train vqgan`` starts from a recipe instead (:mod:`kodalle_cli.vqgan.train`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kodalle_cli.errors import ConfigError, UsageError
from kodalle_cli.options import opt

DEVICE_HELP = "auto|cpu|cuda"
CROP_MODES = ("none", "garments")  # prepare --crop
MIN_FID_IMAGES = 2  # FID's covariance needs two images in each set (1000+ for stable numbers)


# options that change what a shard holds (a resumed run must match them)
_CONTENT_OPTIONS = ("caption_style", "include_style", "caption_pick", "crop", "crop_margin",
                    "image_size", "resize", "val_fraction", "shard_size", "max_pixels")


@dataclass
class PrepareConfig:
    """``kodalle prepare``."""

    source: Path
    out: Path = opt(Path("shards"), "Output directory for shards.", "-o")
    format: str = opt("auto", "Input layout: auto, kfashion, folder, jsonl or csv.")
    caption_style: str = opt("per-part", "Caption style: per-part, per-attribute or compact.")
    include_style: bool = opt(False, "Add the style (스타일) sentence.")
    caption_pick: str = opt("all", "folder format: first|all caption lines.")
    crop: str = opt("none", "none|garments (crop to the labelled rectangles).")
    crop_margin: float = opt(0.05, "Margin around the garment crop.")
    image_size: int = opt(256, "Output side in pixels.")
    resize: str = opt("pad", "pad|center-crop|stretch")
    val_fraction: float = opt(0.0, "Share of samples for val shards.")
    shard_size: int = opt(10000, "Samples per shard.")
    workers: int = opt(0, "Worker processes (0: all cores).")
    strict: bool = opt(False, "Stop at the first bad sample.")
    progress: bool = opt(True, "Show a progress bar.")
    max_pixels: int | None = None  # None: PIL's limit (data.images.MAX_PIXELS)

    def __post_init__(self):
        if self.max_pixels is None:
            from kodalle_cli.data.images import MAX_PIXELS

            self.max_pixels = MAX_PIXELS

    def validate(self) -> None:
        from kodalle_cli.data.captions import CAPTION_STYLES
        from kodalle_cli.data.images import RESIZE_MODES
        from kodalle_cli.data.sources import FORMATS

        def choice(name, value, allowed):
            if value not in allowed:
                raise UsageError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}")

        choice("format", self.format, FORMATS)
        choice("caption-style", self.caption_style, CAPTION_STYLES)
        choice("caption-pick", self.caption_pick, ("first", "all"))
        choice("crop", self.crop, CROP_MODES)
        choice("resize", self.resize, RESIZE_MODES)
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError("--val-fraction must be in [0, 1)")
        if not 0.0 <= self.crop_margin <= 1.0:
            raise UsageError("--crop-margin must be in [0, 1]")
        if self.image_size < 8:
            raise UsageError("--image-size must be at least 8")
        if self.shard_size < 1:
            raise UsageError("--shard-size must be at least 1")
        if self.workers < 0:
            raise UsageError("--workers must be 0 (all cores) or more")

    def options(self) -> dict:
        d = asdict(self)
        d.pop("progress")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}

    def fingerprint(self) -> str:
        content = {k: getattr(self, k) for k in _CONTENT_OPTIONS}
        return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TokenizeConfig:
    """``kodalle tokenize``."""

    vqgan: str = opt(..., "VQGAN checkpoint path or preset name.")
    backbone: str = opt(..., "Backbone name (see `kodalle backbones`).")
    shards: Path = Path("shards")  # the command's argument
    vqgan_config: Path | None = opt(None, "taming .yaml for a .ckpt.")
    backbone_path: Path | None = opt(None, "Local copy of the backbone.")
    text_seq_len: int = opt(128, "Text tokens per caption (padded/truncated).")
    out: Path | None = opt(None, "Output directory (default SHARDS/tokens).")
    batch_size: int = opt(32, "Images per VQGAN batch.")
    max_bad_fraction: float = opt(
        0.01, "Skip unreadable samples (warning for each); stop when more than this share "
        "of the images is bad.")
    device: str = opt("auto", DEVICE_HELP)
    splits: tuple[str, ...] = ("train", "val")
    progress: bool = opt(True, "Show a progress bar.")


# What `kodalle train` may change when it resumes a run (any other difference from the run's
# config.json is refused, naming the settings): when to stop, save, log and evaluate, and
# where and how fast it runs. --data may point elsewhere; its tokenizer and VQGAN are checked.
TRAIN_RESUME_MAY_CHANGE = (
    "max_steps", "epochs", "save_every", "keep_last", "eval_every", "eval_batches",
    "sample_every", "sample_captions", "log_every", "max_bad_steps", "max_bad_fraction",
    "check_shards",
    "workers", "progress", "device", "precision", "compile", "grad_checkpointing", "resume",
    "out", "data", "vqgan", "backbone_path",
)


@dataclass
class DalleTrainConfig:
    """``kodalle train`` (the DALLE transformer)."""

    backbone: str
    backbone_path: str | None = opt(None, "Local copy of the backbone.")
    data: Path = opt(Path("shards"), "Token shards, or image shards + --vqgan.")
    out: Path | None = opt(None, "Run directory (default runs/BACKBONE).")
    vqgan: str | None = opt(None, "VQGAN for image shards not tokenized yet.")
    dim: int | None = opt(None, "Model dim (default: the backbone's).")
    depth: int = opt(16, "Transformer layers.")
    heads: int = opt(8, "Attention heads.")
    dim_head: int = opt(64, "Size of each attention head.")
    text_seq_len: int | None = opt(
        None, "Caption tokens (default: the token shards', KoDALLE's 128).")
    freeze_text_emb: bool = opt(False, "Keep the backbone tables fixed.")
    text_encoder: str = opt(
        "tables", "tables (KoDALLE: the backbone's token and position tables) or "
        "contextual (its whole language model, frozen; its hidden states are the text).")
    text_layer: int = opt(-1, "contextual: the layer whose states are used (-1: the last).")
    text_loss_weight: float = opt(
        1.0, "Weight of the text loss (0: no text head; contextual has none).")
    loss_img_weight: float = opt(7.0, "Weight of the image loss against the text loss.")
    text_loss_on_padding: bool = opt(False, "Count padding in the text loss.")
    cond_drop: float = opt(0.0, "Share of captions dropped (for guidance).")
    lr: float = opt(3e-5, "Peak learning rate (AdamW).")
    weight_decay: float = opt(3e-3, "AdamW weight decay.")
    schedule: str = opt("cosine", "cosine|constant (after warm-up).")
    warmup_steps: int = opt(100, "Linear warm-up steps.")
    batch_size: int = opt(40, "Samples per step on each rank.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    grad_clip: float = opt(0.5, "Gradient norm clip.")
    precision: str = opt("auto", "auto|bf16|fp16|fp32")
    grad_checkpointing: bool = opt(False, "Recompute activations in backward (less memory).")
    # DALLE-pytorch 1.6.6's model options (kodalle_cli/model/dalle.py explains them)
    reversible: bool = opt(False, "Reversible layers (less activation memory).")
    rotary: bool = opt(False, "Rotary embeddings instead of position tables.")
    shift_tokens: bool = opt(False, "DALLE-pytorch's token shift.")
    attn_types: str = opt(
        "full", "Comma list cycled over layers: full, axial_row, axial_col, conv_like.")
    compile: bool = opt(False, "torch.compile the model.")
    strategy: str = opt(
        "ddp", "ddp|fsdp: replicate the model on every rank, or shard it (FSDP2) for models "
        "too big for one GPU. A run resumes only with its own strategy.")
    max_steps: int | None = opt(None, "Optimizer steps (or give --epochs).")
    epochs: float | None = opt(None, "Passes over the training shards.")
    seed: int = opt(0, "Seed of initialisation, data order and dropout.")
    save_every: int = opt(1000, "Checkpoint every N steps.")
    keep_last: int = opt(3, "Checkpoints kept (0: all).")
    eval_every: int = opt(500, "Validation loss every N steps.")
    eval_batches: int = opt(50, "Validation batches per evaluation.")
    sample_every: int = opt(1000, "Preview grid every N steps (0: never).")
    sample_captions: int = opt(4, "Validation captions in each preview grid.")
    log_every: int = opt(10, "Steps between metrics.csv rows.")
    resume: bool = opt(
        False, "Continue the run in --out (a run with a checkpoint continues anyway). Only "
        "these may differ from the run's settings: " + ", ".join(
            "--" + n.replace("_", "-") for n in TRAIN_RESUME_MAY_CHANGE
            if n not in ("resume", "out")) + ".")
    max_bad_steps: int = opt(10, "Stop after this many non-finite losses in a row.")
    max_bad_fraction: float = opt(
        0.01, "Skip bad samples in the token shards (warning for each); stop when more than "
        "this share of a split is bad.")
    check_shards: str = opt(
        "new", "Check the token shards before training: full (every shard), new (only the "
        "shards new or changed since this run's last check, cached in the run directory) "
        "or off (trust the manifest).")
    device: str = opt("auto", DEVICE_HELP)
    workers: int = opt(2, "Data-loader worker processes per rank.")
    progress: bool = opt(True, "Show the progress bar.")


# What a resumed `train reranker` may change (any other difference from the run's
# train_config.json is refused, naming the settings): when to stop, save and evaluate, and where
# and how fast it runs; --data may point elsewhere.
RERANKER_RESUME_MAY_CHANGE = (
    "max_steps", "eval_every", "eval_samples", "save_every", "keep_last", "device",
    "precision", "resume", "out", "data", "backbone_path", "image_weights",
)


@dataclass
class RerankerTrainConfig:
    """``kodalle train reranker``."""

    backbone: str = opt(..., "Backbone for the text tower (its full model).")
    backbone_path: str | None = opt(None, "Local copy of the backbone.")
    data: str = opt("shards", "Image shards from `kodalle prepare`.")
    out: str = opt("runs/reranker", "Run and reranker directory.")
    image_size: int = opt(224, "Image side for the EfficientNet-B0 tower.")
    embed_dim: int = opt(256, "Shared embedding size.")
    text_seq_len: int = opt(64, "Caption tokens (truncated beyond).")
    image_weights: str | None = opt(
        None, "EfficientNet-B0 weights file (default: timm's cache, else random).")
    max_steps: int = opt(1000, "Optimizer steps.")
    batch_size: int = opt(32, "Image-caption pairs per step.")
    lr: float = opt(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    warmup_steps: int = opt(100, "Linear warm-up steps.")
    grad_clip: float = opt(1.0, "Gradient norm clip.")
    shuffle_buffer: int = opt(1000, "Pairs in the shuffle buffer.")
    eval_every: int = opt(200, "Validation retrieval accuracy every N steps.")
    eval_samples: int = opt(256, "Validation pairs for retrieval accuracy.")
    save_every: int = opt(500, "Checkpoint every N steps.")
    keep_last: int = opt(2, "Checkpoints kept (0: all).")
    seed: int = opt(0, "Seed of initialisation and data order.")
    device: str = opt("auto", DEVICE_HELP)
    precision: str = opt("auto", "auto|bf16|fp16|fp32")
    resume: bool = opt(False, "Continue the run in --out.")


RANKINGS = ("perplexity",)  # --rank (the reranker is --rerank PATH)


@dataclass
class SampleConfig:
    """``kodalle sample``. ``out=None``: return images without writing."""

    captions: list[str]
    n: int = opt(16, "Images per caption.", "-n", "--num-images")
    checkpoint: Path | None = opt(
        None, "Run dir, checkpoint dir, or KoDALLE / dalle-pytorch .pt (default: the latest "
        "checkpoint of the newest run under runs/).")
    out: Path | None = opt(Path("samples"), "Output directory.", "-o")
    batch_size: int = opt(16, "Images per forward (results do not depend on it).")
    top_k: float | None = opt(
        0.9, "Count (>= 1: keep K tokens) or fraction in [0, 1) like dalle-pytorch's "
        "filter_thres (0.9 keeps the top 10%).")
    top_p: float | None = opt(
        None, "Nucleus sampling: keep the top tokens whose probability reaches P.")
    temperature: float = opt(1.0, "Softmax temperature (0: greedy).")
    cond_scale: float = opt(1.0, "Classifier-free guidance scale (1: off).")
    seed: int | None = opt(None, "Make the call reproducible (any integer, negative ones "
                           "too: each gives its own images, the same every time).")
    rerank: Path | None = opt(None, "Reranker run directory.")
    rank: str | None = opt(
        None, "perplexity: best first by the model's own mean log-probability of its codes "
        "(free, no reranker). Example: --rank perplexity --keep 4")
    keep: int | None = opt(None, "With --rerank or --rank: keep the best K.")
    attr: list[str] | None = opt(
        None, "Caption from attributes, PART.NAME=VALUE, repeated, built as the run's "
        "training captions (see `kodalle attributes`). Example: --attr 상의.색상=레드 "
        "--attr 상의.카테고리=티셔츠", metavar="<str>")
    init_image: Path | None = opt(
        None, "Image prompt: keep its top code rows, draw the rest (no caption: the "
        "--cond-drop null caption). Example: --init-image a.jpg --init-rows 8")
    init_rows: int | None = opt(None, "With --init-image: code rows kept (default: half).")
    init_tokens: int | None = opt(None, "With --init-image: codes kept, in raster order.")
    device: str = opt("auto", DEVICE_HELP)
    precision: str = opt("auto", "auto (bf16 on GPUs that have it)|bf16|fp32")
    runs_dir: Path = Path("runs")
    backbone: str | None = opt(
        None, "For a bare .pt: the backbone whose tokenizer it was trained with.")
    vqgan: str | None = opt(None, "For a bare .pt: the VQGAN (path or preset).")
    progress: bool = True

    def settings(self):
        """The decoding settings (:class:`kodalle_cli.model.sampling.SamplingSettings`)."""
        from kodalle_cli.model.sampling import SamplingSettings

        return SamplingSettings(
            top_k=self.top_k, top_p=self.top_p, temperature=self.temperature,
            cond_scale=self.cond_scale,
        ).validate()

    def validate(self):
        """Every check of the options (usage errors before anything is loaded); returns the
        sampling settings. Any integer is a seed, negative ones included: ``--seed -1``
        gives the same images every time (other ones than ``--seed 1``)."""
        settings = self.settings()
        self._validate_prompts()
        if not self.captions and not self.attr and self.init_image is None:
            raise UsageError("give at least one caption")
        for i, caption in enumerate(self.captions, 1):
            which = f"caption {i}" if len(self.captions) > 1 else "the caption"
            if not isinstance(caption, str) or not caption.strip():
                raise UsageError(f"{which} is empty: give the text to draw")
            try:
                caption.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"{which} holds bytes that are not text (not UTF-8): "
                                 "give it as UTF-8") from None
        if self.n < 1:
            raise UsageError(f"-n {self.n}: give at least 1 image per caption")
        if self.batch_size < 1:
            raise ConfigError("batch_size", self.batch_size, "must be at least 1")
        if self.rank is not None and self.rank not in RANKINGS:
            raise UsageError(f"--rank {self.rank!r}: choose {', '.join(RANKINGS)}")
        if self.rank is not None and self.rerank is not None:
            raise UsageError("--rank and --rerank both order the images: give one")
        if self.keep is not None and self.rerank is None and self.rank is None:
            raise UsageError("--keep needs --rerank RERANKER (or --rank perplexity)")
        if self.keep is not None and not 1 <= self.keep <= self.n:
            raise UsageError(f"--keep {self.keep}: must be between 1 and -n {self.n}")
        return settings

    def _validate_prompts(self) -> None:
        """--attr and --init-image: what can be checked before the run is loaded."""
        if self.attr and self.captions:
            raise UsageError("give captions or --attr, not both (--attr builds the caption)")
        if self.init_image is None and (self.init_rows is not None
                                        or self.init_tokens is not None):
            which = "--init-rows" if self.init_rows is not None else "--init-tokens"
            raise UsageError(f"{which} needs --init-image PATH")
        if self.init_rows is not None and self.init_tokens is not None:
            raise UsageError("give --init-rows or --init-tokens, not both")
        for name in ("init_rows", "init_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, value, "keep at least 1 (and leave some to draw)")
        if self.init_image is not None and not Path(self.init_image).is_file():
            raise UsageError(f"--init-image {self.init_image}: no such file")


@dataclass
class ScoreConfig:
    """``kodalle score``."""

    checkpoint: str | None = opt(None, "Run to generate images with.")
    data: str = opt("shards", "Shards with the validation split.")
    images: str | None = opt(None, "Score these images instead of generating.")
    num_samples: int = opt(1000, "Validation captions (and images) to use.")
    inception_weights: str | None = opt(
        None, "torch-fidelity Inception weights (else its cache, else download).")
    reranker: str | None = opt(None, "Reranker for CLIP-score, R-precision.")
    out: str | None = opt(None, "Where score.json goes (default RUN/score, or IMAGES-score).")
    split: str = opt("val", "Split of --data to compare with.")
    image_size: int | None = opt(
        None, "Side both sets are scored at (default: the generated images').")
    distractors: int = opt(99, "R-precision: captions ranked against the true one.")
    batch_size: int = opt(16, "Images per forward.")
    seed: int = opt(0, "Seed of generation.")
    device: str = opt("auto", DEVICE_HELP)
    fidelity: bool = opt(True, "FID, KID and IS (needs Inception weights).")
    copies: bool = opt(
        True, "Memorisation: each image's nearest training image and the share of "
        "near-copies (closer than 99% of validation images are).")
    copy_pool: int = opt(0, "Memorisation: training images compared (0: all).")
    progress: bool = True  # generation progress bar (on stdout: off for --json)

    def validate(self) -> None:
        """Every check of the options, before anything is read or loaded."""
        if (self.checkpoint is None) == (self.images is None):
            raise UsageError("kodalle score needs exactly one of --checkpoint RUN or "
                             "--images DIR")
        least = MIN_FID_IMAGES if self.fidelity else 1
        if self.num_samples < least:
            raise ConfigError("num_samples", self.num_samples,
                              f"FID needs at least {MIN_FID_IMAGES} images in each set (a "
                              f"covariance); give {MIN_FID_IMAGES} or more (1000+ is usual)"
                              if self.fidelity else "must be at least 1")
        for name in ("batch_size", "distractors"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be at least 1")
        if self.copy_pool < 0:
            raise ConfigError("copy_pool", self.copy_pool, "must be 0 (all) or more")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError("image_size", self.image_size, "must be at least 8 pixels")


@dataclass
class ServeConfig:
    """``kodalle serve``. Per-request settings (caption, -n, seed, top-k, temperature,
    guidance) come from the page, with :class:`SampleConfig`'s defaults."""

    checkpoint: Path | None = opt(
        None, "Run dir, checkpoint dir, or KoDALLE / dalle-pytorch .pt (default: the latest "
        "checkpoint of the newest run under runs/).")
    reranker: Path | None = opt(None, "Reranker run directory: rank every request's images.")
    host: str = opt("127.0.0.1", "Address to listen on (0.0.0.0: every network, no "
                    "authentication).")
    port: int = opt(8000, "Port to listen on (0: any free one).", min=0, max=65535)
    out: Path = opt(Path("samples/serve"), "Where generated images are written (the only "
                    "folder requests read or write).", "-o")
    batch_size: int = opt(4, "Images per forward (smaller: the first ones show sooner).",
                          min=1)
    device: str = opt("auto", DEVICE_HELP)
    precision: str = opt("auto", "auto (bf16 on GPUs that have it)|bf16|fp32")
    backbone: str | None = opt(
        None, "For a bare .pt: the backbone whose tokenizer it was trained with.")
    vqgan: str | None = opt(None, "For a bare .pt: the VQGAN (path or preset).")
    runs_dir: Path = Path("runs")
