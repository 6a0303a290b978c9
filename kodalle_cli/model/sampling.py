"""Sampling image codes from the DALLE transformer: filters, seeded draws, the decoding loop,
and many captions' images generated in shared batches (:func:`generate_rows`).

The loop (:func:`generate_codes`) encodes the text prefix once per batch into a preallocated
key/value cache and then steps one image token at a time. Classifier-free guidance puts the
conditional and the unconditional rows in the same batch, so one forward serves both.

Reproducibility that does not depend on the batch size: every image row owns its random
numbers. :func:`row_uniforms` draws one uniform number per image token from a CPU
``torch.Generator`` seeded by ``(seed, caption index, image index)``, and
:func:`draw` turns a row's filtered distribution and its uniform number into a token by
inverse-CDF sampling. Which rows share a batch (``--batch-size``) therefore changes nothing,
and the same seed gives the same codes on any device, up to the arithmetic of the model.

Filters follow dalle-pytorch 1.6.6 and Hugging Face: logits / temperature, then top-k (a count
``K >= 1``, or a fraction like dalle-pytorch's ``filter_thres``: ``0.9`` keeps the top 10%),
then top-p (nucleus). Temperature 0 means greedy decoding.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from kodalle_cli.errors import UsageError


@dataclass
class SamplingSettings:
    """How tokens are drawn. ``top_k``: count (>= 1) or filter_thres-like fraction in [0, 1)."""

    top_k: float | None = 0.9
    top_p: float | None = None
    temperature: float = 1.0
    cond_scale: float = 1.0

    def validate(self) -> SamplingSettings:
        if self.top_k is not None:
            if self.top_k < 0 or (self.top_k >= 1 and self.top_k != int(self.top_k)):
                raise UsageError(
                    f"--top-k {self.top_k}: give a count (an integer >= 1) or a fraction in "
                    "[0, 1) like dalle-pytorch's filter_thres (0.9 keeps the top 10%)"
                )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise UsageError(f"--temperature {self.temperature}: must be >= 0 (0: greedy)")
        if self.cond_scale < 0 or not math.isfinite(self.cond_scale):
            raise UsageError(f"--cond-scale {self.cond_scale}: must be >= 0")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# ---- filters ---------------------------------------------------------------------------------
def top_k_count(top_k: float | None, num_logits: int) -> int | None:
    """How many tokens top-k keeps: ``K`` for a count, dalle-pytorch's rule for a fraction.

    A fraction ``f`` in [0, 1) is ``filter_thres``: ``max(int((1 - f) * num_logits), 1)``.
    dalle-pytorch counts *all* its logits (text and image tokens); pass that number as
    ``num_logits`` to get the same k it would use.
    """
    if top_k is None:
        return None
    if top_k >= 1:
        return min(int(top_k), num_logits)
    return max(int((1 - top_k) * num_logits), 1)


def filter_logits(logits: torch.Tensor, settings: SamplingSettings, fraction_base: int | None = None):
    """Temperature, top-k, top-p on ``logits [B, V]`` (float32); removed tokens become ``-inf``.

    ``fraction_base``: the vocabulary size a top-k fraction refers to (default ``V``).
    With temperature 0 the logits are only filtered (the caller takes the argmax).
    """
    logits = logits.float()
    if settings.temperature > 0:
        logits = logits / settings.temperature
    k = top_k_count(settings.top_k, fraction_base or logits.shape[-1])
    if k is not None and k < logits.shape[-1]:
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p is not None and settings.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= settings.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(filtered: torch.Tensor, uniforms: torch.Tensor, greedy: bool = False) -> torch.Tensor:
    """One token per row of ``filtered [B, V]`` from the row's uniform number ``uniforms [B]``.

    Inverse-CDF sampling: the first token whose cumulative probability exceeds ``u``. Tokens
    with probability 0 can never be chosen. ``greedy``: the argmax (uniforms unused).
    """
    if greedy:
        return filtered.argmax(dim=-1)
    probs = filtered.softmax(dim=-1, dtype=torch.float32)
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=filtered.shape[-1] - 1)


# ---- seeds -----------------------------------------------------------------------------------
def row_seed(seed: int, caption_index: int, image_index: int) -> int:
    """A 63-bit seed for one image row, a stable function of its three numbers."""
    digest = hashlib.sha256(f"kodalle:{seed}:{caption_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_uniforms(seed: int, caption_index: int, image_index: int, steps: int) -> torch.Tensor:
    """The uniform numbers ``[steps]`` one image row uses, independent of any batching."""
    generator = torch.Generator(device="cpu").manual_seed(row_seed(seed, caption_index, image_index))
    return torch.rand(steps, generator=generator, dtype=torch.float64)


def new_seed() -> int:
    """A fresh seed for a call without ``--seed`` (recorded, so the call can be repeated)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


# ---- the decoding loop -----------------------------------------------------------------------
ProgressFn = Callable[[int], None]


def _guided(logits: torch.Tensor, rows: int, cond_scale: float) -> torch.Tensor:
    if cond_scale == 1:
        return logits
    cond, null = logits[:rows], logits[rows:]
    return null + (cond - null) * cond_scale


@torch.no_grad()
def generate_codes(
    model,
    text: torch.Tensor,
    uniforms: torch.Tensor,
    settings: SamplingSettings,
    *,
    use_cache: bool = True,
    fraction_base: int | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Image codes ``[B, image_seq_len]`` for caption ids ``text [B, text_seq_len]``.

    ``model`` is :class:`kodalle_cli.model.dalle.DALLE`. ``uniforms [B, image_seq_len]``: each
    row's random numbers (:func:`row_uniforms`; unused when greedy). ``fraction_base``: what a
    top-k fraction counts (default: text + image logits, as dalle-pytorch does).
    ``use_cache=False`` recomputes the whole sequence at every step: the slow reference the
    tests compare the cached path with. ``progress(n)`` is called with the tokens just done.
    """
    batch, steps = text.shape[0], model.image_seq_len
    cfg = model.config
    if fraction_base is None:
        fraction_base = cfg.num_text_logits + cfg.num_image_tokens
    guided = settings.cond_scale != 1
    rows = torch.cat((text, model.null_text(batch, text.device))) if guided else text
    greedy = settings.temperature == 0
    codes = torch.zeros(batch, steps, dtype=torch.long, device=text.device)
    uniforms = uniforms.to(text.device)

    if use_cache:
        cache = model.new_cache(rows.shape[0], device=text.device)
        logits = model.prefill(rows, cache)
    for i in range(steps):
        if not use_cache:
            image = codes[:, :i].repeat(2, 1) if guided else codes[:, :i]
            logits = model(rows, image)[:, -1, cfg.num_text_logits :]
        logits = _guided(logits.float(), batch, settings.cond_scale)
        code = draw(filter_logits(logits, settings, fraction_base), uniforms[:, i], greedy)
        codes[:, i] = code
        if use_cache and i + 1 < steps:
            logits = model.step(code.repeat(2) if guided else code, cache)
        if progress is not None:
            progress(batch)
    return codes


def batches(items: Sequence, size: int):
    """Consecutive slices of ``items`` of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---- many captions, many images each ---------------------------------------------------------
@dataclass
class Row:
    """One image to make: which caption, which of its images."""

    caption_index: int
    image_index: int


def generate_rows(
    model,
    texts: torch.Tensor,
    rows: Sequence[Row],
    seed: int,
    settings: SamplingSettings,
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[list[Row], torch.Tensor], None] | None = None,
    on_tokens: ProgressFn | None = None,
) -> torch.Tensor:
    """Codes ``[len(rows), image_seq_len]``; row ``r`` draws from ``(seed, caption, image)``.

    ``texts [num_captions, text_seq_len]``. Rows of different captions share batches.
    ``on_batch(rows, codes)`` after each batch (decode there); ``on_tokens(n)`` every step.
    """
    steps = model.image_seq_len
    out = []
    for chunk in batches(list(rows), batch_size):
        text = texts[[r.caption_index for r in chunk]].to(device)
        uniforms = torch.stack([row_uniforms(seed, r.caption_index, r.image_index, steps)
                                for r in chunk])
        codes = generate_codes(model, text, uniforms, settings, progress=on_tokens)
        if on_batch is not None:
            on_batch(chunk, codes)
        out.append(codes.cpu())
    return torch.cat(out) if out else torch.empty(0, steps, dtype=torch.long)
