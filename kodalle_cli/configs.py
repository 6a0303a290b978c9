"""What each command takes: its config dataclass, with every default and its help in one place.

The library functions take these objects (``run_train(DalleTrainConfig(...))``); the CLI
turns their fields into options (:func:`kodalle_cli.cli_options.options_from`), so a default such
as ``lr=3e-5`` is written once, here. The module imports nothing heavy (no torch): the CLI
reads it on every start-up, ``kodalle --help`` included. Checks that need the library run in
the library (``SampleConfig.validate`` imports the sampling settings when called).

``kodalle train vqgan`` starts from a recipe: its fields whose default is None are the
recipe's (:data:`VQGAN_RECIPES`).
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
# where shards may be (kodalle_cli.data.urls), and the --manifest given apart
SHARDS_WHERE = ("a folder, an http(s) URL (a folder URL ends with /), a brace pattern "
                "(a name with {000..099} in it) or a pipe: command (pipe:cat ...)")
MANIFEST_HELP = ("The shards' manifest.json (a path, URL or pipe: command), when it is not "
                 "in the same place as the shards.")


def log_option():
    """``--log`` (repeatable; also ``--log-to``): the dashboards besides metrics.csv, for the
    three training commands (:mod:`kodalle_cli.train.loggers`)."""
    return opt(None, "Also log to tensorboard (OUT/tensorboard) or wandb (set WANDB_MODE to "
               "offline to run without a network); repeat for both. metrics.csv is always written. "
               "Under torchrun write --log-to (torchrun takes --log for its --log-dir).",
               "--log", "--log-to", factory=lambda: ["csv"], metavar="NAME")


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
    shards: str = "shards"  # the command's argument: a folder, URL, pattern or pipe: command
    manifest: str | None = opt(None, MANIFEST_HELP)
    vqgan_config: Path | None = opt(None, "taming .yaml for a .ckpt.")
    backbone_path: Path | None = opt(None, "Local copy of the backbone.")
    text_seq_len: int = opt(128, "Text tokens per caption (padded/truncated).")
    out: Path | None = opt(None, "Output directory, a local folder only (default "
                                 "SHARDS/tokens; needed for remote SHARDS).")
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
    "check_shards", "log",
    "workers", "progress", "device", "precision", "compile", "grad_checkpointing", "resume",
    "dry_run", "force",
    "out", "data", "manifest", "vqgan", "backbone_path",
)


@dataclass
class DalleTrainConfig:
    """``kodalle train`` (the DALLE transformer)."""

    backbone: str
    backbone_path: str | None = opt(None, "Local copy of the backbone.")
    data: str = opt("shards", f"Token shards: {SHARDS_WHERE}; or local image shards + --vqgan.")
    manifest: str | None = opt(None, MANIFEST_HELP)
    out: Path | None = opt(None, "Run directory (default runs/BACKBONE).")
    vqgan: str | None = opt(None, "VQGAN for image shards not tokenized yet.")
    caption_style: str = opt(
        "as-prepared", "Which caption of a K-Fashion sample to train on: as-prepared (the "
        "one `prepare` wrote), mixed (per-part, per-attribute or compact, drawn per sample "
        "and epoch from --seed), or one of those styles.")
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
    null_caption: str = opt(
        "pad", "contextual: what a dropped caption (and guidance's unconditional row) reads "
        "as: pad (the LM's states of a lone pad token) or learned (a trained table).")
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
    log: list[str] = log_option()
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
    dry_run: bool = opt(
        False, "Print the parameters, FLOPs per sample, memory per GPU and time of this exact "
        "config (`kodalle plan`'s numbers) and exit without training.")
    force: bool = opt(
        False, "Train even when the estimated memory per GPU exceeds the device's (train "
        "refuses such a config otherwise, before reading the data).")


# What a resumed `train reranker` may change (any other difference from the run's
# train_config.json is refused, naming the settings): when to stop, save and evaluate, and where
# and how fast it runs; --data may point elsewhere.
RERANKER_RESUME_MAY_CHANGE = (
    "max_steps", "eval_every", "eval_samples", "save_every", "keep_last", "device",
    "precision", "resume", "out", "data", "manifest", "backbone_path", "image_weights", "log",
)


@dataclass
class RerankerTrainConfig:
    """``kodalle train reranker``."""

    backbone: str = opt(..., "Backbone for the text tower (its full model).")
    backbone_path: str | None = opt(None, "Local copy of the backbone.")
    data: str = opt("shards", f"Image shards from `kodalle prepare`: {SHARDS_WHERE}.")
    manifest: str | None = opt(None, MANIFEST_HELP)
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
    eval_every: int = opt(200, "Validation retrieval accuracy and preview grid every N steps.")
    eval_samples: int = opt(256, "Validation pairs for retrieval accuracy.")
    save_every: int = opt(500, "Checkpoint every N steps.")
    keep_last: int = opt(2, "Checkpoints kept (0: all).")
    log: list[str] = log_option()
    seed: int = opt(0, "Seed of initialisation and data order.")
    device: str = opt("auto", DEVICE_HELP)
    precision: str = opt("auto", "auto|bf16|fp16|fp32")
    resume: bool = opt(False, "Continue the run in --out.")


def _integers(text: str) -> tuple[int, ...]:
    """``--ch-mult 1,1,2,2,4`` as ``(1, 1, 2, 2, 4)``."""
    try:
        return tuple(int(m) for m in text.split(","))
    except ValueError:
        raise UsageError(f"--ch-mult must be integers like 1,1,2,2,4, got {text!r}") from None


_RECIPE_DEFAULT = "default: the recipe's."


@dataclass
class VQGANTrainConfig:
    """``kodalle train vqgan``. A field whose default is None is the recipe's
    (:data:`VQGAN_RECIPES`): it is filled in when the config is made."""

    data: str = opt("shards", f"Image shards from `kodalle prepare`: {SHARDS_WHERE}.")
    manifest: str | None = opt(None, MANIFEST_HELP)
    out: Path = opt(Path("runs/vqgan"), "Run directory.", "-o")
    recipe: str = opt(
        "kodalle", "Settings to start from: kodalle (256 px, f16, 16384 codes) or small-flat "
        "(32 px, f4, 512 unit-norm codes: small flat-colour images); an option whose default "
        "is the recipe's overrides it. docs/vqgan.md explains them.")
    ch: int | None = opt(None, "Base channels (a multiple of 32); " + _RECIPE_DEFAULT)
    ch_mult: tuple[int, ...] | None = opt(
        None, "Channel multipliers, f = 2^(len-1), like 1,1,2,2,4; " + _RECIPE_DEFAULT,
        parser=_integers, metavar="N,N,...")
    n_embed: int | None = opt(None, "Codebook size; " + _RECIPE_DEFAULT)
    embed_dim: int | None = opt(None, "Code vector size; " + _RECIPE_DEFAULT)
    l2_codes: bool | None = opt(
        None, "Match features to codes on the unit sphere (ViT-VQGAN); " + _RECIPE_DEFAULT)
    resolution: int | None = opt(None, "Training image side; " + _RECIPE_DEFAULT)
    num_res_blocks: int | None = opt(None, "Residual blocks per level; " + _RECIPE_DEFAULT)
    attn_resolutions: tuple[int, ...] | None = None  # the recipe's; None: the code grid
    lpips_weights: Path | None = opt(
        None, "taming LPIPS state_dict, a .pth or .safetensors file; else no perceptual loss.")
    perceptual_weight: float = 1.0
    disc_start: int | None = opt(
        None, "Step at which the discriminator starts (default: no discriminator).")
    disc_weight: float = opt(0.8, "Discriminator loss weight.")
    codebook_weight: float = 1.0
    lr: float | None = opt(None, "Adam learning rate; " + _RECIPE_DEFAULT)
    batch_size: int | None = opt(None, "Images per step; " + _RECIPE_DEFAULT, min=1)
    max_steps: int | None = opt(None, "Optimizer steps; " + _RECIPE_DEFAULT, min=1)
    save_every: int = opt(1000, "Checkpoint (and validate) every N steps.", min=1)
    keep_last: int = opt(2, "Checkpoints kept (0: all).")
    log_every: int = opt(10, "metrics.csv row every N steps.", min=1)
    log: list[str] = log_option()
    restart_after: int | None = opt(
        None, "Restart codes unused for N steps; " + _RECIPE_DEFAULT, min=1)
    max_bad_fraction: float = 0.01  # unreadable images skipped; more than this share: stop
    resume: bool = opt(
        False, "Require a checkpoint in --out to continue (a run with one continues anyway).")
    seed: int = opt(0, "Seed of initialisation, data order and flips.")
    device: str = opt("auto", DEVICE_HELP)
    progress: bool = True

    def __post_init__(self):
        if self.recipe not in VQGAN_RECIPES:
            raise UsageError(f"unknown --recipe {self.recipe!r} "
                             f"(choose {', '.join(VQGAN_RECIPES)})")
        for name, value in VQGAN_RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def model_config(self):
        """The VQGAN's architecture (:class:`kodalle_cli.vqgan.model.VQGANConfig`)."""
        from kodalle_cli.vqgan.model import VQGANConfig

        f = 2 ** (len(self.ch_mult) - 1)
        if self.resolution % f:
            raise UsageError(f"--resolution {self.resolution} is not a multiple of {f}")
        if self.ch % 32:
            raise UsageError("--ch must be a multiple of 32 (GroupNorm groups)")
        attn = self.attn_resolutions
        if attn is None:
            attn = (self.resolution // f,)
        return VQGANConfig(kind="vq", n_embed=self.n_embed, embed_dim=self.embed_dim,
                           ch=self.ch, ch_mult=tuple(self.ch_mult),
                           num_res_blocks=self.num_res_blocks, attn_resolutions=tuple(attn),
                           resolution=self.resolution, z_channels=self.embed_dim,
                           extra={"base_learning_rate": self.lr / self.batch_size})


# The settings of `kodalle train vqgan --recipe NAME`: each recipe gives every field of
# VQGANTrainConfig whose default is None; options given override them. docs/vqgan.md says
# why each one is what it is.
VQGAN_RECIPES: dict[str, dict] = {
    # KoDALLE's tokenizer (taming's defaults): 256 px, f16 (16x16 = 256 codes), 16384 codes;
    # lr is taming's base_learning_rate 4.5e-6 x batch size 8
    "kodalle": dict(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                    attn_resolutions=None, n_embed=16384, embed_dim=256, l2_codes=False,
                    lr=3.6e-5, batch_size=8, restart_after=50, max_steps=10000),
    # small flat-colour product images (the demo's garments): 32 px, f4 (8x8 codes). Enough
    # channels per GroupNorm group to carry a flat colour, few unit-norm 8-dim codes, and a
    # learning rate a few hundred steps can use.
    "small-flat": dict(resolution=32, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1,
                       attn_resolutions=(), n_embed=512, embed_dim=8, l2_codes=True, lr=5e-4,
                       batch_size=8, restart_after=100, max_steps=2000),
}


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
    data: str = opt("shards", f"Image shards with the validation split: {SHARDS_WHERE}.")
    manifest: str | None = opt(None, MANIFEST_HELP)
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


# `kodalle plan`'s data rule (kodalle_cli.plan.DATA_RULE gives its sources): a model should
# see this many tokens per parameter, counting at most this many epochs of the data
TOKENS_PER_PARAM = 20.0
MAX_EPOCHS = 16.0


@dataclass
class PlanConfig:
    """``kodalle plan`` (the numbers and the rule: :mod:`kodalle_cli.plan`)."""

    data: Path = opt(Path("shards"), "Token shards (their manifest.json), or image shards "
                     "from `kodalle prepare` with --vqgan.")
    backbone: str | None = opt(
        None, "Backbone (its vocabulary and width; default: the token shards' own).")
    backbone_path: str | None = opt(None, "Local copy of the backbone.")
    vqgan: str | None = opt(None, "Image shards: the VQGAN that will tokenize them.")
    vqgan_config: str | None = opt(None, "taming .yaml for a --vqgan .ckpt.")
    text_seq_len: int = opt(128, "Image shards: caption tokens (token shards: theirs).")
    samples: int | None = opt(
        None, "Plan for this many training pairs instead of the shards' count.")
    gpus: int = opt(1, "GPUs to train on (DDP, or FSDP over them).")
    gpu_memory: float | None = opt(
        None, "GiB per GPU (default: --card's, else the device's).")
    card: str | None = opt(None, "A GPU whose datasheet peak (dense) and memory to plan for: "
                           "see the table above.")
    tflops: float | None = opt(
        None, "Peak TFLOPS per GPU at --precision, for a device that is not here.")
    mfu: float = opt(0.3, "Share of the peak a run reaches (with --card or --tflops).")
    hours: float = opt(168.0, "Training time to plan for.")
    precision: str = opt("bf16", "bf16|fp16|fp32 (autocast; weights stay fp32).")
    batch_size: int = opt(DalleTrainConfig.batch_size, "Samples per GPU per step.")
    freeze_text_emb: bool = opt(False, "Plan with the backbone's tables frozen.")
    text_loss_weight: float = opt(
        DalleTrainConfig.text_loss_weight, "As train's: 0 plans without the text head (with "
        "a large vocabulary its logits are a large share of the parameters and memory).")
    depth: int | None = opt(None, "Plan this depth only (with --dim: one config).")
    dim: int | None = opt(None, "Plan this width only (with --depth: one config).")
    heads: int = opt(DalleTrainConfig.heads, "Attention heads (train's default).")
    dim_head: int = opt(DalleTrainConfig.dim_head, "Size of each head (train's default).")
    tokens_per_param: float = opt(TOKENS_PER_PARAM, "Data rule: tokens to see per parameter.")
    max_epochs: float = opt(MAX_EPOCHS, "Data rule: epochs that count (repeats add little).")
    device: str = opt("auto", "Where to measure the throughput when neither --card nor "
                      "--tflops is given: auto|cpu|cuda.")
