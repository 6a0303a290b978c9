"""The VQGAN image tokenizer: taming-transformers' VQModel / GumbelVQ, re-written plainly.

Module names follow taming's exactly, so a taming ``state_dict`` (minus its ``loss.*``
keys) loads with ``strict=True``: ``encoder.*``, ``decoder.*``, ``quant_conv``,
``post_quant_conv`` and ``quantize.embedding.weight`` (VQModel) or ``quantize.proj`` +
``quantize.embed`` (GumbelVQ). Attention runs through ``scaled_dot_product_attention``.

Images are ``[B, 3, H, W]`` floats in ``[0, 1]``; codes are ``[B, (H/f) * (W/f)]`` longs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQGANConfig:
    """Architecture of a VQGAN (taming's ``model.params`` with ``ddconfig`` flattened)."""

    kind: str = "vq"  # "vq" (taming.models.vqgan.VQModel) | "gumbel" (GumbelVQ)
    n_embed: int = 16384
    embed_dim: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    resamp_with_conv: bool = True
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    z_channels: int = 256
    double_z: bool = False
    beta: float = 0.25  # VQ commitment weight (taming's VectorQuantizer2 default)
    kl_weight: float = 1e-8  # Gumbel prior weight
    extra: dict = field(default_factory=dict)  # other taming params kept for round trips

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.kind not in {"vq", "gumbel"}:
            raise ValueError(f"unknown VQGAN kind {self.kind!r} (vq|gumbel)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def fmap_size(self) -> int:
        return self.resolution // self.downsample_factor

    def architecture(self) -> dict:
        """The fields that decide what the weights mean (what the identity hash covers)."""
        d = asdict(self)
        d.pop("extra")
        d.pop("dropout")
        d["ch_mult"] = list(d["ch_mult"])
        d["attn_resolutions"] = list(d["attn_resolutions"])
        return d


# ---- building blocks (taming.modules.diffusionmodules.model) ---------------------------------
def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [b, 1, hw, c], scale 1/sqrt(c)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        curr_res = cfg.resolution
        in_ch_mult = (1, *cfg.ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = cfg.ch * in_ch_mult[i_level], cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, cfg.resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv2d(block_in, z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, cfg.resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)  # taming's order: up[0] is the full-resolution level
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- quantizers (taming.modules.vqvae.quantize) ----------------------------------------------
class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantizer (taming's VectorQuantizer2, legacy loss).

    ``l2_codes`` (a training recipe, as in ViT-VQGAN): features and codes are compared on the
    unit sphere, and the codebook is kept unit-norm (:meth:`renormalise` after each optimizer
    step). The stored model stays taming's: with unit-norm codes, taming's Euclidean nearest
    code of the raw feature is the same code (``|z - e|^2 = |z|^2 + 1 - 2 z.e``), and the
    decoder gets the same code vector.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, l2_codes: bool = False):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.l2_codes = l2_codes
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)
        self.renormalise()

    @torch.no_grad()
    def renormalise(self) -> None:
        """With ``l2_codes``: put every code back on the unit sphere."""
        if self.l2_codes:
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=1))

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] pre-quant features -> [B, h, w] code indices."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        w = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * flat @ w.t()
        return d.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, h, w] indices -> [B, C, h, w] codebook vectors."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):
        """Quantize with a straight-through gradient; returns (z_q, loss, codes)."""
        if self.l2_codes:
            z = F.normalize(z, dim=1)
        codes = self.codes(z)
        z_q = self.lookup(codes)
        # taming's legacy weighting: codebook term + beta * commitment term
        loss = F.mse_loss(z_q.detach(), z) + self.beta * F.mse_loss(z_q, z.detach())
        return z + (z_q - z).detach(), loss, codes


class GumbelQuantize(nn.Module):
    """Gumbel-softmax quantizer. Encoding takes the argmax of the logits (deterministic;
    taming's forward also samples Gumbel noise in eval mode)."""

    def __init__(self, num_hiddens: int, embed_dim: int, n_embed: int, kl_weight: float = 5e-4,
                 temperature: float = 1.0):
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.kl_weight, self.temperature = kl_weight, temperature
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z).argmax(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embed(codes).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):
        logits = self.proj(z)
        hard = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=True)
        z_q = torch.einsum("bnhw,nd->bdhw", hard, self.embed.weight)
        qy = F.softmax(logits, dim=1)
        loss = self.kl_weight * (qy * torch.log(qy * self.n_embed + 1e-10)).sum(1).mean()
        return z_q, loss, hard.argmax(1)


# ---- the model -------------------------------------------------------------------------------
class VQGAN(nn.Module):
    """Encoder -> quant_conv -> quantize -> post_quant_conv -> decoder."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.kind == "gumbel":
            self.quantize = GumbelQuantize(cfg.z_channels, cfg.embed_dim, cfg.n_embed,
                                           kl_weight=cfg.kl_weight)
        else:
            self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=cfg.beta)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self._identity: str | None = None
        self.source: str | None = None  # what load_vqgan was given

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.config.n_embed

    @property
    def image_size(self) -> int:
        return self.config.resolution

    @property
    def fmap_size(self) -> int:
        return self.config.fmap_size

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def codebook(self) -> torch.Tensor:
        q = self.quantize
        return q.embed.weight if self.config.kind == "gumbel" else q.embedding.weight

    # -- the math ------------------------------------------------------------------------
    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> pre-quantization features [B, embed_dim, h, w]."""
        return self.quant_conv(self.encoder(x))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents -> images in [-1, 1] (unclamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor):
        """Training pass on images in [-1, 1]: (reconstruction, quantizer loss, codes, features)."""
        h = self.encode_features(x)
        z_q, qloss, codes = self.quantize(h)
        return self.decode_latents(z_q), qloss, codes, h

    # -- the tokenizer API ---------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] (or uint8) -> codes ``[B, (H/f)*(W/f)]`` (long)."""
        out = []
        for chunk in _chunks(images, batch_size):
            x = chunk.to(self.device)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.to(self.codebook.dtype)
            codes = self.quantize.codes(self.encode_features(2 * x - 1))
            out.append(codes.flatten(1))
        return torch.cat(out)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Codes ``[B, N]`` (N a square) -> images ``[B, 3, H, W]`` in [0, 1]."""
        out = []
        for chunk in _chunks(codes, batch_size):
            b, n = chunk.shape
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"decode needs a square number of codes, got {n}")
            grid = chunk.to(self.device, torch.long).view(b, side, side)
            img = self.decode_latents(self.quantize.lookup(grid))
            out.append(((img.clamp(-1, 1) + 1) / 2).float())
        return torch.cat(out)

    def identity(self) -> str:
        """sha256 of the architecture and every weight: the same for a .ckpt and its copy."""
        if self._identity is None:
            h = hashlib.sha256(json.dumps(self.config.architecture(), sort_keys=True).encode())
            for name, t in sorted(self.state_dict().items()):
                t = t.detach().to("cpu", torch.float32).contiguous()
                h.update(f"{name}:{list(t.shape)}".encode())
                h.update(t.numpy().tobytes())
            self._identity = "sha256:" + h.hexdigest()
        return self._identity


def _chunks(x: torch.Tensor, batch_size: int | None):
    if not batch_size or batch_size >= len(x):
        yield x
        return
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]
