"""What ``kodalle sample`` writes, and how: one folder per caption.

::

    OUT/<caption-slug>/0000.png ...   the images (best first when reranked)
    OUT/<caption-slug>/grid.png       all of them in a near-square grid
    OUT/<caption-slug>/codes.npy      int32 [n, image_seq_len] VQGAN codes, in image order
    OUT/<caption-slug>/metadata.json  caption, token ids, seed, settings, checkpoint, scores
    OUT/<caption-slug>/prompt.png     with --init-image: the image prompt (at the VQGAN's
                                      size); metadata.json's ``init_image`` says which code
                                      rows were kept, and the grid shows it on the left

Each folder is written under a temporary name and renamed when complete, so an interrupted
call leaves nothing half-written. Also here: slugs (folder names from captions), tensors to
PIL images, and each caption's metadata.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kodalle_cli.atomic import jsonable, replacing, write_json_atomic
from kodalle_cli.text import normalize

SLUG_MAX_CHARS = 60
SLUG_MAX_BYTES = 200  # file systems allow 255 bytes a name; room for "-N" and temp names
# names Windows reserves whatever their extension (a folder copied there must still open)
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
             *(f"lpt{i}" for i in range(10))}


@dataclass
class CaptionResult:
    """One caption's images (best first when reranked) and what produced them."""

    caption: str
    images: list[Image.Image]
    metadata: dict
    directory: Path | None = None
    codes: torch.Tensor | None = None  # [n, image_seq_len]
    prompt: Image.Image | None = None  # --init-image: the prompt as the VQGAN saw it


# ---- folder names ----------------------------------------------------------------------------
def slugify(caption: str, max_chars: int = SLUG_MAX_CHARS) -> str:
    """A directory name for a caption: letters (Hangul included) and digits, ``-`` between.

    Anything else (spaces, punctuation, path separators, control characters, emoji,
    combining marks, bidi controls) becomes ``-``; the name is at most ``max_chars``
    characters and :data:`SLUG_MAX_BYTES` UTF-8 bytes, whatever the caption's length, and
    never a name Windows reserves. Nothing left: ``caption``. The caption itself is kept
    whole in ``metadata.json``.

    >>> slugify("하의에서 색상은 블루이다. 카테고리는 스커트이다.")
    '하의에서-색상은-블루이다-카테고리는-스커트이다'
    """
    text = normalize(caption).lower()  # a folder name is NFC whatever it was given
    slug = re.sub(r"[^\w]+|_+", "-", text, flags=re.UNICODE).strip("-")
    slug = slug[:max_chars].rstrip("-")
    while len(slug.encode("utf-8", "replace")) > SLUG_MAX_BYTES:
        slug = slug[:-1].rstrip("-")
    if slug in _RESERVED:
        slug += "-caption"
    return slug or "caption"


def printable(text: str, limit: int | None = 60) -> str:
    """``text`` safe to show on a terminal, on one line: control and format characters
    (escape sequences, newlines, bidi overrides) appear as ``\\x1b``-style escapes, and it
    is cut to ``limit`` characters (``…`` after). For messages; files keep the text."""
    cut = text if limit is None or len(text) <= limit else text[:limit] + "…"
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(c)[0] == "C" else c for c in cut)


def unique_slugs(captions: Sequence[str], out: Path | None) -> list[str]:
    """One slug per caption, unique within the call and not naming a non-empty directory."""
    taken: set[str] = set()
    result = []
    for caption in captions:
        base = slugify(caption)
        slug, i = base, 1
        while slug in taken or (out is not None and _nonempty(out / slug)):
            i += 1
            slug = f"{base}-{i}"
        taken.add(slug)
        result.append(slug)
    return result


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


# ---- images ----------------------------------------------------------------------------------
def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [0, 1] -> PIL RGB images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def make_grid(images: Sequence[Image.Image], columns: int | None = None, pad: int = 2):
    """The images in a near-square grid (white gaps of ``pad`` pixels)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w + (columns + 1) * pad, rows * h + (rows + 1) * pad),
                     "white")
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(img, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def prompt_tile(prompt: Image.Image, kept_tokens: int, fmap_size: int) -> Image.Image:
    """The image prompt as the grid shows it: the kept code rows as they are, the rest
    faded (what was drawn anew), a red line where drawing started."""
    from PIL import ImageDraw

    w, h = prompt.size
    rows, partial = divmod(kept_tokens, fmap_size)
    cell_w, cell_h = w / fmap_size, h / fmap_size
    faded = Image.blend(prompt.convert("RGB"), Image.new("RGB", prompt.size, "white"), 0.75)
    keep = Image.new("L", prompt.size, 0)
    draw = ImageDraw.Draw(keep)
    draw.rectangle((0, 0, w, round(rows * cell_h) - 1), fill=255)
    if partial:  # --init-tokens that end inside a row
        draw.rectangle((0, round(rows * cell_h), round(partial * cell_w) - 1,
                        round((rows + 1) * cell_h) - 1), fill=255)
    tile = Image.composite(prompt.convert("RGB"), faded, keep)
    line = ImageDraw.Draw(tile)
    y = round((rows + (1 if partial else 0)) * cell_h)
    line.line((0, min(y, h - 1), w, min(y, h - 1)), fill=(220, 30, 35), width=1)
    return tile


def beside(left: Image.Image, right: Image.Image, pad: int = 2) -> Image.Image:
    """``left`` (top-aligned) and ``right`` side by side on white, ``pad`` pixels apart."""
    grid = Image.new("RGB", (left.width + right.width + pad, max(left.height, right.height)),
                     "white")
    grid.paste(left, (0, 0))
    grid.paste(right, (left.width + pad, 0))
    return grid


# ---- metadata.json ---------------------------------------------------------------------------
def caption_metadata(encoded, caption_index: int, text_seq_len: int, seed: int,
                     settings: dict, checkpoint: str, run_info: dict, seconds: float,
                     order: Sequence[int], scores: list[float] | None,
                     logprobs: Sequence[float] | None = None, ranked_by: str | None = None,
                     init_image: dict | None = None) -> dict:
    """metadata.json of one caption. ``encoded``: its
    :class:`~kodalle_cli.text.EncodedCaption`; ``settings``: how the call sampled;
    ``order``: image indices as written (best first when reranked); ``scores``: every
    image's rerank score in generation order (None without a reranker); ``logprobs``:
    every image's mean code log-probability under the model (generation order);
    ``ranked_by``: "rerank" or "perplexity" when ``order`` is best first; ``init_image``:
    the image prompt (source, kept rows and codes)."""
    ranked = ranked_by is not None
    return {
        "caption": encoded.caption,
        "caption_index": caption_index,
        "token_ids": encoded.ids[: encoded.num_tokens],
        "text_seq_len": text_seq_len,
        "num_tokens": encoded.num_tokens,
        "truncated_tokens": encoded.truncated,
        "unknown_tokens": encoded.unknown_tokens,
        "warnings": encoded.warnings,
        "seed": seed,
        "settings": settings,
        "checkpoint": checkpoint,
        "run": jsonable(run_info),
        "seconds_all_captions": round(seconds, 3),
        "images": [
            {"file": f"{rank:04d}.png", "image_index": i,
             **({"rerank_score": scores[i]} if scores is not None else {}),
             **({"mean_logprob": logprobs[i]} if logprobs is not None else {}),
             **({"rank": rank} if ranked or scores is not None else {})}
            for rank, i in enumerate(order)
        ],
        **({"rerank_scores": scores} if scores is not None else {}),
        **({"mean_logprobs": list(logprobs)} if logprobs is not None else {}),
        **({"ranked_by": ranked_by} if ranked else {}),
        **({"init_image": init_image} if init_image is not None else {}),
    }


# ---- the caption folder ----------------------------------------------------------------------
def write_caption_dir(directory: Path, result: CaptionResult) -> Path:
    """Write images, grid, codes and metadata under a temporary name, then rename."""
    with replacing(directory, directory=True) as tmp:
        for img, info in zip(result.images, result.metadata["images"], strict=True):
            img.save(tmp / info["file"])
        grid = make_grid(result.images)
        init = result.metadata.get("init_image")
        if result.prompt is not None and init:
            result.prompt.save(tmp / init.get("file", "prompt.png"))
            tile = prompt_tile(result.prompt, init["kept_tokens"], init["fmap_size"])
            if tile.size != result.images[0].size:
                tile = tile.resize(result.images[0].size)
            grid = beside(make_grid([tile]), grid)
        grid.save(tmp / "grid.png")
        if result.codes is not None:
            np.save(tmp / "codes.npy", result.codes.cpu().numpy().astype(np.int32))
        write_json_atomic(tmp / "metadata.json", result.metadata)
        if directory.exists():  # empty (unique_slugs skips non-empty ones)
            directory.rmdir()
    return directory
