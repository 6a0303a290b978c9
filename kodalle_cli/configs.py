"""What each command takes: its config dataclass, with every default and its help in one place.

The library functions take these objects (``run_train(DalleTrainConfig(...))``); the CLI
turns their fields into options (:func:`kodalle_cli.options.options_from`), so a default such
as ``lr=3e-5`` is written once, here. The module imports nothing heavy (no torch): the CLI
reads it on every start-up, ``kodalle --help`` included. Checks that need the library run in
the library (``SampleConfig.validate`` imports the sampling settings when called).

``kodalle prepare``'s config lives with prepare (:mod:`kodalle_cli.data.prepare`, itself
light); ``kodalle train vqgan`` starts from a recipe (:mod:`kodalle_cli.vqgan.train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kodalle_cli.errors import UsageError
from kodalle_cli.options import opt

DEVICE_HELP = "auto|cpu|cuda"


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
    device: str = opt("auto", DEVICE_HELP)
    splits: tuple[str, ...] = ("train", "val")
    progress: bool = opt(True, "Show a progress bar.")


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
    resume: bool = opt(False, "Continue the run in --out.")
    max_bad_steps: int = opt(10, "Stop after this many non-finite losses in a row.")
    device: str = opt("auto", DEVICE_HELP)
    workers: int = opt(2, "Data-loader worker processes per rank.")
    progress: bool = opt(True, "Show the progress bar.")


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
    seed: int | None = opt(None, "Make the call reproducible.")
    rerank: Path | None = opt(None, "Reranker run directory.")
    keep: int | None = opt(None, "With --rerank: keep the best K.")
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
        sampling settings."""
        settings = self.settings()
        if not self.captions:
            raise UsageError("give at least one caption")
        if self.n < 1 or self.batch_size < 1:
            raise UsageError("-n and --batch-size must be at least 1")
        if self.keep is not None and self.rerank is None:
            raise UsageError("--keep needs --rerank RERANKER")
        if self.keep is not None and not 1 <= self.keep <= self.n:
            raise UsageError(f"--keep {self.keep}: must be between 1 and -n {self.n}")
        return settings


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
    progress: bool = True  # generation progress bar (on stdout: off for --json)
