"""``kodalle plan`` and ``kodalle train --dry-run``: what a DALLE costs before it is trained.

Everything here is arithmetic on a :class:`~kodalle_cli.model.DALLEConfig` (no model is
built, so a 12B config is planned in microseconds); the tests check each formula against
the real thing.

Parameters (:func:`count_params`)
    Counted layer by layer as :class:`~kodalle_cli.model.DALLE` builds them; equal to
    ``sum(p.numel())`` of the built model for every architecture option.

Training FLOPs per sample (:func:`train_flops`)
    The sequence a training step sees is ``L = text_seq_len + image_seq_len`` positions
    (``<bos>``, the caption, every image code but the last). *Model FLOPs* follow PaLM's
    convention (Chowdhery et al. 2022, appendix B), the one MFU is quoted in:
    ``6 * N * L + 12 * depth * heads * dim_head * L**2`` where ``N`` are the parameters
    that multiply activations (the blocks' linear layers, the text projection, and for each
    position only the logits rows it computes: text rows for text positions, image rows for
    image positions). Embedding lookups cost nothing. Attention counts the whole ``L x L``
    score matrix, as ``torch.utils.flop_counter.FlopCounterMode`` does (dense kernels compute
    it; masking does not remove work). *Executed FLOPs* add what the run really computes:
    ``--reversible`` and ``--grad-checkpointing`` run each block's forward twice (8 N instead
    of 6 N), and a layer whose input needs no gradient (the text projection under frozen
    tables) skips that half of its backward. The tests hold the executed count within 5% of
    ``FlopCounterMode``'s.

Memory per GPU (:func:`memory`)
    Weights are fp32 (the trainer keeps fp32 weights and autocasts to bf16 / fp16), so
    4 bytes per parameter, 4 per trainable one for its gradient and 8 for AdamW's two
    moments; under 16-bit autocast the cast copies of the weight matrices that backward
    needs (2 bytes each). DDP over several GPUs adds its gradient buckets (4 bytes per
    trainable parameter); FSDP divides weights, gradients and AdamW state by the GPUs and
    gathers the non-block parameters and two blocks at a time. Activations are the tensors
    autograd saves, counted per position for this model's layers (:func:`activation_bytes`):
    every block's for plain training, each block's input plus one block's for
    ``--grad-checkpointing``, and the two residual streams plus one block's for
    ``--reversible``; plus the logits' log-softmax of the loss. The tests hold the total
    within 25% of the measured peak (process memory on the CPU, ``max_memory_allocated`` on
    CUDA). Not counted: the frozen language model of ``--text-encoder contextual``.

Fitting: ``plan`` recommends only configs under 90% of a card less 1 GiB
(:func:`usable_bytes`); ``train`` refuses one whose estimate exceeds the device's whole memory
(:func:`check_train_memory`, before any shard is read; ``--force`` skips it).

The recommendation (:func:`make_plan`) and its data rule are documented at :data:`DATA_RULE`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kodalle_cli.configs import MAX_EPOCHS, TOKENS_PER_PARAM
from kodalle_cli.errors import KodalleError, UsageError

GIB = 1024**3

# Peak dense tensor-core TFLOPS (no sparsity) and memory from the vendors' datasheets.
# bf16 None: the card has no bf16 tensor cores.
CARDS: dict[str, dict] = {
    "v100-16gb": {"fp16": 125.0, "bf16": None, "memory_gib": 16, "name": "V100 SXM2 16GB"},
    "v100-32gb": {"fp16": 125.0, "bf16": None, "memory_gib": 32, "name": "V100 SXM2 32GB"},
    "t4": {"fp16": 65.0, "bf16": None, "memory_gib": 16, "name": "T4"},
    "rtx-3090": {"fp16": 71.0, "bf16": 71.0, "memory_gib": 24,
                 "name": "RTX 3090 (fp32 accumulate)"},
    "rtx-4090": {"fp16": 165.2, "bf16": 165.2, "memory_gib": 24,
                 "name": "RTX 4090 (fp32 accumulate)"},
    "a10": {"fp16": 125.0, "bf16": 125.0, "memory_gib": 24, "name": "A10 / A10G"},
    "l4": {"fp16": 121.0, "bf16": 121.0, "memory_gib": 24, "name": "L4"},
    "l40s": {"fp16": 362.0, "bf16": 362.0, "memory_gib": 48, "name": "L40S"},
    "a100-40gb": {"fp16": 312.0, "bf16": 312.0, "memory_gib": 40, "name": "A100 40GB"},
    "a100-80gb": {"fp16": 312.0, "bf16": 312.0, "memory_gib": 80, "name": "A100 80GB"},
    "h100-80gb": {"fp16": 989.0, "bf16": 989.0, "memory_gib": 80, "name": "H100 SXM 80GB"},
    "h200": {"fp16": 989.0, "bf16": 989.0, "memory_gib": 141, "name": "H200 141GB"},
    "mi300x": {"fp16": 1307.0, "bf16": 1307.0, "memory_gib": 192, "name": "AMD MI300X"},
}

# What a GPU keeps for itself and the margin the plan leaves (fragmentation, the CUDA
# context, kernels' workspaces): a config fits when its estimate is under this share of the
# card's memory, less CONTEXT_GIB.
MEMORY_MARGIN = 0.9
CONTEXT_GIB = 1.0

# The data rule of the recommendation (its numbers: kodalle_cli.configs).
DATA_RULE = (
    "a model is recommended when the tokens it can see reach {tpp:g} per parameter, where "
    "the tokens are what --hours of training reach, but at most {epochs:g} epochs of the "
    "data. Sources: compute-optimal training sees about 20 tokens per parameter "
    "(Hoffmann et al. 2022, 'Training Compute-Optimal Large Language Models'), and "
    "autoregressive image and text-to-image models follow the same power laws in model "
    "size, data and compute (Henighan et al. 2020, 'Scaling Laws for Autoregressive "
    "Generative Modeling'); repeated data is worth almost as much as new data up to about "
    "4 epochs and next to nothing beyond about 16 (Muennighoff et al. 2023, 'Scaling "
    "Data-Constrained Language Models', decay constant about 15 epochs). KoDALLE's own "
    "point: 428M parameters (depth 16, dim 1024, text 128) on 0.8M pairs, one V100 32GB."
)

# the grid `plan` searches (heads and dim_head: `kodalle train`'s, unless given)
GRID_DEPTHS = (4, 8, 12, 16, 24, 32)
GRID_DIMS = (256, 512, 768, 1024, 1536, 2048)

# the memory modes, cheapest in compute first; FSDP does not take --reversible
MODES = (
    ("ddp", False, False), ("ddp", True, False), ("ddp", False, True),
    ("fsdp", False, False), ("fsdp", False, True),
)


def mode_name(strategy: str, reversible: bool, checkpointing: bool) -> str:
    extra = " + reversible" if reversible else " + grad-ckpt" if checkpointing else ""
    return strategy + extra


# ---- parameters ------------------------------------------------------------------------------
@dataclass
class Params:
    total: int
    trainable: int
    blocks: int  # every block together
    block: int  # one block
    matmul: int  # weights that multiply activations in a training step (for 6N)
    embeddings: int  # token, position and image tables

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def block_params(cfg) -> int:
    d, inner, hidden = cfg.dim, cfg.heads * cfg.dim_head, cfg.dim * cfg.ff_mult
    n = 2 * d + d * 3 * inner + inner * d + d + d  # attn_norm, to_qkv, to_out (+bias), scale
    n += 2 * d + d * 2 * hidden + 2 * hidden + hidden * d + d + d  # ff_norm, w_in, w_out, scale
    if cfg.sandwich_norm:
        n += 4 * d
    return n


def count_params(cfg, frozen_text: bool = False, text_positions_frozen: bool | None = None
                 ) -> Params:
    """What :class:`~kodalle_cli.model.DALLE` holds for ``cfg``. ``frozen_text``:
    ``--freeze-text-emb`` (the token table, and the position table when the backbone has
    one: ``text_positions_frozen``, default the same)."""
    d = cfg.dim
    td = cfg.text_dim or d
    if text_positions_frozen is None:
        text_positions_frozen = frozen_text
    frozen = 0
    if cfg.contextual:
        text = td + td * d + d  # start vector, projection
        tables = 0
    else:
        token = cfg.text_emb_rows * td
        position = 0 if cfg.rotary_emb else (cfg.text_seq_len + 1) * td
        tables = token + position
        text = tables + (td * d + d if td != d else 0)
        frozen = (token if frozen_text else 0) + (position if text_positions_frozen else 0)
    image = cfg.num_image_tokens * d + (0 if cfg.rotary_emb else 2 * cfg.image_fmap_size * d)
    rows = cfg.text_head_rows + cfg.num_image_tokens
    head = d * rows + rows
    one = block_params(cfg)
    total = text + image + cfg.depth * one + 2 * d + head
    return Params(total=total, trainable=total - frozen, blocks=cfg.depth * one, block=one,
                  matmul=cfg.depth * _block_matmul(cfg) + d * rows + (td * d if td != d else 0),
                  embeddings=tables + cfg.num_image_tokens * d)


def _block_matmul(cfg) -> int:
    d, inner, hidden = cfg.dim, cfg.heads * cfg.dim_head, cfg.dim * cfg.ff_mult
    return d * 3 * inner + inner * d + d * 2 * hidden + hidden * d


# ---- FLOPs -----------------------------------------------------------------------------------
@dataclass
class Flops:
    seq_len: int  # positions per sample in a training step
    model: float  # PaLM's 6N + attention, per sample (what MFU is quoted in)
    executed: float  # what the step computes, recomputation included

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_flops(cfg, frozen_text: bool = False, recompute: bool = False) -> Flops:
    """Training FLOPs per sample (see the module doc). ``recompute``: ``--reversible`` or
    ``--grad-checkpointing`` (each block's forward runs again in backward)."""
    t, n = cfg.text_seq_len, cfg.image_seq_len
    seq = t + n
    d, td = cfg.dim, cfg.text_dim or cfg.dim
    inner = cfg.heads * cfg.dim_head
    blocks_mm = cfg.depth * _block_matmul(cfg) * seq
    attention = cfg.depth * 4 * seq * seq * inner  # forward: scores and weighted values
    head_mm = d * (t * cfg.text_head_rows + n * cfg.num_image_tokens)
    proj = td * d * (t + 1) if (td != d or cfg.contextual) else 0
    model = 6 * (blocks_mm + head_mm + proj) + 3 * attention
    forward_again = 2 * blocks_mm + attention if recompute else 0
    # the text projection's input needs a gradient unless the tables feeding it are frozen
    proj_input_grad = cfg.contextual or not frozen_text
    executed = model + forward_again - (0 if proj_input_grad else 2 * proj)
    return Flops(seq_len=seq, model=float(model), executed=float(executed))


# ---- memory ----------------------------------------------------------------------------------
def activation_bytes(cfg, batch: int, act_bytes: int, mode: str = "plain") -> dict:
    """Bytes autograd keeps for one training step of ``batch`` samples at the peak (the
    start of backward). ``act_bytes``: 2 under bf16 / fp16 autocast, 4 in fp32. ``mode``:
    ``plain``, ``reversible`` or ``checkpointing``."""
    a, d = act_bytes, cfg.dim
    inner, hidden = cfg.heads * cfg.dim_head, cfg.dim * cfg.ff_mult
    t, n = cfg.text_seq_len, cfg.image_seq_len
    seq = t + n
    # per position, one block: the fp32 residual each LayerNorm saves (4d twice), the
    # normalised inputs cast for the linear layers (a*d twice), q, k, v (3 inner), the
    # attention output and its head-merged copy (2 inner), the branch outputs before the
    # LayerScale multiply (a*d twice), the GEGLU input (2 hidden), gelu(gate) and the
    # product (hidden each), and the softmax statistics (fp32 per head)
    block = 8 * d + 4 * a * d + 5 * a * inner + 4 * a * hidden + 4 * cfg.heads
    if cfg.sandwich_norm:
        block += 16 * d - 2 * a * d
    if cfg.attn_dropout > 0 or cfg.ff_dropout > 0:
        block += d + hidden  # dropout masks (bytes)
    if mode == "plain":
        blocks = cfg.depth * block
    elif mode == "checkpointing":
        blocks = cfg.depth * 4 * d + block  # each block's input, one block rebuilt
    elif mode == "reversible":
        blocks = 6 * 4 * d + block  # outputs, their gradients and rebuilt inputs; one block
    else:
        raise ValueError(f"unknown mode {mode!r}")
    text_rows = cfg.text_head_rows
    td = cfg.text_dim or d
    outside = 4 * d + a * d  # the output LayerNorm's input, the logits' cast input
    per_sample = seq * (blocks + outside)
    if td != d or cfg.contextual:
        per_sample += a * (t + 1) * td  # the text projection's input
    # the loss: log-softmax of every logit in fp32, and at the start of backward the
    # gradient of the larger of the two (text, image) logit sets and its input's
    logits = 4 * (n * cfg.num_image_tokens + t * text_rows)
    logits += 8 * max(n * cfg.num_image_tokens, t * text_rows)
    per_sample += logits
    masks = cfg.depth * seq * seq if any(x != "full" for x in cfg.attn_types) else 0
    return {"per_sample": per_sample, "fixed": masks, "total": batch * per_sample + masks}


@dataclass
class Memory:
    """Bytes per GPU."""

    weights: float
    gradients: float
    optimizer: float
    casts: float  # 16-bit copies of the weights under autocast
    buffers: float  # DDP buckets, FSDP's gathered parameters
    activations: float
    per_sample: float  # activations per sample (the rest does not grow with the batch)

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.casts + self.buffers
                + self.activations)

    @property
    def fixed(self) -> float:
        return self.total - self.activations + self.activations_fixed

    activations_fixed: float = 0.0

    def max_batch(self, budget: float) -> int:
        """The largest batch per GPU that fits ``budget`` bytes (0: none)."""
        room = budget - self.fixed
        return max(0, int(room // self.per_sample)) if self.per_sample > 0 else 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total"] = self.total
        return {k: round(v / GIB, 3) if isinstance(v, float) else v for k, v in d.items()}


def memory(cfg, batch: int, precision: str, *, strategy: str = "ddp", gpus: int = 1,
           reversible: bool = False, checkpointing: bool = False, frozen_text: bool = False,
           text_positions_frozen: bool | None = None) -> Memory:
    """Peak bytes per GPU of a training step (see the module doc). ``precision``: bf16,
    fp16 or fp32 (the autocast dtype); ``batch``: samples per GPU per micro-batch."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise UsageError(f"--precision {precision!r}: choose bf16, fp16 or fp32")
    if strategy not in ("ddp", "fsdp"):
        raise UsageError(f"--strategy {strategy!r}: choose ddp or fsdp")
    p = count_params(cfg, frozen_text, text_positions_frozen)
    a = 4 if precision == "fp32" else 2
    mode = "reversible" if reversible else "checkpointing" if checkpointing else "plain"
    acts = activation_bytes(cfg, batch, a, mode)
    weights, grads, adam = 4.0 * p.total, 4.0 * p.trainable, 8.0 * p.trainable
    casts = 0.0
    if a == 2:  # cast weights saved for backward: every block's, or one rebuilt block's
        cast_blocks = cfg.depth if mode == "plain" else 1
        casts = 2.0 * (p.matmul - cfg.depth * _block_matmul(cfg)
                       + cast_blocks * _block_matmul(cfg))
    buffers = 0.0
    if strategy == "fsdp":
        shards = max(gpus, 1)
        weights, grads, adam = weights / shards, grads / shards, adam / shards
        if shards > 1:  # the root's parameters and two blocks gathered, one block's grads
            buffers = 4.0 * (p.total - p.blocks + 2 * p.block) + 4.0 * p.block
    elif gpus > 1:
        buffers = 4.0 * p.trainable  # DDP's gradient buckets
    return Memory(weights=weights, gradients=grads, optimizer=adam, casts=casts,
                  buffers=buffers, activations=float(acts["total"]),
                  per_sample=float(acts["per_sample"]), activations_fixed=float(acts["fixed"]))


def usable_bytes(memory_gib: float) -> float:
    """What the plan lets a config use of a card with ``memory_gib`` GiB."""
    return max(0.0, memory_gib * MEMORY_MARGIN - CONTEXT_GIB) * GIB


def device_memory_gib(device) -> float:
    """Memory of ``device``: a CUDA GPU's total, or the RAM available now on the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


# ---- the data --------------------------------------------------------------------------------
@dataclass
class DataSize:
    """What a plan needs of the data: training pairs and the tokens of each."""

    samples: int
    text_seq_len: int
    image_fmap_size: int
    num_image_tokens: int
    source: str  # where the numbers came from
    backbone: str | None = None  # the backbone the token shards were made with
    tokenizer_vocab: int | None = None

    @property
    def tokens_per_sample(self) -> int:
        return self.text_seq_len + self.image_fmap_size**2

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_sample": self.tokens_per_sample}


def read_data(data: str | Path, vqgan: str | None = None, vqgan_config: str | None = None,
              text_seq_len: int = 128, samples: int | None = None) -> DataSize:
    """The size of ``data``: token shards (their manifest, or ``DATA/tokens``'s), or image
    shards from ``kodalle prepare`` with the VQGAN that will tokenize them (``vqgan``: its
    grid and codebook; ``text_seq_len``: the caption tokens). Only manifests and the VQGAN's
    config are read. ``samples`` replaces the training pairs counted."""
    from kodalle_cli.data import tokens as token_shards

    data = Path(data)
    if samples is not None and samples < 1:
        raise UsageError(f"--samples {samples}: give at least 1 training pair")
    for candidate in (data, data / "tokens"):
        if (candidate / token_shards.MANIFEST).is_file():
            try:
                manifest = token_shards.read_manifest(candidate)
            except KodalleError:
                continue
            train = manifest["splits"].get("train", {})
            count = train.get("count", sum(s.get("count", 0) for s in train.get("shards", [])))
            tokenizer = manifest.get("tokenizer") or {}
            return DataSize(
                samples=samples or int(count), text_seq_len=int(manifest["text_seq_len"]),
                image_fmap_size=int(manifest["image_fmap_size"]),
                num_image_tokens=int(manifest["num_image_tokens"]),
                source=f"{candidate / token_shards.MANIFEST}", backbone=tokenizer.get("backbone"),
                tokenizer_vocab=tokenizer.get("vocab_size"))
    manifest_path = data / "manifest.json"
    if not manifest_path.is_file():
        raise KodalleError(f"{data} has no manifest.json: give token shards (`kodalle "
                           "tokenize`) or image shards (`kodalle prepare`) with --vqgan")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        count = int(manifest["splits"]["train"])
        image_size = int(manifest["options"]["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KodalleError(f"{manifest_path} is neither a token nor an image-shard manifest "
                           f"({exc.__class__.__name__}: {exc})") from None
    if vqgan is None:
        raise UsageError(f"{data} holds image shards: pass --vqgan (the VQGAN that will "
                         "tokenize them) so that the plan knows the code grid and codebook")
    from kodalle_cli.vqgan.io import read_config, resolve

    vq = read_config(resolve(vqgan, vqgan_config)[1])
    return DataSize(samples=samples or count, text_seq_len=text_seq_len,
                    image_fmap_size=image_size // vq.downsample_factor,
                    num_image_tokens=vq.n_embed, source=f"{manifest_path} + --vqgan {vqgan}")


def backbone_sizes(name: str, path: str | None = None) -> dict:
    """The backbone's vocabulary, width and positions, from its config only (a local one,
    else fetched: a small file)."""
    from kodalle_cli.backbone import get_backbone

    backbone = get_backbone(name, path)
    info = backbone.describe()
    if info["vocab"] is None:
        backbone.config()  # fetches config.json, or says why it cannot
        info = backbone.describe()
    if info["vocab"] is None:
        raise KodalleError(f"backbone {name}: no config.json to read its sizes from")
    return {"name": backbone.name, "vocab": info["vocab"], "dim": info["dim"],
            "positions": info["positions"]}


def model_config(data: DataSize, backbone: dict, depth: int, dim: int, heads: int,
                 dim_head: int, **options):
    """The :class:`~kodalle_cli.model.DALLEConfig` `kodalle train` builds for these sizes."""
    from kodalle_cli.model import DALLEConfig

    text_dim = backbone["dim"]
    return DALLEConfig(
        num_text_tokens=backbone["vocab"], num_image_tokens=data.num_image_tokens,
        image_fmap_size=data.image_fmap_size, dim=dim, depth=depth, heads=heads,
        dim_head=dim_head, text_seq_len=data.text_seq_len,
        text_dim=None if text_dim == dim else text_dim, **options)


# ---- throughput ------------------------------------------------------------------------------
@dataclass
class Throughput:
    """FLOP/s per GPU. ``basis``: ``model`` (peak x MFU, so time = model FLOPs / rate) or
    ``executed`` (measured: time = executed FLOPs / rate)."""

    flops_per_s: float
    basis: str
    source: str

    def seconds(self, flops: Flops) -> float:
        return (flops.model if self.basis == "model" else flops.executed) / self.flops_per_s

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def card_help() -> str:
    """The --card table, one entry per card."""
    rows = []
    for key, card in CARDS.items():
        peak = (f"bf16/fp16 {card['bf16']:g}" if card["bf16"] == card["fp16"]
                else f"fp16 {card['fp16']:g}, no bf16")
        rows.append(f"{key} ({card['name']}: {peak} TFLOPS, {card['memory_gib']} GiB)")
    return "; ".join(rows)


def peak_tflops(card: str, precision: str) -> float:
    if card not in CARDS:
        raise UsageError(f"--card {card!r}: choose one of {', '.join(CARDS)}")
    spec = CARDS[card]
    if precision == "fp32":
        raise UsageError("--card gives 16-bit tensor-core peaks: plan --precision bf16 or "
                         "fp16, or give --tflops for fp32")
    if spec[precision] is None:
        raise UsageError(f"--card {card}: {spec['name']} has no bf16; use --precision fp16")
    return float(spec[precision])


def calibrate(device: str, precision: str, data: DataSize, seconds: float = 4.0
              ) -> Throughput:
    """FLOP/s a few training steps of a small DALLE reach on ``device`` at ``precision``
    (one warm-up step, then steps for about ``seconds``; stopped after 12 s). A small model
    uses a GPU less well than a large one, so times from it err on the long side."""
    import torch

    from kodalle_cli.device import autocast, pick_device, pick_dtype
    from kodalle_cli.model import DALLE, DALLEConfig

    dev = pick_device(device)
    dtype = pick_dtype(precision, dev)
    gpu = dev.type == "cuda"
    fmap = data.image_fmap_size if gpu else min(data.image_fmap_size, 8)
    text = data.text_seq_len if gpu else min(data.text_seq_len, 32)
    cfg = DALLEConfig(num_text_tokens=4096 if gpu else 1024,
                      num_image_tokens=min(data.num_image_tokens, 8192 if gpu else 1024),
                      image_fmap_size=fmap, dim=1024 if gpu else 256, depth=4 if gpu else 2,
                      heads=8 if gpu else 4, dim_head=64, text_seq_len=text)
    batch = 8 if gpu else 4
    torch.manual_seed(0)
    model = DALLE(cfg).to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    ids = torch.randint(2, cfg.num_text_tokens, (batch, text), device=dev)
    codes = torch.randint(0, cfg.num_image_tokens, (batch, cfg.image_seq_len), device=dev)

    def step():
        with autocast(dev, dtype):
            loss, _ = model(ids, codes, return_loss=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize(dev)

    begin = time.perf_counter()
    step()  # warm-up: kernels, allocator
    start, steps = time.perf_counter(), 0
    while steps < 2 or (time.perf_counter() - start < seconds and steps < 50):
        step()
        steps += 1
        if time.perf_counter() - begin > 12:  # a slow or busy device: what was measured
            break
    elapsed = time.perf_counter() - start
    rate = train_flops(cfg).executed * batch * steps / elapsed
    return Throughput(flops_per_s=rate, basis="executed",
                      source=f"measured on {dev} at {precision}: {steps} steps of a "
                      f"{cfg.depth}x{cfg.dim} model, {rate / 1e12:.3g} TFLOP/s")


def throughput(precision: str, *, card: str | None = None, tflops: float | None = None,
               mfu: float = 0.3, device: str = "auto", data: DataSize | None = None
               ) -> Throughput:
    """``--tflops`` or ``--card`` times ``--mfu``; else a calibration on ``device``."""
    if not 0 < mfu <= 1:
        raise UsageError(f"--mfu {mfu}: give the share of the peak, in (0, 1]")
    if tflops is not None:
        if tflops <= 0:
            raise UsageError(f"--tflops {tflops}: must be more than 0")
        return Throughput(tflops * 1e12 * mfu, "model",
                          f"--tflops {tflops:g} x --mfu {mfu:g}")
    if card is not None:
        peak = peak_tflops(card, precision)
        return Throughput(peak * 1e12 * mfu, "model",
                          f"{CARDS[card]['name']}: {peak:g} TFLOPS {precision} x --mfu {mfu:g}")
    try:
        return calibrate(device, precision, data)
    except UsageError as exc:
        raise UsageError(f"{exc} (or plan for another device with --card NAME or "
                         "--tflops X)") from None


# ---- the plan --------------------------------------------------------------------------------
@dataclass
class PlanSettings:
    """What :func:`make_plan` needs besides the data (``kodalle plan``'s options)."""

    gpus: int = 1
    gpu_memory_gib: float = 80.0
    precision: str = "bf16"
    batch_size: int = 40
    hours: float = 168.0
    frozen_text: bool = False
    text_loss_weight: float = 1.0  # 0: no text head
    text_positions: bool = True  # the backbone has a position table (frozen with the tokens)
    heads: int = 8
    dim_head: int = 64
    depths: tuple[int, ...] = GRID_DEPTHS
    dims: tuple[int, ...] = GRID_DIMS
    tokens_per_param: float = TOKENS_PER_PARAM
    max_epochs: float = MAX_EPOCHS


def _modes(gpus: int):
    return [m for m in MODES if m[0] == "ddp" or gpus > 1]


def plan_row(mcfg, data: DataSize, settings: PlanSettings, rate: Throughput) -> dict:
    """Parameters, FLOPs, memory in every mode, and what the data rule says, for one config."""
    s = settings
    frozen_pos = s.frozen_text and s.text_positions
    params = count_params(mcfg, s.frozen_text, frozen_pos)
    budget = usable_bytes(s.gpu_memory_gib)
    mems, fit = {}, None
    for strategy, rev, ckpt in _modes(s.gpus):
        mem = memory(dataclasses.replace(mcfg, reversible=rev), s.batch_size, s.precision,
                     strategy=strategy, gpus=s.gpus, reversible=rev, checkpointing=ckpt,
                     frozen_text=s.frozen_text, text_positions_frozen=frozen_pos)
        name = mode_name(strategy, rev, ckpt)
        mems[name] = mem
        if fit is None and mem.total <= budget:
            fit = (strategy, rev, ckpt)
    row = {
        "depth": mcfg.depth, "dim": mcfg.dim, "heads": mcfg.heads, "dim_head": mcfg.dim_head,
        "params": params.to_dict(),
        "flops_per_sample": {"plain": train_flops(mcfg, s.frozen_text).to_dict(),
                             "recompute": train_flops(mcfg, s.frozen_text, True).to_dict()},
        "memory_gib": {k: m.to_dict() for k, m in mems.items()},
        "fits": fit is not None, "runs_as": mode_name(*fit) if fit else None,
    }
    smallest = min(mems.values(), key=lambda m: m.total)
    row["min_memory_gib"] = round(smallest.total / GIB, 3)
    recompute = fit is not None and (fit[1] or fit[2])
    flops = train_flops(mcfg, s.frozen_text, recompute)
    epoch_s = data.samples * rate.seconds(flops) / s.gpus
    epochs_in_time = s.hours * 3600 / epoch_s
    epochs = min(epochs_in_time, s.max_epochs)
    tokens = epochs * data.samples * data.tokens_per_sample
    n = params.matmul
    row.update({
        "hours_per_epoch": epoch_s / 3600, "epochs_in_hours": epochs_in_time,
        "epochs_counted": epochs, "tokens_seen": tokens, "tokens_per_param": tokens / n,
        "limited_by": "hours" if epochs_in_time < s.max_epochs else "epochs",
    })
    row["meets_rule"] = row["tokens_per_param"] >= s.tokens_per_param
    return row


def _why_not(row: dict, settings: PlanSettings) -> str:
    """Why a row bigger than the recommendation was passed over (one phrase)."""
    if not row["fits"]:
        return (f"memory: {row['min_memory_gib']:.1f} GiB per GPU at best > "
                f"{usable_bytes(settings.gpu_memory_gib) / GIB:.1f} usable")
    limit = (f"{row['epochs_in_hours']:.1f} epochs in {settings.hours:g} h"
             if row["limited_by"] == "hours" else f"{settings.max_epochs:g} epochs counted")
    return (f"data rule: {row['tokens_per_param']:.1f} < {settings.tokens_per_param:g} "
            f"tokens/param ({limit})")


def make_plan(data: DataSize, backbone: dict, settings: PlanSettings, rate: Throughput,
              configs: list[tuple[int, int]] | None = None) -> dict:
    """Every config of the grid (or ``configs``: ``(depth, dim)`` pairs), smallest first,
    and the recommendation: the largest that fits memory (with the margin of
    :func:`usable_bytes`) and meets the data rule (:data:`DATA_RULE`)."""
    s = settings
    if s.gpus < 1 or s.batch_size < 1 or s.hours <= 0 or s.gpu_memory_gib <= 0:
        raise UsageError("--gpus, --batch-size, --hours and --gpu-memory must be more than 0")
    pairs = configs or [(depth, dim) for depth in s.depths for dim in s.dims]
    rows = []
    for depth, dim in pairs:
        mcfg = model_config(data, backbone, depth, dim, s.heads, s.dim_head,
                            text_loss_weight=s.text_loss_weight)
        rows.append(plan_row(mcfg, data, s, rate))
    rows.sort(key=lambda r: r["params"]["total"])
    good = [r for r in rows if r["fits"] and r["meets_rule"]]
    best = good[-1] if good else None
    for r in rows:
        r["recommended"] = r is best
        bigger = best is None or r["params"]["total"] > best["params"]["total"]
        r["passed_over"] = _why_not(r, s) if bigger and r is not best and not (
            r["fits"] and r["meets_rule"]) else None
    if best is not None:
        verdict = (f"recommended: depth {best['depth']}, dim {best['dim']} "
                   f"({best['params']['total'] / 1e6:.0f}M parameters), {best['runs_as']}")
    elif any(r["fits"] for r in rows):
        small = next(r for r in rows if r["fits"])
        verdict = ("nothing meets the data rule; the smallest config that fits is depth "
                   f"{small['depth']}, dim {small['dim']} ({_why_not(small, s)})")
    else:
        verdict = (f"nothing fits {s.gpus} x {s.gpu_memory_gib:.4g} GiB: the smallest needs "
                   f"{rows[0]['min_memory_gib']:.1f} GiB per GPU")
    return {
        "data": data.to_dict(), "backbone": backbone, "settings": dataclasses.asdict(s),
        "usable_gib": round(usable_bytes(s.gpu_memory_gib) / GIB, 3),
        "throughput": rate.to_dict(), "rule": DATA_RULE.format(tpp=s.tokens_per_param,
                                                               epochs=s.max_epochs),
        "rows": rows, "recommended": None if best is None else
        {"depth": best["depth"], "dim": best["dim"], "runs_as": best["runs_as"]},
        "verdict": verdict,
    }


def train_command(plan: dict, data: str | Path) -> str | None:
    """The `kodalle train` line of the recommended row."""
    best = plan["recommended"]
    if best is None:
        return None
    s = plan["settings"]
    words = ["kodalle train", f"--backbone {plan['backbone']['name']}", f"--data {data}",
             f"--dim {best['dim']}", f"--depth {best['depth']}"]
    if (s["heads"], s["dim_head"]) != (8, 64):
        words += [f"--heads {s['heads']}", f"--dim-head {s['dim_head']}"]
    runs_as = best["runs_as"]
    words += ["--reversible"] * ("reversible" in runs_as)
    words += ["--grad-checkpointing"] * ("grad-ckpt" in runs_as)
    words += ["--strategy fsdp"] * runs_as.startswith("fsdp")
    words += [f"--precision {s['precision']}", f"--batch-size {s['batch_size']}"]
    words += ["--freeze-text-emb"] * s["frozen_text"]
    if s["text_loss_weight"] != 1.0:
        words += [f"--text-loss-weight {s['text_loss_weight']:g}"]
    return " ".join(words)


def _size(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def plan_table(plan: dict):
    """The plan as a rich table: one row per config, the recommended one marked."""
    from rich.table import Column, Table

    s = plan["settings"]
    modes = [mode_name(*m) for m in _modes(s["gpus"])]
    d = plan["data"]
    table = Table(
        Column("", no_wrap=True), Column("depth", justify="right"),
        Column("dim", justify="right"), Column("params", justify="right"),
        Column("TFLOP/sample", justify="right"),
        Column("GiB/GPU " + " | ".join(m.replace("ddp + ", "").replace("ddp", "plain")
                                        for m in modes), justify="right"),
        Column("runs as"), Column(f"h/epoch | epochs in {s['hours']:g} h", justify="right"),
        Column("tokens/param", justify="right"), Column("verdict", overflow="fold"),
        title=(f"{d['samples']:,} pairs x {d['tokens_per_sample']} tokens, "
               f"{s['gpus']} x {s['gpu_memory_gib']:.4g} GiB ({plan['usable_gib']:.3g} usable), "
               f"{s['precision']}, batch {s['batch_size']}/GPU, {s['hours']:g} h"),
    )
    for r in plan["rows"]:
        gib = " | ".join(f"{r['memory_gib'][m]['total']:.1f}" for m in modes)
        flops = r["flops_per_sample"]["plain"]["model"] / 1e12
        verdict = ("recommended" if r["recommended"] else r["passed_over"]
                   or ("fits, meets the rule" if r["fits"] and r["meets_rule"]
                       else _why_not(r, _settings(s))))
        table.add_row("*" if r["recommended"] else "", str(r["depth"]), str(r["dim"]),
                      _size(r["params"]["total"]), f"{flops:.3g}", gib, r["runs_as"] or "-",
                      f"{r['hours_per_epoch']:.3g} | {r['epochs_in_hours']:.3g}" if r["fits"]
                      else "-",
                      f"{r['tokens_per_param']:.1f}" if r["fits"] else "-", verdict,
                      style="bold green" if r["recommended"] else None)
    return table


def _settings(d: dict) -> PlanSettings:
    return PlanSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def run_plan(cfg) -> dict:
    """``kodalle plan``: the plan for :class:`~kodalle_cli.configs.PlanConfig` (a dict, the
    ``--json`` output; :func:`plan_table` draws it)."""
    begin = time.perf_counter()
    data = read_data(cfg.data, cfg.vqgan, cfg.vqgan_config, cfg.text_seq_len, cfg.samples)
    name = cfg.backbone or data.backbone
    if name is None:
        raise UsageError(f"{cfg.data} does not name its backbone: pass --backbone NAME")
    backbone = backbone_sizes(name, cfg.backbone_path)
    if cfg.precision not in ("bf16", "fp16", "fp32"):
        raise UsageError(f"--precision {cfg.precision!r}: choose bf16, fp16 or fp32")
    if cfg.card is not None:
        peak_tflops(cfg.card, cfg.precision)  # an unknown card or precision: before any work
    rate = throughput(cfg.precision, card=cfg.card, tflops=cfg.tflops, mfu=cfg.mfu,
                      device=cfg.device, data=data)
    gib = cfg.gpu_memory
    where = "--gpu-memory"
    if gib is None and cfg.card is not None:
        gib, where = float(CARDS[cfg.card]["memory_gib"]), f"--card {cfg.card}"
    if gib is None:
        from kodalle_cli.device import pick_device

        device = pick_device(cfg.device)
        gib, where = device_memory_gib(device), f"{device} (measured)"
    settings = PlanSettings(
        gpus=cfg.gpus, gpu_memory_gib=gib, precision=cfg.precision,
        batch_size=cfg.batch_size, hours=cfg.hours, frozen_text=cfg.freeze_text_emb,
        text_loss_weight=cfg.text_loss_weight,
        text_positions=bool(backbone["positions"]), heads=cfg.heads, dim_head=cfg.dim_head,
        depths=(cfg.depth,) if cfg.depth else GRID_DEPTHS,
        dims=(cfg.dim,) if cfg.dim else GRID_DIMS,
        tokens_per_param=cfg.tokens_per_param, max_epochs=cfg.max_epochs)
    plan = make_plan(data, backbone, settings, rate)
    plan["memory_source"] = where
    plan["train_command"] = train_command(plan, cfg.data)
    plan["seconds"] = round(time.perf_counter() - begin, 2)
    return plan


# ---- `kodalle train`: the exact config -------------------------------------------------------
def precision_name(precision: str, device) -> str:
    """``--precision`` (``auto`` included) as bf16, fp16 or fp32 on ``device``."""
    import torch

    from kodalle_cli.device import pick_dtype

    dtype = pick_dtype(precision, device)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def train_estimate(cfg, mcfg, device, world_size: int = 1) -> dict:
    """Parameters, FLOPs per sample and memory per GPU of ``kodalle train`` with
    :class:`~kodalle_cli.configs.DalleTrainConfig` ``cfg`` building ``mcfg`` on ``device``
    over ``world_size`` ranks."""
    precision = precision_name(cfg.precision, device)
    frozen = cfg.freeze_text_emb
    recompute = mcfg.reversible or cfg.grad_checkpointing
    mem = memory(mcfg, cfg.batch_size, precision, strategy=cfg.strategy, gpus=world_size,
                 reversible=mcfg.reversible, checkpointing=cfg.grad_checkpointing,
                 frozen_text=frozen)
    device_gib = device_memory_gib(device)
    budget = device_gib * GIB  # the device's whole memory (plan's margin is for advice)
    return {
        "model": mcfg.to_dict(), "precision": precision, "batch_size": cfg.batch_size,
        "strategy": cfg.strategy, "world_size": world_size,
        "reversible": mcfg.reversible, "grad_checkpointing": cfg.grad_checkpointing,
        "params": count_params(mcfg, frozen).to_dict(),
        "flops_per_sample": train_flops(mcfg, frozen, recompute).to_dict(),
        "memory": mem, "memory_gib": mem.to_dict(),
        "device": str(device), "device_gib": round(device_gib, 3),
        "budget_gib": round(budget / GIB, 3), "fits": mem.total <= budget,
        "not_counted": ("the frozen language model of --text-encoder contextual (a replica "
                        "on every rank)") if mcfg.contextual else None,
        "max_batch": mem.max_batch(budget),
    }


def _what_fits(cfg, mcfg, estimate: dict) -> str:
    """The cheapest change that would fit (a phrase for the refusal)."""
    budget = estimate["budget_gib"] * GIB
    precision, world = estimate["precision"], estimate["world_size"]
    options = []
    if estimate["max_batch"] >= 1:
        options.append(f"--batch-size {estimate['max_batch']}")
    for flag, rev, ckpt in (("--reversible", True, False), ("--grad-checkpointing", False, True)):
        if (rev and (mcfg.reversible or cfg.strategy == "fsdp")) or (
                ckpt and cfg.grad_checkpointing):
            continue
        mem = memory(dataclasses.replace(mcfg, reversible=rev or mcfg.reversible),
                     cfg.batch_size, precision, strategy=cfg.strategy, gpus=world,
                     reversible=rev or mcfg.reversible,
                     checkpointing=ckpt or cfg.grad_checkpointing,
                     frozen_text=cfg.freeze_text_emb)
        if mem.total <= budget:
            options.append(f"{flag} ({mem.total / GIB:.1f} GiB)")
    if not options:
        return "nothing at this model size fits: a smaller --dim / --depth (see `kodalle plan`)"
    return " or ".join(options) + " would fit"


def check_train_memory(cfg, mcfg, device, world_size: int = 1) -> dict:
    """Refuse (:class:`UsageError`, exit 2) a config whose estimated peak exceeds the
    device's memory, unless ``cfg.force``; returns the estimate."""
    estimate = train_estimate(cfg, mcfg, device, world_size)
    if not estimate["fits"] and not cfg.force:
        mem = estimate["memory"]
        raise UsageError(
            f"this config needs about {mem.total / GIB:.1f} GiB per GPU (weights "
            f"{mem.weights / GIB:.1f}, gradients {mem.gradients / GIB:.1f}, AdamW "
            f"{mem.optimizer / GIB:.1f}, activations {mem.activations / GIB:.1f} at "
            f"--batch-size {cfg.batch_size}) and {estimate['device']} has "
            f"{estimate['budget_gib']:.1f} GiB to give: {_what_fits(cfg, mcfg, estimate)}; "
            "--force tries anyway")
    return estimate


def dry_run_estimate(cfg, mcfg, device, world_size: int, data: DataSize, source: str
                     ) -> dict:
    """``kodalle train --dry-run``'s numbers (:func:`~kodalle_cli.train.dalle.dry_run`):
    :func:`train_estimate`, the data's size, and the time per epoch and for ``--max-steps``
    (or ``--epochs``) at the throughput measured on ``device``."""
    estimate = train_estimate(cfg, mcfg, device, world_size)
    rate = calibrate(str(device), estimate["precision"], data)
    sample_s = rate.seconds(Flops(**estimate["flops_per_sample"]))
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    steps = cfg.max_steps or (math.ceil(cfg.epochs * data.samples / per_step)
                              if cfg.epochs else None)
    estimate.update({
        "source": source, "data": data.to_dict(), "throughput": rate.to_dict(),
        "hours_per_epoch": data.samples * sample_s / world_size / 3600,
        "steps": steps,
        "hours": steps * per_step * sample_s / world_size / 3600 if steps else None,
    })
    return estimate


def dry_run_table(estimate: dict):
    """``train --dry-run`` as a two-column rich table."""
    from rich.table import Table

    m, p, f = estimate["model"], estimate["params"], estimate["flops_per_sample"]
    mem = estimate["memory"]
    table = Table("", "", show_header=False,
                  title=f"kodalle train --dry-run ({estimate['source']})")
    options = [name for name in ("reversible", "grad_checkpointing") if estimate[name]]
    rows = [
        ("model", f"depth {m['depth']}, dim {m['dim']}, {m['heads']} heads x {m['dim_head']}, "
                  f"text {m['text_seq_len']}, image {m['image_fmap_size']}x"
                  f"{m['image_fmap_size']} of {m['num_image_tokens']} codes"
                  + (f", {', '.join(options)}" if options else "")),
        ("parameters", f"{p['total']:,} ({p['trainable']:,} trainable)"),
        ("FLOPs per sample", f"{f['model'] / 1e12:.3g} TFLOP (6N + attention), "
                             f"{f['executed'] / 1e12:.3g} executed"),
        ("memory per GPU", f"{mem.total / GIB:.2f} GiB: weights {mem.weights / GIB:.2f}, "
                           f"gradients {mem.gradients / GIB:.2f}, AdamW "
                           f"{mem.optimizer / GIB:.2f}, 16-bit copies {mem.casts / GIB:.2f}, "
                           f"{estimate['strategy']} buffers {mem.buffers / GIB:.2f}, "
                           f"activations {mem.activations / GIB:.2f} (batch "
                           f"{estimate['batch_size']}, {estimate['precision']})"),
        ("device", f"{estimate['device']}: {estimate['budget_gib']:.1f} GiB to use; "
                   + ("fits" if estimate["fits"] else "does NOT fit")
                   + f" (largest batch that fits: {estimate['max_batch']})"),
        ("throughput", estimate["throughput"]["source"]),
        ("time", f"{estimate['hours_per_epoch']:.3g} h per epoch of "
                 f"{estimate['data']['samples']:,} pairs"
                 + (f"; {estimate['steps']:,} steps: {estimate['hours']:.3g} h"
                    if estimate["steps"] else "")),
    ]
    if estimate.get("not_counted"):
        rows.append(("not counted", estimate["not_counted"]))
    for key, value in rows:
        table.add_row(key, value)
    return table


PLAN_HELP = (
    "How big a model to train on this data and these GPUs, and how long it takes: "
    "parameters, training FLOPs per sample, memory per GPU (plain, --reversible, "
    "--grad-checkpointing; DDP and FSDP), time per epoch, and the largest config that fits "
    "with a margin and meets the data rule (at least --tokens-per-param tokens seen per "
    "parameter, counting at most --max-epochs epochs: Hoffmann et al. 2022; Henighan et al. "
    "2020; Muennighoff et al. 2023). The throughput is measured on --device in under 20 s, "
    "or is --tflops (or --card) x --mfu.\n\n"
    "Cards (--card; peak dense tensor TFLOPS from the datasheets): " + card_help() + ".\n\n"
    "Example: kodalle plan --data shards --samples 800000 --card v100-32gb "
    "--precision fp16\n\n"
    "Example: kodalle plan --data shards --gpus 8 --card a100-80gb --hours 72 --json"
)
