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

from kodalle_cli.errors import ConfigError


@dataclass
class SamplingSettings:
    """How tokens are drawn. ``top_k``: count (>= 1) or filter_thres-like fraction in [0, 1)."""

    top_k: float | None = 0.9
    top_p: float | None = None
    temperature: float = 1.0
    cond_scale: float = 1.0

    def validate(self) -> SamplingSettings:
        """Itself, or :class:`~kodalle_cli.errors.ConfigError` naming the setting (the CLI
        words it as the flag: ``--top-k -1.0: ...``, exit status 2)."""
        top_k, top_p = self.top_k, self.top_p
        if top_k is not None and (not math.isfinite(top_k) or top_k < 0
                                  or (top_k >= 1 and top_k != int(top_k))):
            raise ConfigError(
                "top_k", top_k, "give a count (an integer >= 1) or a fraction in [0, 1) like "
                "dalle-pytorch's filter_thres (0.9 keeps the top 10%)")
        if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise ConfigError("top_p", top_p, "must be in (0, 1]: the share of probability "
                              "kept (1 keeps every token)")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError("temperature", self.temperature, "must be >= 0 (0: greedy)")
        if not math.isfinite(self.cond_scale) or self.cond_scale < 0:
            raise ConfigError("cond_scale", self.cond_scale,
                              "must be >= 0 (1: no guidance, 3: typical)")
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
    init_codes: torch.Tensor | None = None,
    return_logprobs: bool = False,
):
    """Image codes ``[B, image_seq_len]`` for caption ids ``text [B, text_seq_len]``.

    ``model`` is :class:`kodalle_cli.model.dalle.DALLE`. ``uniforms [B, image_seq_len]``: each
    row's random numbers (:func:`row_uniforms`; unused when greedy). ``fraction_base``: what a
    top-k fraction counts (default: text + image logits, as dalle-pytorch does).
    ``use_cache=False`` recomputes the whole sequence at every step: the slow reference the
    tests compare the cached path with. ``progress(n)`` is called with the tokens just done.

    ``init_codes [B or 1, K]``: an image prompt; the first ``K`` codes are these (kept as they
    are, primed into the cache in one pass) and only the rest is drawn, from the same
    per-position uniforms. ``return_logprobs``: also return each row's mean log-probability
    ``[B]`` (float32) of the codes it drew, under the model's own conditional distribution
    (the caption's rows, before guidance, temperature and filters): ru-dalle's perplexity
    ranking, free since those logits are computed anyway. Kept codes do not count.
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
    kept = 0
    if init_codes is not None:
        kept = init_codes.shape[-1]
        if not 0 <= kept < steps:
            raise ValueError(f"init_codes has {kept} codes; keep fewer than {steps}")
        codes[:, :kept] = init_codes.to(text.device, torch.long).expand(batch, kept)
    logprob_sum = torch.zeros(batch, dtype=torch.float32, device=text.device)

    if use_cache:
        cache = model.new_cache(rows.shape[0], device=text.device)
        prompt = codes[:, :kept].repeat(2, 1) if guided else codes[:, :kept]
        logits = model.prefill(rows, cache, prompt if kept else None)
        if progress is not None and kept:
            progress(batch * kept)
    for i in range(kept, steps):
        if not use_cache:
            image = codes[:, :i].repeat(2, 1) if guided else codes[:, :i]
            logits = model(rows, image)[:, -1, cfg.text_head_rows :]
        logits = logits.float()
        code = draw(filter_logits(_guided(logits, batch, settings.cond_scale), settings,
                                  fraction_base), uniforms[:, i], greedy)
        codes[:, i] = code
        if return_logprobs:
            own = logits[:batch].log_softmax(dim=-1)
            logprob_sum += own.gather(-1, code[:, None]).squeeze(-1)
        if use_cache and i + 1 < steps:
            logits = model.step(code.repeat(2) if guided else code, cache)
        if progress is not None:
            progress(batch)
    if return_logprobs:
        return codes, logprob_sum / (steps - kept)
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
    init_codes: torch.Tensor | None = None,
    return_logprobs: bool = False,
):
    """Codes ``[len(rows), image_seq_len]``; row ``r`` draws from ``(seed, caption, image)``.

    ``texts [num_captions, text_seq_len]``. Rows of different captions share batches.
    ``on_batch(rows, codes)`` after each batch (decode there); ``on_tokens(n)`` every step.
    ``init_codes [1, K]``: every row starts with these codes (an image prompt);
    ``return_logprobs``: also each row's mean log-probability ``[len(rows)]`` (see
    :func:`generate_codes`).
    """
    steps = model.image_seq_len
    out, logprobs = [], []
    for chunk in batches(list(rows), batch_size):
        text = texts[[r.caption_index for r in chunk]].to(device)
        uniforms = torch.stack([row_uniforms(seed, r.caption_index, r.image_index, steps)
                                for r in chunk])
        codes = generate_codes(model, text, uniforms, settings, progress=on_tokens,
                               init_codes=init_codes, return_logprobs=return_logprobs)
        if return_logprobs:
            codes, mean = codes
            logprobs.append(mean.cpu())
        if on_batch is not None:
            on_batch(chunk, codes)
        out.append(codes.cpu())
    codes = torch.cat(out) if out else torch.empty(0, steps, dtype=torch.long)
    if return_logprobs:
        return codes, torch.cat(logprobs) if logprobs else torch.empty(0)
    return codes
