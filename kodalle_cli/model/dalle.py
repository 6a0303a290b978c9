"""The DALLE transformer: KoDALLE's architecture in one readable file (nanoGPT style).

KoDALLE is lucidrains' DALLE-pytorch (``DALLE(..., rotary_emb=False, shift_tokens=False,
attn_types=('full',), reversible=True)``) whose text token and text position embeddings are a
pretrained language model's tables. The sequence is::

    [bos] t_1 ... t_T  c_1 ... c_N          (T = text_seq_len, N = image_fmap_size ** 2)

and position ``j`` predicts token ``j + 1``: text positions predict text, image positions
predict image codes (the logits of the other kind are masked). The parameters are the same
as DALLE-pytorch's, so :mod:`kodalle_cli.model.convert` maps checkpoints both ways and the
tests check our logits against DALLE-pytorch 1.6.6.

DALLE-pytorch 1.6.6's architecture options, each with its definition (the tests compare
logits, losses and greedy codes with DALLE-pytorch for each):

- ``reversible``: two residual streams, both starting as the input; block ``i`` computes
  ``x1 += attn_branch(x2)`` then ``x2 += ff_branch(x1)``, and the output is ``(x1 + x2) / 2``.
  In training, :class:`Reversible` keeps no activations inside the blocks: backward rebuilds
  each block's inputs from its outputs (``x2 = y2 - ff(y1)``, ``x1 = y1 - attn(x2)``), so
  activation memory does not grow with depth. At inference it is the same loop, cached.
- ``rotary_emb``: no position tables; queries, keys *and values* are rotated (DALLE-pytorch
  rotates all three) in the first ``6 * (dim_head // 3 // 2)`` channels of each head: a text
  part (language frequencies; text position ``p``, every image position at 8192) and two
  image axes (pixel frequencies over ``linspace(-1, 1, fmap)`` per row and column; text at
  -10). :func:`rotary_angles` builds the table, row ``p`` for sequence position ``p``.
- ``shift_tokens``: after each sub-layer's LayerNorm, a text position takes the first half of
  its channels from the previous position; an image position takes the first quarter from the
  position above it and the second quarter from the one to its left (zeros at the edges and
  for ``<bos>``). The KV cache keeps the normalised inputs so decoding can shift as well.
- ``attn_types``: a cycle over the layers of ``full`` (causal), ``axial_row``, ``axial_col``
  and ``conv_like``: text attends causally to text; an image position attends to the whole
  text and, of the image, to its row so far (``axial_row``), its column so far
  (``axial_col``), or a ``5 x 5`` window above and left of it including itself (``conv_like``,
  DALLE-pytorch's kernel size 5, dilation 1). All are masks over
  ``F.scaled_dot_product_attention`` (:func:`attention_mask`), so the KV cache covers them.
  DeepSpeed's block-sparse ``sparse`` attention is refused.

Choices about the text side (what the oracle test pins down):

- ``bos_id`` (default 0, the id DALLE-pytorch and KoDALLE prepend; for klue/roberta that is
  ``[CLS]``) is prepended to the ``text_seq_len`` caption ids, so ``text_pos_emb`` has
  ``text_seq_len + 1`` rows, read from the backbone's table starting at its position offset
  (KoDALLE started at row 0 of RoBERTa's table; its checkpoints convert with offset 0).
- Captions are padded with the backbone's ``pad_id`` (klue: 1) and, as in KoDALLE, every
  padding position is embedded with the pad row of the token table. DALLE-pytorch instead
  turns each padding id into a unique reserved token per position
  (``unique_pad_tokens=True``, with ``pad_id=0``): supported for its checkpoints.
- The output layer always has ``num_text_tokens + text_seq_len`` text logits followed by
  ``num_image_tokens`` image logits (both DALLE-pytorch and KoDALLE reserve the ``T`` extra
  text slots), so the image codes are offset by ``num_text_tokens + text_seq_len``.
- Text loss: padding targets after the first are left out (the first one teaches the
  caption's end), averaged per sample then over the batch; ``text_loss_on_padding=True``
  counts every position, which is exactly DALLE-pytorch's / KoDALLE's loss.
  ``loss = (text_loss_weight * text_loss + loss_img_weight * image_loss) / (sum of both)``;
  ``text_loss_weight=0`` drops the text head (no text logits, no text rows in ``to_logits``):
  with a 250k-token multilingual vocabulary those logits are most of a step's cost.

The text encoder (``text_encoder``):

- ``tables`` (KoDALLE's): the backbone's token and position tables, as above.
- ``contextual``: the backbone's whole language model runs frozen
  (:class:`~kodalle_cli.model.contextual.ContextualText`, attached as ``model.text_encoder``
  and never part of the model's parameters or checkpoints); the hidden states of layer
  ``text_layer`` for the caption ids go through a learned projection to ``dim`` and become
  text positions ``1..T``; position 0 is a learned start vector. No text loss (nothing to
  predict), no text tables. The image half, the KV cache and guidance are unchanged. The
  null caption (all padding: dropped captions in training, guidance's unconditional rows)
  is the LM's states of a lone pad token (``null_caption="pad"``) or a learned
  ``[T, text_dim]`` table (``"learned"``).

Generation uses a preallocated key/value cache (:class:`KVCache`)::

    cache = model.new_cache(batch, device=..., dtype=...)
    logits = model.prefill(text, cache)       # [B, num_image_tokens]: logits of code 1
    for i in range(model.image_seq_len):
        code = pick(logits)                   # top-k / top-p / guidance: the sampler's job
        codes.append(code)
        if i + 1 < model.image_seq_len:
            logits = model.step(code, cache)  # logits of the next code
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from kodalle_cli.errors import ConfigError

ATTN_TYPES = ("full", "axial_row", "axial_col", "conv_like")
TEXT_ENCODERS = ("tables", "contextual")
NULL_CAPTIONS = ("pad", "learned")  # contextual: what an all-padding caption reads as
CONV_KERNEL, CONV_DILATION = 5, 1  # DALLE-pytorch's conv_like window (its Transformer's)


@dataclass
class DALLEConfig:
    num_text_tokens: int  # rows of the backbone's token table (its vocabulary)
    num_image_tokens: int  # VQGAN codebook size
    image_fmap_size: int  # VQGAN grid side: image_seq_len = image_fmap_size ** 2
    dim: int = 1024
    depth: int = 16
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    text_seq_len: int = 128
    text_dim: int | None = None  # the backbone's dim; a learned projection maps it to `dim`
    pad_id: int = 1
    bos_id: int = 0
    unique_pad_tokens: bool = False  # DALLE-pytorch's per-position padding tokens
    loss_img_weight: float = 7.0
    text_loss_on_padding: bool = False
    stable: bool = False  # DALLE-pytorch's `stable` flag (DivideMax before the output norm)
    sandwich_norm: bool = False  # DALLE-pytorch's `sandwich_norm` (LayerNorm after each block)
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    reversible: bool = False  # two-stream reversible blocks (KoDALLE's REVERSIBLE)
    rotary_emb: bool = False  # rotary positions instead of the position tables
    shift_tokens: bool = False  # DALLE-pytorch's token shift
    attn_types: tuple[str, ...] = ("full",)  # cycled over the layers
    text_loss_weight: float = 1.0  # 0: no text head
    text_encoder: str = "tables"  # tables | contextual
    text_layer: int = -1  # contextual: which hidden states (-1 the last, 0 the embeddings)
    null_caption: str = "pad"  # contextual: the LM's states of a lone pad token, or learned

    def __post_init__(self):
        types = self.attn_types
        if isinstance(types, str):
            types = types.split(",")
        self.attn_types = tuple(str(t).strip() for t in types)
        value = ",".join(self.attn_types)
        if "sparse" in self.attn_types:
            raise ConfigError("attn_types", value, "sparse (DeepSpeed block-sparse) attention "
                              f"is not supported; use {', '.join(ATTN_TYPES)}")
        unknown = [t for t in self.attn_types if t not in ATTN_TYPES]
        if unknown or not self.attn_types:
            raise ConfigError("attn_types", value, f"each must be one of {', '.join(ATTN_TYPES)}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ConfigError("text_encoder", self.text_encoder,
                              f"choose {' or '.join(TEXT_ENCODERS)}")
        if not (self.text_loss_weight >= 0 and math.isfinite(self.text_loss_weight)):
            raise ConfigError("text_loss_weight", self.text_loss_weight, "must be 0 or more")
        if self.null_caption not in NULL_CAPTIONS:
            raise ConfigError("null_caption", self.null_caption,
                              f"choose {' or '.join(NULL_CAPTIONS)}")
        if self.null_caption == "learned" and not self.contextual:
            raise ConfigError("null_caption", self.null_caption, "a learned null caption is "
                              "for --text-encoder contextual (tables learn the pad row)")
        if self.contextual and self.unique_pad_tokens:
            raise ConfigError("text_encoder", self.text_encoder, "contextual text does not "
                              "take DALLE-pytorch's unique padding tokens")

    @property
    def image_seq_len(self) -> int:
        return self.image_fmap_size**2

    @property
    def num_text_logits(self) -> int:
        return self.num_text_tokens + self.text_seq_len

    @property
    def contextual(self) -> bool:
        return self.text_encoder == "contextual"

    @property
    def has_text_head(self) -> bool:
        """Whether the model predicts caption tokens (a text loss and text logits)."""
        return not self.contextual and self.text_loss_weight > 0

    @property
    def text_head_rows(self) -> int:
        """Rows of ``to_logits`` before the image codes' (0 without a text head)."""
        return self.num_text_logits if self.has_text_head else 0

    @property
    def text_emb_rows(self) -> int:
        return self.num_text_logits if self.unique_pad_tokens else self.num_text_tokens

    def attn_type(self, layer: int) -> str:
        return self.attn_types[layer % len(self.attn_types)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attn_types"] = list(self.attn_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DALLEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class KVCache:
    """Preallocated keys and values of every layer: ``k[layer]`` is ``[B, heads, L, dim_head]``.

    Attention writes the new positions in place (no concatenation per step) and reads the
    prefix ``[:length]``. ``length`` is the number of positions already in the cache. With
    token shift, ``shift[layer, sub]`` (``[B, L, dim]``) holds the normalised inputs of the
    attention (``sub`` 0) and feed-forward (1) sub-layers, which the shift reads back.
    """

    def __init__(self, depth, batch, heads, max_len, dim_head, device=None, dtype=None,
                 shift_dim: int | None = None):
        shape = (depth, batch, heads, max_len, dim_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.shift = None
        if shift_dim is not None:
            self.shift = torch.zeros(depth, 2, batch, max_len, shift_dim, device=device,
                                     dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


# ---- positions: rotary embeddings, attention masks, token shift ------------------------------
def rotary_angles(text_seq_len: int, image_fmap_size: int, dim_head: int) -> torch.Tensor:
    """DALLE-pytorch 1.6.6's rotary table ``[T + 1 + N, 6 * (dim_head // 3 // 2)]`` (its
    ``transformer.pos_emb[0]``): per position, the angle of each rotated channel pair (each
    angle repeated for the two channels of its pair)."""
    rot = dim_head // 3
    text_len, n = text_seq_len + 1, image_fmap_size**2
    lang = 1.0 / (10000.0 ** (torch.arange(0, rot, 2)[: rot // 2].float() / rot))
    pixel = torch.linspace(1.0, 10 / 2, rot // 2) * math.pi

    def angles(pos, freqs):
        return (pos.float()[:, None] * freqs).repeat_interleave(2, dim=-1)

    # text frequencies: text at its position, the image far away (8192)
    text_part = angles(torch.cat((torch.arange(text_len), torch.full((n,), 8192))), lang)
    # two image axes at linspace(-1, 1) (row, column); the text at -10 on both
    axis = angles(torch.linspace(-1, 1, steps=image_fmap_size), pixel)
    f = image_fmap_size
    grid = torch.cat((axis[:, None].expand(f, f, -1), axis[None, :].expand(f, f, -1)), dim=-1)
    text_axial = angles(torch.full((text_len,), -10.0), pixel).repeat(1, 2)
    image_part = torch.cat((text_axial, grid.reshape(n, -1)), dim=0)
    return torch.cat((text_part, image_part), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Channel pairs (a, b) -> (-b, a)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


def apply_rotary(rope, t: torch.Tensor) -> torch.Tensor:
    """Rotate the first channels of ``t [B, H, n, dh]`` by ``rope = (cos, sin)`` ([n, r]);
    ``rope=None``: no rotary embeddings."""
    if rope is None:
        return t
    cos, sin = rope
    r = cos.shape[-1]
    x = t[..., :r].float()
    rotated = (x * cos + rotate_half(x) * sin).to(t.dtype)
    return torch.cat((rotated, t[..., r:]), dim=-1)


class Rotary(nn.Module):
    """cos / sin of :func:`rotary_angles` (float32, not saved), sliced per forward."""

    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        angles = rotary_angles(cfg.text_seq_len, cfg.image_fmap_size, cfg.dim_head)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, n: int):
        return self.cos[start : start + n].float(), self.sin[start : start + n].float()


class NoRotary(nn.Module):
    def forward(self, start: int, n: int):
        return None


def attention_mask(attn_type: str, q_pos: torch.Tensor, k_pos: torch.Tensor, text_len: int,
                   fmap: int) -> torch.Tensor:
    """Which keys each query may attend to, ``[len(q_pos), len(k_pos)]`` bool.

    Positions count ``<bos>`` as 0, so the image starts at ``text_len = text_seq_len + 1``.
    Text queries: causal. Image queries: all of the text, and of the image what
    ``attn_type`` allows (every pattern is causal in raster order).
    """
    causal = k_pos[None, :] <= q_pos[:, None]
    if attn_type == "full":
        return causal
    qr, qc = (q_pos - text_len).div(fmap, rounding_mode="floor"), (q_pos - text_len) % fmap
    kr, kc = (k_pos - text_len).div(fmap, rounding_mode="floor"), (k_pos - text_len) % fmap
    dr, dc = qr[:, None] - kr[None, :], qc[:, None] - kc[None, :]  # how far up / left the key is
    if attn_type == "axial_row":
        image = (dr == 0) & (dc >= 0)
    elif attn_type == "axial_col":
        image = (dc == 0) & (dr >= 0)
    elif attn_type == "conv_like":
        span = (CONV_KERNEL - 1) * CONV_DILATION
        image = ((dr >= 0) & (dr <= span) & (dr % CONV_DILATION == 0)
                 & (dc >= 0) & (dc <= span) & (dc % CONV_DILATION == 0))
    else:
        raise ValueError(f"unknown attention type {attn_type!r}")
    text_query, text_key = q_pos[:, None] < text_len, k_pos[None, :] < text_len
    return causal & (text_query | text_key | image)


class TokenShift(nn.Module):
    """DALLE-pytorch's PreShiftToken on a sub-layer's normalised input (see the module doc).

    Positions ``start..start+n`` of ``x [B, n, dim]`` are shifted; with a cache the earlier
    positions come from ``cache.shift[layer, sub]``, where ``x`` is stored first.
    """

    def __init__(self, cfg: DALLEConfig, sub: int):
        super().__init__()
        self.text_len, self.fmap, self.sub = cfg.text_seq_len + 1, cfg.image_fmap_size, sub

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        _, n, d = x.shape
        if cache is not None:
            cache.shift[layer, self.sub][:, start : start + n] = x
            x = cache.shift[layer, self.sub][:, : start + n]
        # row 0 of `padded` is zeros: position p is row p + 1, "no neighbour" is row 0
        padded = F.pad(x, (0, 0, 1, 0))
        pos = torch.arange(start, start + n, device=x.device)
        i = pos - self.text_len  # image index (negative for text)
        is_image = i >= 0
        left = torch.where(is_image & (i % self.fmap == 0), 0, pos)  # row p: position p - 1
        top = torch.where(is_image & (i >= self.fmap), pos + 1 - self.fmap, 0)
        ch = torch.arange(d, device=x.device)
        half, quarter = (d + 1) // 2, (d + 3) // 4  # torch.chunk's sizes for 2 and 4 chunks
        from_top = is_image[:, None] & (ch < quarter)
        from_left = torch.where(is_image[:, None], (ch >= quarter) & (ch < 2 * quarter),
                                ch < half)
        out = torch.where(from_left, padded[:, left], padded[:, pos + 1])
        return torch.where(from_top, padded[:, top], out)


class NoShift(nn.Module):
    def forward(self, x, cache=None, layer=0, start=0):
        return x


# ---- the blocks ------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: DALLEConfig, attn_type: str = "full"):
        super().__init__()
        inner = cfg.heads * cfg.dim_head
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.attn_type = attn_type  # the mask: see attention_mask
        self.text_len, self.fmap = cfg.text_seq_len + 1, cfg.image_fmap_size
        self.to_qkv = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.dim)
        self.dropout = nn.Dropout(cfg.attn_dropout)  # DALLE-pytorch drops the output

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, start: int = 0,
                rope=None):
        b, n, _ = x.shape
        q, k, v = (  # rotary: DALLE-pytorch rotates the values too
            apply_rotary(rope, t.view(b, n, self.heads, self.dim_head).transpose(1, 2))
            for t in self.to_qkv(x).chunk(3, dim=-1)
        )
        if cache is not None:
            cache.k[layer, :, :, start : start + n] = k
            cache.v[layer, :, :, start : start + n] = v
            k, v = cache.k[layer, :, :, : start + n], cache.v[layer, :, :, : start + n]
        if self.attn_type != "full":
            pos = torch.arange(start + n, device=x.device)
            mask = attention_mask(self.attn_type, pos[start:], pos, self.text_len, self.fmap)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif start == 0:  # the whole prefix: plain causal attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif n == 1:  # one new position sees everything before it
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # n new positions after `start` cached ones
            mask = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.dropout(self.to_out(out))


class FeedForward(nn.Module):
    """GEGLU: Linear(dim, 2 * mult * dim) -> x * gelu(gate) -> Linear(mult * dim, dim)."""

    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        hidden = cfg.dim * cfg.ff_mult
        self.w_in = nn.Linear(cfg.dim, 2 * hidden)
        self.dropout = nn.Dropout(cfg.ff_dropout)
        self.w_out = nn.Linear(hidden, cfg.dim)

    def forward(self, x):
        x, gate = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(self.dropout(x * F.gelu(gate)))


def layer_scale_init(layer: int) -> float:
    """DALLE-pytorch's LayerScale start value for the 1-based layer number."""
    return 0.1 if layer <= 18 else 1e-5 if layer <= 24 else 1e-6


class Block(nn.Module):
    """Pre-norm attention and feed-forward branches, each scaled (LayerScale) and added back
    (to one stream, or crosswise to two: :class:`Reversible`)."""

    def __init__(self, cfg: DALLEConfig, layer: int):
        super().__init__()
        eps = layer_scale_init(layer + 1)
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.attn_shift = TokenShift(cfg, 0) if cfg.shift_tokens else NoShift()
        self.attn = Attention(cfg, cfg.attn_type(layer))
        self.attn_norm_out = nn.LayerNorm(cfg.dim) if cfg.sandwich_norm else nn.Identity()
        self.attn_scale = nn.Parameter(torch.full((cfg.dim,), eps))
        self.ff_norm = nn.LayerNorm(cfg.dim)
        self.ff_shift = TokenShift(cfg, 1) if cfg.shift_tokens else NoShift()
        self.ff = FeedForward(cfg)
        self.ff_norm_out = nn.LayerNorm(cfg.dim) if cfg.sandwich_norm else nn.Identity()
        self.ff_scale = nn.Parameter(torch.full((cfg.dim,), eps))

    def attn_branch(self, x, cache=None, layer=0, start=0, rope=None):
        h = self.attn_shift(self.attn_norm(x), cache, layer, start)
        return self.attn_norm_out(self.attn(h, cache, layer, start, rope)) * self.attn_scale

    def ff_branch(self, x, cache=None, layer=0, start=0, rope=None):
        h = self.ff_shift(self.ff_norm(x), cache, layer, start)
        return self.ff_norm_out(self.ff(h)) * self.ff_scale

    def forward(self, x, cache=None, layer=0, start=0, rope=None):
        x = x + self.attn_branch(x, cache, layer, start, rope)
        x = x + self.ff_branch(x, cache, layer, start, rope)
        return x


# ---- reversible blocks -----------------------------------------------------------------------
def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _rng_restored(state, device: torch.device):
    """Run with the random state of ``state`` (dropout draws the masks of the forward)."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


class Reversible(torch.autograd.Function):
    """Two-stream blocks without stored activations (DALLE-pytorch's ReversibleSequence).

    Forward, per block: ``y1 = x1 + attn_branch(x2)``, ``y2 = x2 + ff_branch(y1)``, without
    building a graph; only the last block's outputs are saved. Backward walks the blocks in
    reverse, recomputing each branch on rebuilt inputs (``x2 = y2 - ff_branch(y1)``,
    ``x1 = y1 - attn_branch(x2)``) under the forward's random and autocast state, and returns
    the gradients of both streams and of the blocks' parameters (passed as inputs, so DDP and
    gradient accumulation see ordinary gradients).
    """

    @staticmethod
    def forward(ctx, x1, x2, blocks, rope, *params):
        device = x1.device
        ctx.blocks, ctx.rope, ctx.params = blocks, rope, params
        ctx.autocast = (device.type, torch.is_autocast_enabled(device.type),
                        torch.get_autocast_dtype(device.type))
        ctx.rng = []
        for block in blocks:
            rng_f = _rng_state(device)
            x1 = x1 + block.attn_branch(x2, rope=rope)
            rng_g = _rng_state(device)
            x2 = x2 + block.ff_branch(x1, rope=rope)
            ctx.rng.append((rng_f, rng_g))
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        device = y1.device
        grads = {id(p): None for p in ctx.params}
        for block, (rng_f, rng_g) in zip(reversed(ctx.blocks), reversed(ctx.rng), strict=True):
            params = [p for p in block.parameters() if id(p) in grads]
            with torch.enable_grad(), torch.autocast(device_type, dtype, enabled):
                y1 = y1.detach().requires_grad_()
                with _rng_restored(rng_g, device):
                    g = block.ff_branch(y1, rope=ctx.rope)
                dy1_g, *dg = torch.autograd.grad(g, [y1, *params], dy2, allow_unused=True)
            x2 = y2 - g.detach()
            dy1 = dy1 + dy1_g  # y1 feeds y2 through ff_branch
            with torch.enable_grad(), torch.autocast(device_type, dtype, enabled):
                x2 = x2.detach().requires_grad_()
                with _rng_restored(rng_f, device):
                    f = block.attn_branch(x2, rope=ctx.rope)
                dx2_f, *df = torch.autograd.grad(f, [x2, *params], dy1, allow_unused=True)
            x1 = y1.detach() - f.detach()
            dy2 = dy2 + dx2_f  # x2 feeds y1 through attn_branch
            for p, a, b in zip(params, dg, df, strict=True):
                for d in (a, b):
                    if d is not None:
                        grads[id(p)] = d if grads[id(p)] is None else grads[id(p)] + d
            y1, y2 = x1, x2.detach()
        return (dy1, dy2, None, None, *(grads[id(p)] for p in ctx.params))


class DALLE(nn.Module):
    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        self.config = cfg
        text_dim = cfg.text_dim or cfg.dim
        # position tables, unless rotary embeddings replace them (as in DALLE-pytorch)
        tables = not cfg.rotary_emb
        if cfg.contextual:  # the language model's states (attached, frozen) and a start vector
            self.text_emb = self.text_pos_emb = None
            self.text_bos = nn.Parameter(torch.randn(text_dim) * 0.02)
            self.text_proj = nn.Linear(text_dim, cfg.dim)
            self.text_null = (nn.Parameter(torch.randn(cfg.text_seq_len, text_dim) * 0.02)
                              if cfg.null_caption == "learned" else None)
        else:
            self.text_emb = nn.Embedding(cfg.text_emb_rows, text_dim)
            self.text_pos_emb = nn.Embedding(cfg.text_seq_len + 1, text_dim) if tables else None
            self.text_proj = (nn.Linear(text_dim, cfg.dim) if text_dim != cfg.dim
                              else nn.Identity())
            self.text_null = None
        self.text_encoder = None  # contextual: a ContextualText, set by attach_text_encoder
        self.image_emb = nn.Embedding(cfg.num_image_tokens, cfg.dim)
        # axial position embedding: row + column tables, summed
        fmap = cfg.image_fmap_size
        self.image_pos_h = nn.Parameter(torch.randn(fmap, cfg.dim)) if tables else None
        self.image_pos_w = nn.Parameter(torch.randn(fmap, cfg.dim)) if tables else None
        self.rotary = NoRotary() if tables else Rotary(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.text_head_rows + cfg.num_image_tokens)
        self.grad_checkpointing = False

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def text_seq_len(self) -> int:
        return self.config.text_seq_len

    @property
    def image_seq_len(self) -> int:
        return self.config.image_seq_len

    @property
    def total_seq_len(self) -> int:
        return self.config.text_seq_len + self.config.image_seq_len

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (6N + attention), for MFU."""
        cfg = self.config
        n = sum(p.numel() for name, p in self.named_parameters() if name.startswith("blocks"))
        n += cfg.dim * (cfg.text_head_rows + cfg.num_image_tokens)
        attn = 12 * cfg.depth * cfg.heads * cfg.dim_head * self.total_seq_len / 2  # causal
        return 6 * n + attn

    # ---- embeddings ----------------------------------------------------------------------
    def null_text(self, batch: int, device=None) -> torch.Tensor:
        """The caption used for classifier-free guidance's unconditional rows: all padding."""
        return torch.full((batch, self.text_seq_len), self.config.pad_id, dtype=torch.long,
                          device=device)

    def text_targets(self, text: torch.Tensor) -> torch.Tensor:
        """Caption ids as the model sees them (DALLE-pytorch's unique padding, if enabled)."""
        cfg = self.config
        if not cfg.unique_pad_tokens:
            return text
        reserved = torch.arange(cfg.text_seq_len, device=text.device) + cfg.num_text_tokens
        return torch.where(text == cfg.pad_id, reserved, text)

    def attach_text_encoder(self, encoder) -> None:
        """Contextual models: the frozen language model that reads the captions
        (:class:`~kodalle_cli.model.contextual.ContextualText`). A plain attribute, not a
        submodule: its weights are never trained, saved with the model, or wrapped by DDP."""
        self.text_encoder = encoder

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, T] caption ids -> [B, T + 1, dim] (bos prepended)."""
        assert text.shape[1] == self.text_seq_len, (
            f"text has {text.shape[1]} tokens, the model takes {self.text_seq_len}"
        )
        if self.config.contextual:
            if self.text_encoder is None:
                raise RuntimeError("a contextual model needs its language model: "
                                   "model.attach_text_encoder(ContextualText(...))")
            states = self.text_encoder(text).to(self.text_bos.dtype)
            if self.text_null is not None:  # all-padding captions read the learned null
                null = (text == self.config.pad_id).all(dim=1)[:, None, None]
                states = torch.where(null, self.text_null.to(states.dtype), states)
            start = self.text_bos.expand(text.shape[0], 1, -1)
            return self.text_proj(torch.cat((start, states), dim=1))
        text = F.pad(self.text_targets(text), (1, 0), value=self.config.bos_id)
        if self.text_pos_emb is None:  # rotary
            return self.text_proj(self.text_emb(text))
        pos = torch.arange(text.shape[1], device=text.device)
        return self.text_proj(self.text_emb(text) + self.text_pos_emb(pos))

    def image_positions(self) -> torch.Tensor:
        """[N, dim] axial position embedding, row-major."""
        return (self.image_pos_h[:, None, :] + self.image_pos_w[None, :, :]).flatten(0, 1)

    def embed_image(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """[B, n] codes at image positions start..start+n-1 -> [B, n, dim]."""
        if self.image_pos_h is None:  # rotary
            return self.image_emb(codes)
        pos = self.image_positions()[start : start + codes.shape[1]]
        return self.image_emb(codes) + pos

    def embed(self, text: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_text(text)
        if image is not None and image.shape[1] > 0:
            x = torch.cat((x, self.embed_image(image)), dim=1)
        return x

    # ---- the transformer -----------------------------------------------------------------
    def transformer(self, x, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Blocks + output norm: [B, n, dim] -> [B, n, dim] (before the logits layer)."""
        if self.config.stable:
            x = x * 0.1 + x.detach() * 0.9
        rope = self.rotary(start, x.shape[1])
        if self.config.reversible:
            x = self.reversible_blocks(x, cache, start, rope)
        else:
            x = self.sequential_blocks(x, cache, start, rope)
        if self.config.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        return self.norm_out(x)

    def sequential_blocks(self, x, cache=None, start=0, rope=None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, None, i, 0, rope,
                                                      use_reentrant=False)
            else:
                x = block(x, cache, i, start, rope)
        return x

    def reversible_blocks(self, x, cache=None, start=0, rope=None) -> torch.Tensor:
        """The two streams' mean after the blocks (see :class:`Reversible`). Training (a
        graph is being built) goes through :class:`Reversible`; inference is the same loop."""
        if torch.is_grad_enabled() and cache is None:
            params = [p for p in self.blocks.parameters() if p.requires_grad]
            x1, x2 = Reversible.apply(x, x, self.blocks, rope, *params)
        else:
            x1 = x2 = x
            for i, block in enumerate(self.blocks):
                x1 = x1 + block.attn_branch(x2, cache, i, start, rope)
                x2 = x2 + block.ff_branch(x1, cache, i, start, rope)
        return (x1 + x2) / 2

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        n = self.config.text_head_rows
        return F.linear(h, self.to_logits.weight[:n], self.to_logits.bias[:n])

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        n = self.config.text_head_rows
        return F.linear(h, self.to_logits.weight[n:], self.to_logits.bias[n:])

    def forward(self, text: torch.Tensor, image: torch.Tensor | None = None,
                return_loss: bool = False, cond_drop: float = 0.0):
        """DALLE-pytorch's forward: masked logits [B, n, text + image vocab] for text [B, T]
        and the first codes of the image [B, <= N] (the last position predicts nothing and is
        dropped when the image is complete). ``return_loss=True``: :meth:`loss` instead
        (training calls it this way, so that DDP sees a forward)."""
        if return_loss:
            return self.loss(text, image, cond_drop=cond_drop)
        x = self.embed(text, image)[:, : self.total_seq_len]
        logits = self.to_logits(self.transformer(x))
        n, t = x.shape[1], self.config.text_head_rows
        is_image_pos = torch.arange(n, device=x.device)[:, None] >= self.text_seq_len
        is_image_tok = torch.arange(logits.shape[-1], device=x.device)[None, :] >= t
        return logits.masked_fill(is_image_pos != is_image_tok, -torch.finfo(logits.dtype).max)

    # ---- training ------------------------------------------------------------------------
    def loss(self, text: torch.Tensor, image: torch.Tensor, cond_drop: float = 0.0):
        """``(wt * text_loss + w * image_loss) / (wt + w)`` and its parts (detached); without
        a text head (``text_loss_weight=0``, contextual text) the image loss alone.

        ``cond_drop``: share of captions replaced by padding (classifier-free guidance).
        Only the logits each position may produce are computed (text rows for text
        positions, image rows for image positions): the same loss as the masked logits.
        """
        cfg = self.config
        if cond_drop > 0 and self.training:
            drop = torch.rand(text.shape[0], device=text.device) < cond_drop
            text = torch.where(drop[:, None], cfg.pad_id, text)
        h = self.transformer(self.embed(text, image[:, :-1]))
        t = self.text_seq_len
        image_loss = F.cross_entropy(self.image_logits(h[:, t:]).float().transpose(1, 2), image)
        if not cfg.has_text_head:
            return image_loss, {"image_loss": image_loss.detach()}
        text_ce = F.cross_entropy(
            self.text_logits(h[:, :t]).float().transpose(1, 2), self.text_targets(text),
            reduction="none",
        )
        if cfg.text_loss_on_padding:
            text_loss = text_ce.mean()
        else:
            is_pad = text == cfg.pad_id
            keep = (~is_pad | (is_pad.cumsum(1) == 1)).float()
            text_loss = ((text_ce * keep).sum(1) / keep.sum(1).clamp(min=1)).mean()
        wt, w = cfg.text_loss_weight, cfg.loss_img_weight
        loss = (wt * text_loss + w * image_loss) / (wt + w)
        return loss, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    # ---- generation ----------------------------------------------------------------------
    def new_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        """An empty key/value cache for ``batch`` rows and the full sequence."""
        cfg = self.config
        p = self.to_logits.weight
        return KVCache(
            cfg.depth, batch, cfg.heads, self.total_seq_len, cfg.dim_head,
            device=device or p.device, dtype=dtype or p.dtype,
            shift_dim=cfg.dim if cfg.shift_tokens else None,
        )

    @torch.no_grad()
    def prefill(self, text: torch.Tensor, cache: KVCache,
                image: torch.Tensor | None = None) -> torch.Tensor:
        """Run the caption (and optional first image codes, for priming) through the model
        once, filling ``cache``; return the logits of the next image code, [B, num_image_tokens].
        For classifier-free guidance, put the conditional and the :meth:`null_text` rows in
        one batch."""
        x = self.embed(text, image)
        h = self.transformer(x, cache, start=0)
        cache.length = x.shape[1]
        return self.image_logits(h[:, -1])

    @torch.no_grad()
    def step(self, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one image code per row ([B]) and return the next code's logits [B, N_img]."""
        index = cache.length - (self.text_seq_len + 1)  # image position of `codes`
        assert 0 <= index < self.image_seq_len - 1, "the image is already complete"
        x = self.embed_image(codes.view(-1, 1), start=index)
        h = self.transformer(x, cache, start=cache.length)
        cache.length += 1
        return self.image_logits(h[:, -1])


def init_from_backbone(model: DALLE, embeddings, freeze: bool = False) -> None:
    """Copy a backbone's tables into the text embeddings (KoDALLE's text encoder).

    ``embeddings`` is :class:`kodalle_cli.backbone.Embeddings`. The position rows used are
    ``position_offset .. position_offset + text_seq_len``; a backbone without a position table
    (GPT-J style, rotary) gets a learned one, scaled like its token table. A model with
    ``rotary_emb`` has no position table: only the token table is copied.
    """
    cfg = model.config
    if cfg.contextual:  # no tables: the language model itself is attached
        return
    if tuple(embeddings.token.shape) != tuple(model.text_emb.weight.shape):
        raise ValueError(
            f"backbone token table {tuple(embeddings.token.shape)} does not fit the model's "
            f"{tuple(model.text_emb.weight.shape)}"
        )
    with torch.no_grad():
        model.text_emb.weight.copy_(embeddings.token.float())
        rows = cfg.text_seq_len + 1  # +1: <bos>
        if model.text_pos_emb is None:  # rotary: no position table to fill
            pass
        elif embeddings.position is not None:
            start = embeddings.position_offset
            if embeddings.position.shape[0] < start + rows:
                have = embeddings.position.shape[0] - start
                raise ConfigError(
                    "text_seq_len", cfg.text_seq_len,
                    f"needs {rows} positions (one for <bos>) and the backbone has {have}: "
                    f"use {have - 1} or less",
                )
            model.text_pos_emb.weight.copy_(embeddings.position[start : start + rows].float())
        else:
            std = float(embeddings.token.float().std())
            model.text_pos_emb.weight.normal_(0.0, std if math.isfinite(std) else 0.02)
    model.text_emb.weight.requires_grad_(not freeze)
    if embeddings.position is not None and model.text_pos_emb is not None:
        model.text_pos_emb.weight.requires_grad_(not freeze)
