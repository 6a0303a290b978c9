"""The reranker ("KoCLIP"): a CLIP-style dual encoder that scores how well an image fits a caption.

- Image tower: timm's EfficientNet-B0 (pretrained weights when a local file or the cache has
  them, else random), globally pooled.
- Text tower: the backbone's FULL language model (``AutoModel`` from the backbone's source),
  mean-pooled over the caption's tokens.
- Both are projected to a shared space and L2-normalised; a learnable temperature scales the
  cosine similarities; the loss is CLIP's symmetric InfoNCE.

Image preprocessing (fit to a square, scale to [0, 1], ImageNet mean/std) lives in
:func:`preprocess_images`, the one place both training and ranking go through; captions go
through :attr:`Reranker.caption_encoder` (:class:`kodalle_cli.text.CaptionEncoder`, the
encoder DALLE training and sampling use too).

A reranker directory (what ``kodalle train reranker`` writes and :func:`load_reranker`
reads) is self-contained::

    config.json            RerankerConfig (image size, backbone name + source, projection dim)
    text/                  the text tower and its tokenizer (``save_pretrained``)
    model.safetensors      everything else: image tower, projections, temperature
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kodalle_cli.atomic import replacing, write_json_atomic
from kodalle_cli.errors import KodalleError
from kodalle_cli.text import CaptionEncoder

IMAGE_MODEL = "efficientnet_b0"
# timm's default EfficientNet-B0 weights: where a cache may already hold them
TIMM_HUB_ID = "timm/efficientnet_b0.ra_in1k"
TIMM_LEGACY_FILE = "efficientnet_b0_ra-3dd342df.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_DIR = "text"
KIND = "kodalle-reranker"


@dataclass
class RerankerConfig:
    backbone: str  # backbone name as given to --backbone
    backbone_source: str  # where the text tower came from (hub id@revision or directory)
    image_size: int = 224
    embed_dim: int = 256
    text_seq_len: int = 64
    resize: str = "pad"  # how images are brought to image_size (kodalle_cli.data.images.fit)
    image_model: str = IMAGE_MODEL
    image_init: str = "random"  # where the image tower's initial weights came from
    init_temperature: float = 0.07
    kind: str = KIND

    @classmethod
    def from_dict(cls, data: dict) -> RerankerConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---- preprocessing: the one place --------------------------------------------------------------
def preprocess_images(images, size: int, resize: str = "pad") -> torch.Tensor:
    """PIL images or paths -> normalised float tensor ``[B, 3, size, size]`` for the image tower."""
    from kodalle_cli.data.images import to_tensor

    pixels = to_tensor(images, size=size, resize=resize)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


# ---- the towers -----------------------------------------------------------------------------------
def find_image_weights(explicit: str | Path | None = None) -> Path | None:
    """EfficientNet-B0 weights already on this machine: ``explicit``, else timm's HF-hub cache,
    else torch hub's cache of timm's legacy URL; None when there are none (never downloads)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise KodalleError(f"image tower weights {path} do not exist")
        return path
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(TIMM_HUB_ID, filename)
        if isinstance(hit, str):
            return Path(hit)
    legacy = Path(torch.hub.get_dir()) / "checkpoints" / TIMM_LEGACY_FILE
    return legacy if legacy.is_file() else None


def build_image_tower(weights: Path | None = None) -> nn.Module:
    """EfficientNet-B0 without its classifier (outputs pooled features), from ``weights`` or
    random. timm reads ``.pth`` files with ``weights_only=True``."""
    import timm

    if weights is None:
        return timm.create_model(IMAGE_MODEL, pretrained=False, num_classes=0)
    return timm.create_model(
        IMAGE_MODEL, pretrained=True, num_classes=0,
        pretrained_cfg_overlay=dict(file=str(weights)),
    )


def contrastive_loss(logits: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE. Domain captions repeat (K-Fashion's are built from labels),
    so with ``same`` the target of each row is spread evenly over every pair whose caption
    text is equal, instead of pushing identical captions apart; without it, plain CLIP."""
    if same is None:
        target = torch.arange(len(logits), device=logits.device)
    else:
        target = same.to(logits.dtype)
        target = target / target.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class Reranker(nn.Module):
    """Dual encoder. ``score``/``rank`` take PIL images and caption strings."""

    def __init__(self, config: RerankerConfig, text_model: nn.Module, image_model: nn.Module,
                 tokenizer=None):
        super().__init__()
        self.config = config
        self.text = text_model
        self.image = image_model
        self.tokenizer = tokenizer
        self.text_proj = nn.Linear(text_model.config.hidden_size, config.embed_dim, bias=False)
        self.image_proj = nn.Linear(image_model.num_features, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def caption_encoder(self) -> CaptionEncoder:
        """Captions -> the text tower's ids and mask (cut to ``config.text_seq_len``): the
        one caption encoder (:mod:`kodalle_cli.text`) with this tower's tokenizer."""
        return CaptionEncoder.for_tokenizer(self.tokenizer, self.config.text_seq_len)

    # ---- embeddings -----------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image(pixels)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, pixels, input_ids, attention_mask, same=None):
        """Symmetric InfoNCE over the batch (image i belongs to caption i): (loss, logits).
        ``same`` ([B, B] bool: captions i and j are equal) makes equal captions positives."""
        img = self.encode_image(pixels)
        txt = self.encode_text(input_ids, attention_mask)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = scale * img @ txt.t()  # [images, captions]
        return contrastive_loss(logits.float(), same), logits

    # ---- scoring PIL images against captions ----------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images, batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            pixels = preprocess_images(
                images[i:i + batch_size], self.config.image_size, self.config.resize
            )
            out.append(self.encode_image(pixels.to(self.device)).float())
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    @torch.no_grad()
    def embed_captions(self, captions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(captions), batch_size):
            enc = self.caption_encoder.encode_with_mask(captions[i:i + batch_size])
            out.append(self.encode_text(**{k: v.to(self.device) for k, v in enc.items()}).float())
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    @torch.no_grad()
    def score(self, images, captions: Sequence[str]) -> torch.Tensor:
        """Cosine similarity ``[len(images), len(captions)]`` (CPU float32)."""
        was_training = self.training
        self.eval()
        try:
            return (self.embed_images(list(images)) @ self.embed_captions(list(captions)).t()).cpu()
        finally:
            self.train(was_training)

    def rank(self, images, caption: str, top: int | None = None) -> list[tuple[int, float]]:
        """``(image index, similarity)`` best first; only the best ``top`` when given."""
        sims = self.score(images, [caption])[:, 0]
        order = torch.argsort(sims, descending=True, stable=True).tolist()
        return [(i, float(sims[i])) for i in order[:top]]


def max_text_len(config) -> int:
    """Longest caption (in tokens) the text model takes; RoBERTa-style position tables start
    after the padding index, so they lose ``pad_token_id + 1`` positions."""
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if n is None:
        return 10**6
    if "roberta" in getattr(config, "model_type", "") or config.model_type == "camembert":
        n -= (config.pad_token_id or 0) + 1
    return int(n)


def build_reranker(
    backbone, image_size: int = 224, embed_dim: int = 256, text_seq_len: int = 64,
    image_weights: str | Path | None = None,
) -> Reranker:
    """A fresh reranker: the backbone's language model + EfficientNet-B0 (local weights or
    random) + new projections."""
    text_model, tokenizer = backbone.load_model(), backbone.load_tokenizer()
    weights = find_image_weights(image_weights)
    text_seq_len = min(text_seq_len, max_text_len(text_model.config))
    config = RerankerConfig(
        backbone=backbone.name, backbone_source=backbone.location, image_size=image_size,
        embed_dim=embed_dim, text_seq_len=text_seq_len,
        image_init=str(weights) if weights is not None else "random",
    )
    return Reranker(config, text_model, build_image_tower(weights), tokenizer)


# ---- the reranker directory ---------------------------------------------------------------------
def save_reranker(model: Reranker, out: str | Path) -> Path:
    """Write config.json, text/ (model + tokenizer) and model.safetensors; each file is written
    under a temporary name and moved into place, so a killed save leaves the old one whole."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / TEXT_DIR, directory=True) as text_tmp:
        model.text.save_pretrained(text_tmp, safe_serialization=True)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(text_tmp)
    rest = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
        if not k.startswith("text.")
    }
    with replacing(out / WEIGHTS_NAME) as tmp:
        save_file(rest, str(tmp), metadata={"format": "pt", "kind": KIND})
    write_json_atomic(out / CONFIG_NAME, asdict(model.config))
    return out


def is_reranker_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file() and (Path(path) / WEIGHTS_NAME).is_file()


def load_reranker(path: str | Path, device: str | torch.device = "cpu") -> Reranker:
    """Load a reranker directory (written by ``kodalle train reranker``), in eval mode."""
    from transformers import AutoTokenizer

    from kodalle_cli.backbone import load_language_model
    from kodalle_cli.weights import load_strict, read_safetensors

    path = Path(path).expanduser()
    if not is_reranker_dir(path) or not (path / TEXT_DIR).is_dir():
        raise KodalleError(
            f"{path} is not a reranker directory (needs {CONFIG_NAME}, {TEXT_DIR}/ and "
            f"{WEIGHTS_NAME}; make one with `kodalle train reranker`)"
        )
    try:
        data = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise KodalleError(f"cannot read {path / CONFIG_NAME}: damaged ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise KodalleError(f"{path / CONFIG_NAME} is not a kodalle reranker config")
    try:
        config = RerankerConfig.from_dict(data)
        text_model, info = load_language_model(str(path / TEXT_DIR), output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path / TEXT_DIR)
        model = Reranker(config, text_model, build_image_tower(None), tokenizer)
    except Exception as exc:  # noqa: BLE001 - damaged text/ files: OSError, JSON, Rust errors
        detail = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise KodalleError(f"cannot load the reranker in {path}: damaged ({detail})") from None
    for kind in ("missing_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or ()))
        if keys:  # transformers would fill these with random weights: refuse instead
            raise KodalleError(
                f"{path / TEXT_DIR} does not match its config: {len(keys)} "
                f"{kind.replace('_', ' ')} (e.g. {keys[0]})"
            )
    rest = read_safetensors(path / WEIGHTS_NAME, "reranker weights")
    # the text tower came with its own files; the rest must fit the config exactly
    full = {**{f"text.{k}": v for k, v in model.text.state_dict().items()}, **rest}
    load_strict(model, full, str(path / WEIGHTS_NAME), f"the reranker in {path / CONFIG_NAME}")
    return model.to(device).eval()
