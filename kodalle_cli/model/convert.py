"""DALLE-pytorch / KoDALLE checkpoints <-> kodalle's :class:`~kodalle_cli.model.dalle.DALLE`.

DALLE-pytorch's ``train_dalle.py`` (and KoDALLE's ``train.py``) save
``{"hparams": ..., "vae_params": ..., "weights": state_dict}`` with ``torch.save``; it is read
here with ``weights_only=True``. Key layouts accepted: DALLE-pytorch 1.6.6
(``transformer.layers.layers.{i}.{0,1}.fn.fn.fn.to_qkv.weight``, with ``CachedAs``), older
releases without that wrapper (``...fn.fn.to_qkv...``), and both axial position embedding
layouts (``image_pos_emb.weights.0`` and ``image_pos_emb.weights_0``).

Which text layout a checkpoint has is read from its shapes: DALLE-pytorch's own text
embedding has ``num_text_tokens + text_seq_len`` rows (unique padding tokens, pad id 0);
KoDALLE's is the backbone's token table (``num_text_tokens`` rows, no remapping) and its
position table is the backbone's whole table, of which rows ``0..text_seq_len`` are used.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kodalle_cli.errors import KodalleError
from kodalle_cli.model.dalle import DALLE, DALLEConfig

_LAYER = re.compile(r"^transformer\.layers\.layers\.(\d+)\.([01])\.(.+)$")
# a DALLE-pytorch block key without its wrapper prefixes (LayerScale, PreNorm, CachedAs: each
# adds "fn.") -> kodalle block attribute, per sub-layer (0: attention, 1: feed-forward)
_SUFFIXES = {
    0: {"scale": "attn_scale", "norm.weight": "attn_norm.weight", "norm.bias": "attn_norm.bias",
        "norm_out.weight": "attn_norm_out.weight", "norm_out.bias": "attn_norm_out.bias",
        "to_qkv.weight": "attn.to_qkv.weight", "to_out.0.weight": "attn.to_out.weight",
        "to_out.0.bias": "attn.to_out.bias"},
    1: {"scale": "ff_scale", "norm.weight": "ff_norm.weight", "norm.bias": "ff_norm.bias",
        "norm_out.weight": "ff_norm_out.weight", "norm_out.bias": "ff_norm_out.bias",
        "net.0.weight": "ff.w_in.weight", "net.0.bias": "ff.w_in.bias",
        "net.3.weight": "ff.w_out.weight", "net.3.bias": "ff.w_out.bias"},
}
# the same, in DALLE-pytorch 1.6.6's spelling (for writing)
_DP_NAMES = {
    "attn_scale": "0.scale", "attn_norm.weight": "0.fn.norm.weight",
    "attn_norm.bias": "0.fn.norm.bias", "attn_norm_out.weight": "0.fn.norm_out.weight",
    "attn_norm_out.bias": "0.fn.norm_out.bias", "attn.to_qkv.weight": "0.fn.fn.fn.to_qkv.weight",
    "attn.to_out.weight": "0.fn.fn.fn.to_out.0.weight",
    "attn.to_out.bias": "0.fn.fn.fn.to_out.0.bias",
    "ff_scale": "1.scale", "ff_norm.weight": "1.fn.norm.weight", "ff_norm.bias": "1.fn.norm.bias",
    "ff_norm_out.weight": "1.fn.norm_out.weight", "ff_norm_out.bias": "1.fn.norm_out.bias",
    "ff.w_in.weight": "1.fn.fn.net.0.weight", "ff.w_in.bias": "1.fn.fn.net.0.bias",
    "ff.w_out.weight": "1.fn.fn.net.3.weight", "ff.w_out.bias": "1.fn.fn.net.3.bias",
}


def _block_key(layer: int, sub: int, rest: str) -> str | None:
    while rest.startswith("fn."):
        rest = rest[3:]
    ours = _SUFFIXES[sub].get(rest)
    return None if ours is None else f"blocks.{layer}.{ours}"


def _axial(sd: dict, i: int) -> torch.Tensor:
    for key in (f"image_pos_emb.weights.{i}", f"image_pos_emb.weights_{i}"):
        if key in sd:
            return sd[key]
    raise KodalleError(f"checkpoint has no image_pos_emb.weights.{i}: not a DALLE (full attn)")


def from_dalle_pytorch(
    weights: dict,
    hparams: dict | None = None,
    *,
    heads: int | None = None,
    pad_id: int | None = None,
    bos_id: int = 0,
    **overrides,
) -> tuple[DALLEConfig, dict]:
    """A DALLE-pytorch or KoDALLE state_dict -> (kodalle config, kodalle state_dict).

    ``heads`` comes from ``hparams`` when present (it cannot be read from shapes). ``pad_id``:
    DALLE-pytorch pads with 0; KoDALLE with its tokenizer's pad id (klue/roberta: 1, the
    default for that layout).
    """
    hparams = dict(hparams or {})
    sd = {k: v for k, v in weights.items() if not k.startswith("vae.")}
    unsupported = [k for k in sd if "rotary" in k or k.startswith("transformer.pos_emb")]
    if hparams.get("rotary_emb") or hparams.get("shift_tokens") or unsupported:
        raise KodalleError(
            "this checkpoint uses rotary embeddings or token shift; kodalle's DALLE is "
            "KoDALLE's (rotary_emb=False, shift_tokens=False)"
        )
    attn_types = hparams.get("attn_types") or ("full",)
    if isinstance(attn_types, str):
        attn_types = (attn_types,)
    if any(a != "full" for a in attn_types):
        raise KodalleError(f"attn_types {tuple(attn_types)}: only full attention converts")
    if hparams.get("reversible"):
        raise KodalleError("reversible DALLE checkpoints are not supported")

    out: dict[str, torch.Tensor] = {}
    depth = 0
    for key, value in sd.items():
        m = _LAYER.match(key)
        if m is None:
            continue
        layer, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        ours = _block_key(layer, sub, rest)
        if ours is None:
            raise KodalleError(f"unknown DALLE transformer weight {key}")
        out[ours] = value.reshape(-1) if ours.endswith("_scale") else value
        depth = max(depth, layer + 1)
    if depth == 0:
        raise KodalleError("no transformer layers found: not a DALLE state_dict")

    dim = sd["to_logits.0.weight"].shape[0]
    total = sd["to_logits.1.weight"].shape[0]
    num_image_tokens = sd["image_emb.weight"].shape[0]
    text_rows, text_dim = sd["text_emb.weight"].shape
    fmap = _axial(sd, 0).shape[1]
    text_seq_len = hparams.get("text_seq_len")
    num_text_logits = total - num_image_tokens
    if text_seq_len is None:
        text_seq_len = sd["text_pos_emb.weight"].shape[0] - 1
    unique = text_rows == num_text_logits
    num_text_tokens = num_text_logits - text_seq_len
    if not unique and text_rows != num_text_tokens:
        raise KodalleError(
            f"text_emb has {text_rows} rows; expected {num_text_logits} (DALLE-pytorch) or "
            f"{num_text_tokens} (KoDALLE) for text_seq_len {text_seq_len}"
        )
    heads = heads or hparams.get("heads")
    inner = out["blocks.0.attn.to_qkv.weight"].shape[0] // 3
    if heads is None:
        dim_head = hparams.get("dim_head", 64)
        heads = inner // dim_head
    cfg = DALLEConfig(
        num_text_tokens=num_text_tokens, num_image_tokens=num_image_tokens,
        image_fmap_size=fmap, dim=dim, depth=depth, heads=heads, dim_head=inner // heads,
        ff_mult=out["blocks.0.ff.w_out.weight"].shape[1] // dim, text_seq_len=text_seq_len,
        text_dim=None if text_dim == dim else text_dim,
        pad_id=(0 if unique else 1) if pad_id is None else pad_id, bos_id=bos_id,
        unique_pad_tokens=unique,
        loss_img_weight=float(hparams.get("loss_img_weight", 7)),
        text_loss_on_padding=True,
        stable=bool(hparams.get("stable", False)),
        sandwich_norm=any("norm_out" in k for k in out),
        attn_dropout=float(hparams.get("attn_dropout", 0.0)),
        ff_dropout=float(hparams.get("ff_dropout", 0.0)),
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if text_dim != dim:
        raise KodalleError(f"text_emb dim {text_dim} != model dim {dim}")
    for i in range(depth):  # checkpoints from before LayerScale: a scale of 1
        for name in ("attn_scale", "ff_scale"):
            out.setdefault(f"blocks.{i}.{name}", torch.ones(dim))
    out["text_emb.weight"] = sd["text_emb.weight"]
    out["text_pos_emb.weight"] = sd["text_pos_emb.weight"][: text_seq_len + 1]
    out["image_emb.weight"] = sd["image_emb.weight"]
    out["image_pos_h"] = _axial(sd, 0).reshape(fmap, dim)
    out["image_pos_w"] = _axial(sd, 1).reshape(-1, dim)
    out["norm_out.weight"] = sd["to_logits.0.weight"]
    out["norm_out.bias"] = sd["to_logits.0.bias"]
    out["to_logits.weight"] = sd["to_logits.1.weight"]
    out["to_logits.bias"] = sd["to_logits.1.bias"]
    return cfg, out


def to_dalle_pytorch(model: DALLE) -> tuple[dict, dict]:
    """kodalle model -> (DALLE-pytorch 1.6.6 state_dict without ``vae.*``, hparams).

    Load it with ``dalle.load_state_dict(sd, strict=False)`` (the VAE's weights are its own).
    A learned text projection (backbone dim != dim) has no DALLE-pytorch equivalent.
    """
    cfg = model.config
    if cfg.text_dim not in (None, cfg.dim):
        raise KodalleError("a model with a text projection has no DALLE-pytorch equivalent")
    sd = model.state_dict()
    out = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            _, layer, rest = key.split(".", 2)
            name = _DP_NAMES[rest]
            if rest.endswith("_scale"):
                value = value.reshape(1, 1, -1)
            out[f"transformer.layers.layers.{layer}.{name}"] = value
    fmap, dim = cfg.image_fmap_size, cfg.dim
    out.update({
        "text_emb.weight": sd["text_emb.weight"],
        "text_pos_emb.weight": sd["text_pos_emb.weight"],
        "image_emb.weight": sd["image_emb.weight"],
        "image_pos_emb.weights.0": sd["image_pos_h"].reshape(1, fmap, 1, dim),
        "image_pos_emb.weights.1": sd["image_pos_w"].reshape(1, 1, fmap, dim),
        "to_logits.0.weight": sd["norm_out.weight"],
        "to_logits.0.bias": sd["norm_out.bias"],
        "to_logits.1.weight": sd["to_logits.weight"],
        "to_logits.1.bias": sd["to_logits.bias"],
    })
    hparams = {
        "num_text_tokens": cfg.num_text_tokens, "text_seq_len": cfg.text_seq_len, "dim": dim,
        "depth": cfg.depth, "heads": cfg.heads, "dim_head": cfg.dim_head, "reversible": False,
        "loss_img_weight": cfg.loss_img_weight, "attn_types": ("full",),
        "ff_dropout": cfg.ff_dropout, "attn_dropout": cfg.attn_dropout, "stable": cfg.stable,
        "sandwich_norm": cfg.sandwich_norm, "shift_tokens": False, "rotary_emb": False,
    }
    return {k: v.detach().clone() for k, v in out.items()}, hparams


def load_dalle_pytorch_checkpoint(path: str | Path, **kwargs) -> tuple[DALLE, dict]:
    """Read a ``{"hparams", "vae_params", "weights"}`` .pt (``weights_only=True``) into a
    kodalle model; returns (model, the checkpoint's vae_params or {})."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled classes, not a torch file
        raise KodalleError(
            f"cannot read {path} safely (weights_only=True): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if not isinstance(ckpt, dict) or "weights" not in ckpt:
        raise KodalleError(f"{path} is not a DALLE-pytorch checkpoint (no 'weights')")
    cfg, sd = from_dalle_pytorch(ckpt["weights"], ckpt.get("hparams"), **kwargs)
    model = DALLE(cfg)
    model.load_state_dict(sd)
    return model, dict(ckpt.get("vae_params") or {})


def save_dalle_pytorch_checkpoint(model: DALLE, path: str | Path,
                                  vae_params: dict | None = None) -> None:
    """Write a kodalle model as a DALLE-pytorch / KoDALLE ``.pt`` (temp name, then rename)."""
    import os

    sd, hparams = to_dalle_pytorch(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    hparams["attn_types"] = list(hparams["attn_types"])
    torch.save({"hparams": hparams, "vae_params": vae_params, "weights": sd}, tmp)
    os.replace(tmp, path)
