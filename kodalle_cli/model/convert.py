"""DALLE-pytorch / KoDALLE checkpoints <-> kodalle's :class:`~kodalle_cli.model.dalle.DALLE`.

DALLE-pytorch's ``train_dalle.py`` (and KoDALLE's ``train.py``) save
``{"hparams": ..., "vae_params": ..., "weights": state_dict}`` with ``torch.save``; it is read
here with ``weights_only=True``. Key layouts accepted: DALLE-pytorch 1.6.6
(``transformer.layers.layers.{i}.{0,1}.fn.fn.fn.to_qkv.weight``, with ``CachedAs``; reversible
models ``transformer.layers.blocks.{i}.{f,g}.net.fn...``; token shift adds two wrappers),
older releases without those wrappers (``...fn.fn.to_qkv...``), and both axial position
embedding layouts (``image_pos_emb.weights.0`` and ``image_pos_emb.weights_0``).

Which text layout a checkpoint has is read from its shapes: DALLE-pytorch's own text
embedding has ``num_text_tokens + text_seq_len`` rows (unique padding tokens, pad id 0);
KoDALLE's is the backbone's token table (``num_text_tokens`` rows, no remapping) and its
position table is the backbone's whole table, of which rows ``0..text_seq_len`` are used.

The architecture options come from the weights where they show there, else from ``hparams``:

- ``reversible``: the key layout (``layers.blocks`` vs ``layers.layers``);
- ``rotary_emb``: no position tables, and ``transformer.pos_emb`` (checked against
  DALLE-pytorch 1.6.6's layout, which also checks ``heads``);
- ``shift_tokens``: only ``hparams`` can say. ``None`` (KoDALLE writes that) is off; a
  checkpoint whose hparams lack the key gets DALLE-pytorch 1.6.6's default for its kind:
  on for rotary checkpoints (1.6.6 turns both on by default), off for ones with position
  tables (KoDALLE and releases from before token shift);
- ``attn_types``: ``hparams`` (a tuple, a list, or KoDALLE's string ``"full"``; default full).

Whatever kodalle cannot represent (``sparse`` attention, shared layers, shared input/output
embeddings, an unknown weight, hparams that contradict the weights) is refused with one line
naming it: no model is half loaded.
"""

from __future__ import annotations

import math
import re
from itertools import cycle, islice
from pathlib import Path

import torch

from kodalle_cli.errors import ConfigError, KodalleError
from kodalle_cli.model.dalle import DALLE, DALLEConfig, rotary_angles

_LAYER = re.compile(
    r"^transformer\.layers\.(?:layers\.(?P<i>\d+)\.(?P<sub>[01])"
    r"|blocks\.(?P<ri>\d+)\.(?P<fg>[fg])\.net)\.(?P<rest>.+)$"
)
# a DALLE-pytorch block key without its wrapper prefixes (LayerScale, PreNorm, CachedAs,
# PreShiftToken: each adds "fn.") -> kodalle block attribute, per sub-layer (0: attention,
# 1: feed-forward)
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
_TOP_LEVEL = {  # non-block weights with one name in both
    "text_emb.weight", "text_pos_emb.weight", "image_emb.weight", "image_pos_emb.weights.0",
    "image_pos_emb.weights.1", "image_pos_emb.weights_0", "image_pos_emb.weights_1",
    "to_logits.0.weight", "to_logits.0.bias", "to_logits.1.weight", "to_logits.1.bias",
    "transformer.pos_emb",  # the rotary table (a buffer DALLE-pytorch saves)
    "logits_mask",  # a buffer older releases saved
}


def _block_key(layer: int, sub: int, rest: str) -> str | None:
    while rest.startswith("fn."):
        rest = rest[3:]
    ours = _SUFFIXES[sub].get(rest)
    return None if ours is None else f"blocks.{layer}.{ours}"


def _dp_block_key(cfg: DALLEConfig, layer: int, ours: str) -> str:
    """The DALLE-pytorch 1.6.6 name of kodalle's ``blocks.{layer}.{ours}``."""
    sub = 0 if ours.startswith("attn") else 1
    prefix = (f"transformer.layers.blocks.{layer}.{'fg'[sub]}.net." if cfg.reversible
              else f"transformer.layers.layers.{layer}.{sub}.")
    name = next(k for k, v in _SUFFIXES[sub].items() if v == ours)
    if name == "scale":  # LayerScale's own parameter
        return prefix + name
    if name.startswith("norm"):  # PreNorm's, inside LayerScale
        return prefix + "fn." + name
    # inside PreNorm: [CachedAs, PreShiftToken] with token shift, then CachedAs around the
    # attention (the feed-forward has none)
    wrappers = (2 if cfg.shift_tokens else 0) + (1 if sub == 0 else 0)
    return prefix + "fn.fn." + "fn." * wrappers + name


def _axial(sd: dict, i: int) -> torch.Tensor:
    for key in (f"image_pos_emb.weights.{i}", f"image_pos_emb.weights_{i}"):
        if key in sd:
            return sd[key]
    raise KodalleError(f"checkpoint has no image_pos_emb.weights.{i}: not a DALLE (full attn)")


def _attn_types(value) -> tuple[str, ...]:
    if value is None:
        return ("full",)
    if isinstance(value, str):  # KoDALLE saved ATTN_TYPES = "full"
        return tuple(value.split(","))
    return tuple(str(v) for v in value)


def _refuse_unrepresentable(hparams: dict, depth: int) -> None:
    if hparams.get("sparse_attn"):
        raise KodalleError("checkpoint hparam sparse_attn=True: DeepSpeed block-sparse "
                           "attention is not supported")
    if hparams.get("share_input_output_emb"):
        raise KodalleError("checkpoint hparam share_input_output_emb=True: shared input and "
                           "output embeddings are not supported")
    for name in ("shared_attn_ids", "shared_ff_ids"):  # cycled over the layers
        ids = hparams.get(name)
        if ids is not None and len({str(i) for i in islice(cycle(ids), depth)}) < depth:
            raise KodalleError(f"checkpoint hparam {name}={tuple(ids)}: layers sharing weights "
                               "are not supported")


def _option(hparams: dict, name: str, from_weights: bool, what: str) -> bool:
    """An option the weights show: hparams may confirm it, not contradict it."""
    said = hparams.get(name)
    if said is not None and bool(said) != from_weights:
        raise KodalleError(f"checkpoint hparam {name}={said} contradicts its weights ({what})")
    return from_weights


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
    KoDALLE's layout pads with its tokenizer's pad id (klue/roberta: 1, the default). Its
    value does not apply to DALLE-pytorch's layout: DALLE-pytorch turns every id 0 into a
    padding token, so such a checkpoint keeps ``pad_id=0`` and captions are padded with 0,
    whatever tokenizer encodes them (the same ids give DALLE-pytorch's own outputs).
    Raises :class:`KodalleError` naming what cannot be converted.
    """
    hparams = dict(hparams or {})
    sd = {k: v for k, v in weights.items() if not k.startswith("vae.")}

    out: dict[str, torch.Tensor] = {}
    depth, layouts = 0, set()
    for key, value in sd.items():
        m = _LAYER.match(key)
        if m is None:
            if key not in _TOP_LEVEL:
                raise KodalleError(f"unknown DALLE weight {key}: not a checkpoint kodalle reads")
            continue
        if m["fg"] is not None:
            layer, sub, layouts = int(m["ri"]), "fg".index(m["fg"]), layouts | {"reversible"}
        else:
            layer, sub, layouts = int(m["i"]), int(m["sub"]), layouts | {"sequential"}
        ours = _block_key(layer, sub, m["rest"])
        if ours is None:
            raise KodalleError(f"unknown DALLE transformer weight {key}")
        out[ours] = value.reshape(-1) if ours.endswith("_scale") else value
        depth = max(depth, layer + 1)
    if depth == 0:
        raise KodalleError("no transformer layers found: not a DALLE state_dict")
    if len(layouts) > 1:
        raise KodalleError("checkpoint mixes reversible (layers.blocks) and sequential "
                           "(layers.layers) transformer weights")
    _refuse_unrepresentable(hparams, depth)
    reversible = _option(hparams, "reversible", "reversible" in layouts,
                         "layers.blocks" if "reversible" in layouts else "layers.layers")
    has_tables = "text_pos_emb.weight" in sd
    rotary = _option(hparams, "rotary_emb", not has_tables,
                     "position tables" if has_tables else "no position tables")
    if rotary and "transformer.pos_emb" not in sd:
        raise KodalleError("checkpoint has neither text_pos_emb nor transformer.pos_emb: "
                           "cannot tell its positions (rotary_emb)")
    shift = hparams["shift_tokens"] if "shift_tokens" in hparams else rotary
    shift = bool(shift)

    dim = sd["to_logits.0.weight"].shape[0]
    total = sd["to_logits.1.weight"].shape[0]
    num_image_tokens = sd["image_emb.weight"].shape[0]
    text_rows, text_dim = sd["text_emb.weight"].shape
    text_seq_len = hparams.get("text_seq_len")
    if rotary:
        pos_emb = sd["transformer.pos_emb"].reshape(-1, sd["transformer.pos_emb"].shape[-1])
        if text_seq_len is None:  # text rows have their position in column 0, images 8192
            text_seq_len = int((pos_emb[:, 0] != 8192).sum()) - 1
        fmap = math.isqrt(pos_emb.shape[0] - text_seq_len - 1)
        if fmap * fmap != pos_emb.shape[0] - text_seq_len - 1:
            raise KodalleError(f"transformer.pos_emb has {pos_emb.shape[0]} rows: no square "
                               f"image grid after text_seq_len={text_seq_len} (+1 for <bos>)")
    else:
        fmap = _axial(sd, 0).shape[1]
        if text_seq_len is None:
            text_seq_len = sd["text_pos_emb.weight"].shape[0] - 1
    num_text_logits = total - num_image_tokens
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
    try:
        cfg = DALLEConfig(
            num_text_tokens=num_text_tokens, num_image_tokens=num_image_tokens,
            image_fmap_size=fmap, dim=dim, depth=depth, heads=heads, dim_head=inner // heads,
            ff_mult=out["blocks.0.ff.w_out.weight"].shape[1] // dim, text_seq_len=text_seq_len,
            text_dim=None if text_dim == dim else text_dim,
            pad_id=0 if unique else 1 if pad_id is None else pad_id, bos_id=bos_id,
            unique_pad_tokens=unique,
            loss_img_weight=float(hparams.get("loss_img_weight", 7)),
            text_loss_on_padding=True,
            stable=bool(hparams.get("stable", False)),
            sandwich_norm=any("norm_out" in k for k in out),
            attn_dropout=float(hparams.get("attn_dropout") or 0.0),
            ff_dropout=float(hparams.get("ff_dropout") or 0.0),
            reversible=reversible, rotary_emb=rotary, shift_tokens=shift,
            attn_types=_attn_types(hparams.get("attn_types")),
        )
    except ConfigError as exc:
        raise KodalleError(f"checkpoint hparam {exc}") from None
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if text_dim != dim:
        raise KodalleError(f"text_emb dim {text_dim} != model dim {dim}")
    if rotary:
        want = rotary_angles(text_seq_len, fmap, cfg.dim_head)
        if pos_emb.shape != want.shape or not torch.allclose(pos_emb.float(), want, atol=1e-3):
            raise KodalleError(
                f"transformer.pos_emb {tuple(pos_emb.shape)} is not DALLE-pytorch 1.6.6's "
                f"rotary table for heads={heads} (dim_head {cfg.dim_head}), "
                f"text_seq_len={text_seq_len}: check the heads hparam (rotary_emb)"
            )
    for i in range(depth):  # checkpoints from before LayerScale: a scale of 1
        for name in ("attn_scale", "ff_scale"):
            out.setdefault(f"blocks.{i}.{name}", torch.ones(dim))
    out["text_emb.weight"] = sd["text_emb.weight"]
    out["image_emb.weight"] = sd["image_emb.weight"]
    if not rotary:
        out["text_pos_emb.weight"] = sd["text_pos_emb.weight"][: text_seq_len + 1]
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
    if not cfg.has_text_head:
        raise KodalleError("a model without a text head (--text-loss-weight 0, contextual "
                           "text) has no DALLE-pytorch equivalent")
    sd = model.state_dict()
    out = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            _, layer, rest = key.split(".", 2)
            if rest.endswith("_scale"):
                value = value.reshape(1, 1, -1)
            out[_dp_block_key(cfg, int(layer), rest)] = value
    fmap, dim = cfg.image_fmap_size, cfg.dim
    out.update({
        "text_emb.weight": sd["text_emb.weight"],
        "image_emb.weight": sd["image_emb.weight"],
        "to_logits.0.weight": sd["norm_out.weight"],
        "to_logits.0.bias": sd["norm_out.bias"],
        "to_logits.1.weight": sd["to_logits.weight"],
        "to_logits.1.bias": sd["to_logits.bias"],
    })
    if cfg.rotary_emb:
        angles = rotary_angles(cfg.text_seq_len, fmap, cfg.dim_head)
        out["transformer.pos_emb"] = angles[None]
    else:
        out.update({
            "text_pos_emb.weight": sd["text_pos_emb.weight"],
            "image_pos_emb.weights.0": sd["image_pos_h"].reshape(1, fmap, 1, dim),
            "image_pos_emb.weights.1": sd["image_pos_w"].reshape(1, 1, fmap, dim),
        })
    hparams = {
        "num_text_tokens": cfg.num_text_tokens, "text_seq_len": cfg.text_seq_len, "dim": dim,
        "depth": cfg.depth, "heads": cfg.heads, "dim_head": cfg.dim_head,
        "reversible": cfg.reversible, "loss_img_weight": cfg.loss_img_weight,
        "attn_types": tuple(cfg.attn_types), "ff_dropout": cfg.ff_dropout,
        "attn_dropout": cfg.attn_dropout, "stable": cfg.stable,
        "sandwich_norm": cfg.sandwich_norm, "shift_tokens": cfg.shift_tokens,
        "rotary_emb": cfg.rotary_emb,
    }
    return {k: v.detach().clone() for k, v in out.items()}, hparams


def load_dalle_pytorch_checkpoint(path: str | Path, **kwargs) -> tuple[DALLE, dict]:
    """Read a ``{"hparams", "vae_params", "weights"}`` .pt (``weights_only=True``) into a
    kodalle model; returns (model, the checkpoint's vae_params or {})."""
    from kodalle_cli.weights import load_strict, read_torch_file

    path = Path(path)
    ckpt = read_torch_file(path, "DALLE checkpoint")  # refuses pickled code, runs nothing
    if not isinstance(ckpt, dict) or "weights" not in ckpt:
        raise KodalleError(f"{path} is not a DALLE-pytorch checkpoint (no 'weights')")
    weights, hparams = ckpt["weights"], ckpt.get("hparams")
    if not isinstance(weights, dict) or not all(
            isinstance(v, torch.Tensor) for v in weights.values()):
        raise KodalleError(f"{path}: 'weights' is not a state_dict of tensors")
    if hparams is not None and not isinstance(hparams, dict):
        raise KodalleError(f"{path}: 'hparams' is not a dict")
    try:
        cfg, sd = from_dalle_pytorch(weights, hparams, **kwargs)
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as exc:
        # a weight the layout needs is missing, or shapes that do not fit together
        what = f"no {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise KodalleError(
            f"{path} is not a complete DALLE-pytorch checkpoint ({what.splitlines()[0]})"
        ) from None
    try:
        model = DALLE(cfg)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise KodalleError(f"{path}: its hparams make no model ({exc})") from None
    load_strict(model, sd, str(path), f"the model its weights describe ({cfg.depth} layers, "
                f"dim {cfg.dim})")
    vae_params = ckpt.get("vae_params")
    return model, dict(vae_params) if isinstance(vae_params, dict) else {}


def save_dalle_pytorch_checkpoint(model: DALLE, path: str | Path,
                                  vae_params: dict | None = None) -> None:
    """Write a kodalle model as a DALLE-pytorch / KoDALLE ``.pt`` (temp name, then rename)."""
    from kodalle_cli.atomic import replacing

    sd, hparams = to_dalle_pytorch(model)
    hparams["attn_types"] = list(hparams["attn_types"])
    with replacing(path) as tmp:
        torch.save({"hparams": hparams, "vae_params": vae_params, "weights": sd}, tmp)
