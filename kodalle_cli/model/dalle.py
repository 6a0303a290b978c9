"""The DALLE transformer: KoDALLE's architecture in one readable file (nanoGPT style).

KoDALLE is lucidrains' DALLE-pytorch (``DALLE(..., rotary_emb=False, shift_tokens=False,
attn_types=('full',))``) whose text token and text position embeddings are a pretrained
language model's tables. The sequence is::

    [bos] t_1 ... t_T  c_1 ... c_N          (T = text_seq_len, N = image_fmap_size ** 2)

and position ``j`` predicts token ``j + 1``: text positions predict text, image positions
predict image codes (the logits of the other kind are masked). The parameters are the same
as DALLE-pytorch's, so :mod:`kodalle_cli.model.convert` maps checkpoints both ways and the
tests check our logits against DALLE-pytorch 1.6.6.

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

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


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

    @property
    def image_seq_len(self) -> int:
        return self.image_fmap_size**2

    @property
    def num_text_logits(self) -> int:
        return self.num_text_tokens + self.text_seq_len

    @property
    def text_emb_rows(self) -> int:
        return self.num_text_logits if self.unique_pad_tokens else self.num_text_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DALLEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class KVCache:
    """Preallocated keys and values of every layer: ``k[layer]`` is ``[B, heads, L, dim_head]``.

    Attention writes the new positions in place (no concatenation per step) and reads the
    prefix ``[:length]``. ``length`` is the number of positions already in the cache.
    """

    def __init__(self, depth, batch, heads, max_len, dim_head, device=None, dtype=None):
        shape = (depth, batch, heads, max_len, dim_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class Attention(nn.Module):
    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        inner = cfg.heads * cfg.dim_head
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.to_qkv = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.dim)
        self.dropout = nn.Dropout(cfg.attn_dropout)  # DALLE-pytorch drops the output

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        b, n, _ = x.shape
        q, k, v = (
            t.view(b, n, self.heads, self.dim_head).transpose(1, 2)
            for t in self.to_qkv(x).chunk(3, dim=-1)
        )
        if cache is not None:
            cache.k[layer, :, :, start : start + n] = k
            cache.v[layer, :, :, start : start + n] = v
            k, v = cache.k[layer, :, :, : start + n], cache.v[layer, :, :, : start + n]
        if start == 0:  # the whole prefix: plain causal attention
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
    """Pre-norm attention and feed-forward, each scaled (LayerScale) and added back."""

    def __init__(self, cfg: DALLEConfig, layer: int):
        super().__init__()
        eps = layer_scale_init(layer + 1)
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.attn_norm_out = nn.LayerNorm(cfg.dim) if cfg.sandwich_norm else nn.Identity()
        self.attn_scale = nn.Parameter(torch.full((cfg.dim,), eps))
        self.ff_norm = nn.LayerNorm(cfg.dim)
        self.ff = FeedForward(cfg)
        self.ff_norm_out = nn.LayerNorm(cfg.dim) if cfg.sandwich_norm else nn.Identity()
        self.ff_scale = nn.Parameter(torch.full((cfg.dim,), eps))

    def forward(self, x, cache=None, layer=0, start=0):
        x = x + self.attn_norm_out(self.attn(self.attn_norm(x), cache, layer, start)) * self.attn_scale
        x = x + self.ff_norm_out(self.ff(self.ff_norm(x))) * self.ff_scale
        return x


class DALLE(nn.Module):
    def __init__(self, cfg: DALLEConfig):
        super().__init__()
        self.config = cfg
        text_dim = cfg.text_dim or cfg.dim
        self.text_emb = nn.Embedding(cfg.text_emb_rows, text_dim)
        self.text_pos_emb = nn.Embedding(cfg.text_seq_len + 1, text_dim)  # +1: <bos>
        self.text_proj = nn.Linear(text_dim, cfg.dim) if text_dim != cfg.dim else nn.Identity()
        self.image_emb = nn.Embedding(cfg.num_image_tokens, cfg.dim)
        # axial position embedding: row + column tables, summed
        self.image_pos_h = nn.Parameter(torch.randn(cfg.image_fmap_size, cfg.dim))
        self.image_pos_w = nn.Parameter(torch.randn(cfg.image_fmap_size, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.num_text_logits + cfg.num_image_tokens)
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
        n += cfg.dim * (cfg.num_text_logits + cfg.num_image_tokens)
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

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, T] caption ids -> [B, T + 1, dim] (bos prepended)."""
        assert text.shape[1] == self.text_seq_len, (
            f"text has {text.shape[1]} tokens, the model takes {self.text_seq_len}"
        )
        text = F.pad(self.text_targets(text), (1, 0), value=self.config.bos_id)
        pos = torch.arange(text.shape[1], device=text.device)
        return self.text_proj(self.text_emb(text) + self.text_pos_emb(pos))

    def image_positions(self) -> torch.Tensor:
        """[N, dim] axial position embedding, row-major."""
        return (self.image_pos_h[:, None, :] + self.image_pos_w[None, :, :]).flatten(0, 1)

    def embed_image(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """[B, n] codes at image positions start..start+n-1 -> [B, n, dim]."""
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
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, i, start)
        if self.config.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        return self.norm_out(x)

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        n = self.config.num_text_logits
        return F.linear(h, self.to_logits.weight[:n], self.to_logits.bias[:n])

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        n = self.config.num_text_logits
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
        n, t = x.shape[1], self.config.num_text_logits
        is_image_pos = torch.arange(n, device=x.device)[:, None] >= self.text_seq_len
        is_image_tok = torch.arange(logits.shape[-1], device=x.device)[None, :] >= t
        return logits.masked_fill(is_image_pos != is_image_tok, -torch.finfo(logits.dtype).max)

    # ---- training ------------------------------------------------------------------------
    def loss(self, text: torch.Tensor, image: torch.Tensor, cond_drop: float = 0.0):
        """``(text_loss + w * image_loss) / (1 + w)`` and its parts (detached).

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
        image_loss = F.cross_entropy(self.image_logits(h[:, t:]).float().transpose(1, 2), image)
        w = cfg.loss_img_weight
        loss = (text_loss + w * image_loss) / (1 + w)
        return loss, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    # ---- generation ----------------------------------------------------------------------
    def new_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        """An empty key/value cache for ``batch`` rows and the full sequence."""
        cfg = self.config
        p = self.to_logits.weight
        return KVCache(
            cfg.depth, batch, cfg.heads, self.total_seq_len, cfg.dim_head,
            device=device or p.device, dtype=dtype or p.dtype,
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
    (GPT-J style, rotary) gets a learned one, scaled like its token table.
    """
    cfg = model.config
    if tuple(embeddings.token.shape) != tuple(model.text_emb.weight.shape):
        raise ValueError(
            f"backbone token table {tuple(embeddings.token.shape)} does not fit the model's "
            f"{tuple(model.text_emb.weight.shape)}"
        )
    with torch.no_grad():
        model.text_emb.weight.copy_(embeddings.token.float())
        rows = cfg.text_seq_len + 1
        if embeddings.position is not None:
            start = embeddings.position_offset
            if embeddings.position.shape[0] < start + rows:
                from kodalle_cli.errors import ConfigError

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
    if embeddings.position is not None:
        model.text_pos_emb.weight.requires_grad_(not freeze)
