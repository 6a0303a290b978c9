"""Image loading and preprocessing: the one place every part of kodalle opens an image.

- :func:`open_image` opens a path or bytes, enforces the decompression-bomb limit, applies
  the EXIF orientation, optionally decodes a large JPEG at reduced size (PIL ``draft``), and
  converts every mode (L, P, LA, RGBA, CMYK, 16-bit) to RGB with alpha flattened on white.
- :func:`crop_box` / :func:`fit` crop to a box (plus margin) and bring an image to a square
  size (``pad`` with a white border, ``center-crop`` or ``stretch``).
- :func:`preprocess` does all of it for one file; :func:`encode_jpeg` writes the shard JPEG.
- :func:`to_tensor` turns PIL images into a float tensor ``[B, 3, S, S]`` in [0, 1] for the
  VQGAN, reranker and scorer.
- :func:`rgb_array` turns a PIL image, array or tensor into float RGB pixels in [0, 255] for
  the pixel checkers (:mod:`~kodalle_cli.data.synthetic`).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("pad", "center-crop", "stretch")
WHITE = (255, 255, 255)
JPEG_QUALITY = 95
# Decompression-bomb limit: images with more pixels are refused (PIL's default, ~89 MP).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels


class ImageError(ValueError):
    """The file is not an image kodalle can use (the message is the skip reason)."""


def to_rgb(im: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode -> RGB; transparency is flattened on ``background``; 16-bit scaled to 8."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.int64)
        # 16-bit data (the usual source of mode I) is rescaled; never wrap, always clip
        arr = np.clip(arr >> 8 if arr.max(initial=0) > 255 else arr, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        flat = Image.new("RGB", im.size, background)
        flat.paste(im, mask=im.getchannel("A"))
        return flat
    return im.convert("RGB")


def open_image(
    source: str | Path | bytes,
    *,
    min_size: tuple[int, int] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> tuple[Image.Image, tuple[int, int], float]:
    """Open and decode an image as RGB with its EXIF orientation applied.

    ``min_size``: when given (in oriented pixels), a JPEG may be decoded at 1/2, 1/4 or 1/8
    scale as long as the result is still at least that large. Returns ``(image,
    original_size, scale)`` where ``original_size`` is the oriented size of the file and
    ``scale`` the factor the decoded image was reduced by (image.size ~ original_size * scale).
    Raises :class:`ImageError` for anything unreadable.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if isinstance(source, bytes) else source
            im = Image.open(fp)
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageError("image has no pixels")
            if w * h > max_pixels:
                raise ImageError(f"decompression bomb: {w}x{h} exceeds {max_pixels} pixels")
            orientation = im.getexif().get(0x0112, 1)
            transposed = orientation in (5, 6, 7, 8)
            original = (h, w) if transposed else (w, h)
            if min_size and im.format == "JPEG":
                need_w, need_h = (min_size[1], min_size[0]) if transposed else min_size
                im.draft(None, (max(1, need_w), max(1, need_h)))
            im.load()
            scale = im.size[0] / w
            im = ImageOps.exif_transpose(im)
            return to_rgb(im), original, scale
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        # strerror, not str(exc): no absolute paths in the reasons (they go to the manifest)
        msg = getattr(exc, "strerror", None) or (str(exc).splitlines() or [""])[0]
        msg = msg or type(exc).__name__
        raise ImageError(f"unreadable image: {msg}") from None


def crop_box(
    boxes: Sequence[Box], image_size: tuple[int, int], margin: float = 0.05
) -> tuple[int, int, int, int]:
    """The union of ``boxes`` grown by ``margin`` (a fraction of the union's size on each side),
    clamped to the image and rounded to whole pixels. Raises ImageError when degenerate."""
    if not boxes:
        raise ImageError("no rectangles to crop to")
    left = min(b[0] for b in boxes)
    top = min(b[1] for b in boxes)
    right = max(b[2] for b in boxes)
    bottom = max(b[3] for b in boxes)
    if not all(math.isfinite(v) for v in (left, top, right, bottom)):
        raise ImageError("degenerate crop box: not finite")
    dx, dy = (right - left) * margin, (bottom - top) * margin
    w, h = image_size
    box = (
        max(0, math.floor(left - dx)),
        max(0, math.floor(top - dy)),
        min(w, math.ceil(right + dx)),
        min(h, math.ceil(bottom + dy)),
    )
    if box[2] - box[0] < 2 or box[3] - box[1] < 2:
        raise ImageError(f"degenerate crop box {list(box)} in a {w}x{h} image")
    return box


def fit(im: Image.Image, size: int, mode: str = "pad") -> Image.Image:
    """Bring ``im`` to ``size`` x ``size``: ``pad`` (aspect kept, white border),
    ``center-crop`` (aspect kept, cropped) or ``stretch``."""
    resample = Image.Resampling.LANCZOS
    if mode == "stretch":
        return im.resize((size, size), resample, reducing_gap=3.0)
    if mode == "center-crop":
        return ImageOps.fit(im, (size, size), resample)
    if mode != "pad":
        raise ValueError(f"unknown resize mode {mode!r} (choose {', '.join(RESIZE_MODES)})")
    w, h = im.size
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    resized = im.resize((nw, nh), resample, reducing_gap=3.0) if (nw, nh) != im.size else im
    if (nw, nh) == (size, size):
        return resized
    canvas = Image.new("RGB", (size, size), WHITE)
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def _rescale(
    boxes: Sequence[Box], space: tuple[int, int] | None, size: tuple[int, int]
) -> list[Box]:
    if not space or tuple(space) == tuple(size) or min(space) <= 0:
        return list(boxes)
    sx, sy = size[0] / space[0], size[1] / space[1]
    return [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in boxes]


@dataclass
class Prepared:
    image: Image.Image  # RGB, size x size
    original_size: tuple[int, int]  # oriented size of the source file
    crop: tuple[int, int, int, int] | None  # crop box in original pixels, or None


def preprocess(
    source: str | Path | bytes,
    size: int,
    *,
    resize: str = "pad",
    boxes: Sequence[Box] | None = None,
    box_space: tuple[int, int] | None = None,
    margin: float = 0.05,
    max_pixels: int = MAX_PIXELS,
    fast_decode: bool = True,
) -> Prepared:
    """Open, orient, convert, crop (to the union of ``boxes`` + margin, when given) and fit
    one image. ``boxes`` are in original pixels, or in a ``box_space`` (w, h) of their own
    (a label's declared image size), rescaled to the file's. Large JPEGs are decoded at
    reduced size when the output still gets at least ``size`` pixels along the side that
    decides the scale."""
    min_size = None
    if fast_decode:
        try:  # peek at the header to work out how small the decode may be
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as head:
                if head.format == "JPEG":
                    w, h = head.size
                    if head.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                        w, h = h, w
                    cw, ch = w, h
                    if boxes:
                        x0, y0, x1, y1 = crop_box(_rescale(boxes, box_space, (w, h)), (w, h), margin)
                        cw, ch = x1 - x0, y1 - y0
                    side = max(cw, ch) if resize == "pad" else min(cw, ch)
                    factor = size / max(1, side)
                    min_size = (math.ceil(w * factor), math.ceil(h * factor))
        except Exception:  # noqa: BLE001 - the full open below reports the real problem
            min_size = None
    im, original, scale = open_image(source, min_size=min_size, max_pixels=max_pixels)
    box = None
    if boxes:
        box = crop_box(_rescale(boxes, box_space, original), original, margin)
        if scale != 1.0:
            sx, sy = im.size[0] / original[0], im.size[1] / original[1]
            scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            im = im.crop(tuple(round(v) for v in scaled))
        else:
            im = im.crop(box)
    return Prepared(fit(im, size, resize), original, box)


def encode_jpeg(im: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def to_tensor(images, size: int | None = None, resize: str = "pad"):
    """PIL images (or one image, or paths) -> float tensor ``[B, 3, size, size]`` in [0, 1].

    Every image goes through :func:`to_rgb`, and through :func:`fit` when ``size`` is given
    (then they may differ in size); without ``size`` all must already share one size.
    """
    import torch

    if isinstance(images, Image.Image | str | Path):
        images = [images]
    arrays = []
    for im in images:
        if not isinstance(im, Image.Image):
            im = open_image(im)[0]
        im = to_rgb(im)
        if size is not None and im.size != (size, size):
            im = fit(im, size, resize)
        arrays.append(np.asarray(im, dtype=np.uint8))
    if not arrays:
        raise ValueError("to_tensor needs at least one image")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.float().div_(255.0).contiguous()


def rgb_array(image) -> np.ndarray:
    """Pixels as float32 ``[H, W, 3]`` in [0, 255], from a PIL image, an HWC array or a CHW
    tensor/array in [0, 1] or [0, 255] (what the pixel checkers read)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:  # CHW tensor
        arr = arr.transpose(1, 2, 0)
    if arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return arr
