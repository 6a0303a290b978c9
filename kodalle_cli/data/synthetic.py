"""Seeded synthetic K-Fashion data: flat garments on white, with real-schema label JSONs.

Every image holds one garment, large and centred, drawn as a simple shape in one flat colour
named with a K-Fashion colour word, with an optional white print (스트라이프, 도트) and, for
tops, coats and dresses, a sleeve length. The label JSON has the real K-Fashion structure
(이미지 정보, 데이터셋 정보 > 데이터셋 상세설명 > 렉트좌표 / 폴리곤좌표 / 라벨링), so
``kodalle prepare`` reads it like the real thing.

Because the colour and the shape are the only content, both can be read back from pixels:
:func:`garment_colour` (nearest palette colour of the non-background pixels, by majority)
and :func:`garment_category` (best match of the garment's silhouette against the templates).
The demo uses them to measure whether generated images follow their captions.

    from kodalle_cli.data.synthetic import generate, garment_colour
    items = generate("data/synth", 500, size=64, holdout=[("레드", "스커트")])
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from kodalle_cli.data.images import rgb_array
from kodalle_cli.data.kfashion import CATEGORY, COLOUR, make_label

# Flat colours that are far from white and from each other (min RGB distance ~80).
COLOURS: dict[str, tuple[int, int, int]] = {
    "레드": (220, 30, 35),
    "블루": (35, 90, 225),
    "블랙": (20, 20, 20),
    "옐로우": (245, 205, 0),
    "그린": (30, 150, 55),
    "핑크": (250, 120, 190),
    "네이비": (20, 30, 110),
    "베이지": (210, 180, 130),
    "그레이": (128, 128, 128),
    "오렌지": (245, 130, 20),
    "퍼플": (135, 50, 175),
    "브라운": (115, 65, 25),
}
# category -> K-Fashion part
CATEGORIES: dict[str, str] = {
    "티셔츠": "상의",
    "블라우스": "상의",
    "스커트": "하의",
    "팬츠": "하의",
    "코트": "아우터",
    "드레스": "원피스",
}
PRINTS = ("무지", "스트라이프", "도트")
SLEEVES: dict[str, tuple[str, ...]] = {  # sleeve lengths each category is drawn with
    "티셔츠": ("반팔", "긴팔"),
    "블라우스": ("반팔", "7부소매", "긴팔"),
    "코트": ("긴팔",),
    "드레스": ("민소매", "반팔"),
}
LENGTHS: dict[str, tuple[str, ...]] = {  # 기장 of bottoms
    "스커트": ("미니", "미디", "발목"),
    "팬츠": ("발목",),
}
WHITE = (255, 255, 255)

Polygon = list[tuple[float, float]]


# ---- drawing ---------------------------------------------------------------------------------
def _sleeve(xs: float, ys: float, length: str) -> Polygon | None:
    """The left sleeve attached at the shoulder point (xs, ys), in unit coordinates."""
    if length == "민소매":
        return None
    reach = {"반팔": (0.14, 0.14, 0.20), "7부소매": (0.17, 0.36, 0.39),
             "긴팔": (0.19, 0.56, 0.58)}[length]
    dx, dy_out, dy_in = reach
    return [(xs, ys), (xs - dx, ys + dy_out), (xs - dx + 0.085, ys + dy_in), (xs, ys + 0.15)]


def _mirror(poly: Polygon) -> Polygon:
    return [(1.0 - x, y) for x, y in poly]


def garment_shapes(category: str, sleeve: str | None, length: str | None):
    """(filled polygons, cut-out polygons, cut-out ellipses) of a garment in unit coordinates."""
    fills: list[Polygon] = []
    cuts: list[Polygon] = []
    holes: list[tuple[float, float, float, float]] = []
    if category == "티셔츠":  # straight box body, round neck
        fills.append([(0.30, 0.20), (0.70, 0.20), (0.70, 0.80), (0.30, 0.80)])
        holes.append((0.42, 0.14, 0.58, 0.27))
        shoulder = (0.30, 0.20)
    elif category == "블라우스":  # flared peplum body, V neck
        fills.append([(0.34, 0.22), (0.66, 0.22), (0.78, 0.72), (0.22, 0.72)])
        cuts.append([(0.42, 0.22), (0.58, 0.22), (0.50, 0.38)])
        shoulder = (0.34, 0.22)
    elif category == "코트":  # long body, lapel V and a centre opening
        fills.append([(0.29, 0.08), (0.71, 0.08), (0.74, 0.94), (0.26, 0.94)])
        cuts.append([(0.43, 0.08), (0.57, 0.08), (0.50, 0.34)])
        cuts.append([(0.49, 0.34), (0.51, 0.34), (0.51, 0.94), (0.49, 0.94)])
        shoulder = (0.29, 0.08)
    elif category == "드레스":  # fitted bodice and a wide A-line skirt
        fills.append([(0.38, 0.10), (0.62, 0.10), (0.62, 0.44), (0.38, 0.44)])
        fills.append([(0.38, 0.44), (0.62, 0.44), (0.82, 0.92), (0.18, 0.92)])
        holes.append((0.44, 0.06, 0.56, 0.17))
        shoulder = (0.38, 0.10)
    elif category == "스커트":  # waistband and an A-line trapezoid
        hem = {"미니": 0.56, "미디": 0.74, "발목": 0.90}[length or "미디"]
        fills.append([(0.35, 0.16), (0.65, 0.16), (0.65, 0.22), (0.35, 0.22)])
        fills.append([(0.35, 0.22), (0.65, 0.22), (0.80, hem), (0.20, hem)])
        shoulder = None
    elif category == "팬츠":  # two legs below a waistband
        fills.append([(0.32, 0.08), (0.68, 0.08), (0.68, 0.14), (0.32, 0.14)])
        fills.append([(0.32, 0.14), (0.68, 0.14), (0.69, 0.94), (0.53, 0.94), (0.50, 0.38),
                      (0.47, 0.94), (0.31, 0.94)])
        shoulder = None
    else:
        raise ValueError(f"unknown category {category!r} (choose {', '.join(CATEGORIES)})")
    if shoulder is not None and sleeve:
        left = _sleeve(*shoulder, sleeve)
        if left:
            fills.extend([left, _mirror(left)])
    return fills, cuts, holes


def _transform(shapes, dx: float, dy: float, scale: float):
    """Centre the garment vertically, then scale about the centre and shift."""
    fills, cuts, holes = shapes
    ys = [y for poly in fills for _, y in poly]
    cy = (min(ys) + max(ys)) / 2

    def pt(x, y):
        return (0.5 + (x - 0.5) * scale + dx, 0.5 + (y - cy) * scale + dy)

    fills = [[pt(x, y) for x, y in p] for p in fills]
    cuts = [[pt(x, y) for x, y in p] for p in cuts]
    holes = [(*pt(a, b), *pt(c, d)) for a, b, c, d in holes]
    return fills, cuts, holes


def garment_mask(
    category: str, size: int, sleeve: str | None = None, length: str | None = None,
    dx: float = 0.0, dy: float = 0.0, scale: float = 1.0, supersample: int = 4,
) -> np.ndarray:
    """Coverage of the garment, float [size, size] in [0, 1] (antialiased)."""
    big = size * supersample
    fills, cuts, holes = _transform(garment_shapes(category, sleeve, length), dx, dy, scale)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for poly in fills:
        draw.polygon([(x * big, y * big) for x, y in poly], fill=255)
    for poly in cuts:
        draw.polygon([(x * big, y * big) for x, y in poly], fill=0)
    for a, b, c, d in holes:
        draw.ellipse([a * big, b * big, c * big, d * big], fill=0)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def print_mask(kind: str, size: int, dx: float = 0.0, dy: float = 0.0,
               scale: float = 1.0, supersample: int = 4) -> np.ndarray:
    """Where the white print covers the garment, float [size, size] in [0, 1]."""
    big = size * supersample
    m = Image.new("L", (big, big), 0)
    if kind == "무지":
        return np.zeros((size, size), np.float32)
    draw = ImageDraw.Draw(m)
    period = 0.1 * scale * big
    oy = (0.5 + dy) * big
    ox = (0.5 + dx) * big
    if kind == "스트라이프":
        width = period * 0.3
        k = -math.ceil(oy / period) - 1
        while oy + k * period < big:
            y0 = oy + k * period
            draw.rectangle([0, y0, big, y0 + width], fill=255)
            k += 1
    elif kind == "도트":
        r = period * 0.2
        kx0, ky0 = -math.ceil(ox / period) - 1, -math.ceil(oy / period) - 1
        for j in range(ky0, ky0 + math.ceil(big / period) + 3):
            for i in range(kx0, kx0 + math.ceil(big / period) + 3):
                x = ox + i * period + (period / 2 if j % 2 else 0)
                y = oy + j * period
                draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    else:
        raise ValueError(f"unknown print {kind!r} (choose {', '.join(PRINTS)})")
    return np.asarray(m.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


@dataclass(frozen=True)
class Garment:
    colour: str
    category: str
    print: str = "무지"
    sleeve: str | None = None  # 소매기장 for tops, coats, dresses
    length: str | None = None  # 기장 for bottoms
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    @property
    def part(self) -> str:
        return CATEGORIES[self.category]


def render(g: Garment, size: int = 256) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The garment on white at ``size`` x ``size``, and its bounding box (x, y, w, h)."""
    if g.colour not in COLOURS:
        raise ValueError(f"unknown colour {g.colour!r} (choose {', '.join(COLOURS)})")
    cover = garment_mask(g.category, size, g.sleeve, g.length, g.dx, g.dy, g.scale)
    printed = print_mask(g.print, size, g.dx, g.dy, g.scale)
    alpha = (cover * (1.0 - printed))[..., None]
    colour = np.array(COLOURS[g.colour], np.float32)
    rgb = alpha * colour + (1.0 - alpha) * 255.0
    image = Image.fromarray(np.clip(rgb.round(), 0, 255).astype(np.uint8), "RGB")
    ys, xs = np.nonzero(cover > 0.5)
    box = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    return image, box


# ---- labels ----------------------------------------------------------------------------------
def garment_label(g: Garment, ident: int, file_name: str, size: int,
                  box: tuple[int, int, int, int]) -> dict:
    """A label JSON in the real K-Fashion schema for one garment (a ``size`` x ``size`` image,
    the garment's box (x, y, w, h))."""
    attrs: dict = {}
    if g.length:
        attrs["기장"] = g.length
    attrs[COLOUR] = g.colour
    attrs[CATEGORY] = g.category
    if g.sleeve:
        attrs["소매기장"] = g.sleeve
    attrs["프린트"] = [g.print]
    x, y, w, h = box
    rect = {"X좌표": float(x), "Y좌표": float(y), "가로": w, "세로": h}
    polygon = {"X좌표1": float(x), "Y좌표1": float(y), "X좌표2": float(x + w), "Y좌표2": float(y),
               "X좌표3": float(x + w), "Y좌표3": float(y + h), "X좌표4": float(x),
               "Y좌표4": float(y + h)}
    return make_label(file_name, ident, (size, size), {g.part: (attrs, rect, polygon)})


# ---- data sets -------------------------------------------------------------------------------
def combinations(colours: Iterable[str] | None = None,
                 categories: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Every (colour, category) pair of the given (default: all) colours and categories."""
    return [(c, k) for k in (categories or CATEGORIES) for c in (colours or COLOURS)]


def random_garment(rng: random.Random, colour: str, category: str,
                   prints: Sequence[str] = PRINTS, jitter: float = 0.03) -> Garment:
    return Garment(
        colour=colour,
        category=category,
        print=rng.choice(list(prints)),
        sleeve=rng.choice(SLEEVES[category]) if category in SLEEVES else None,
        length=rng.choice(LENGTHS[category]) if category in LENGTHS else None,
        dx=rng.uniform(-jitter, jitter),
        dy=rng.uniform(-jitter, jitter),
        scale=1.0 + rng.uniform(-jitter, jitter),
    )


@dataclass(frozen=True)
class SyntheticItem:
    stem: str
    garment: Garment
    image: Path
    label: Path


def generate(
    out: str | Path,
    n: int,
    *,
    size: int = 256,
    seed: int = 0,
    combos: Sequence[tuple[str, str]] | None = None,
    holdout: Iterable[tuple[str, str]] = (),
    prints: Sequence[str] = PRINTS,
    jitter: float = 0.03,
    image_format: str = "jpg",
    split_dirs: bool = False,
    start: int = 0,
) -> list[SyntheticItem]:
    """Write ``n`` images and K-Fashion label JSONs to ``out``; returns what was drawn.

    ``combos``: the (colour, category) pairs to draw from (default: all of them), minus any in
    ``holdout`` (to test generalisation to unseen pairs). Item ``i`` depends only on ``seed``
    and ``i``, so a larger ``n`` extends a smaller one. ``split_dirs`` puts images in
    ``out/images`` and labels in ``out/labels``, as AI Hub ships them. File stems are
    numbers from ``start`` (K-Fashion's style).
    """
    held = {tuple(h) for h in holdout}
    pool = [tuple(c) for c in (combos if combos is not None else combinations()) if tuple(c) not in held]
    if not pool:
        raise ValueError("no (colour, category) combinations left to draw")
    for colour, category in pool:
        if colour not in COLOURS or category not in CATEGORIES:
            raise ValueError(f"unknown combination ({colour}, {category})")
    if image_format not in ("jpg", "png"):
        raise ValueError("image_format must be jpg or png")
    out = Path(out)
    image_dir = out / "images" if split_dirs else out
    label_dir = out / "labels" if split_dirs else out
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(start, start + n):
        rng = random.Random(f"kodalle-synthetic-{seed}-{i}")
        colour, category = pool[rng.randrange(len(pool))]
        g = random_garment(rng, colour, category, prints, jitter)
        image, box = render(g, size)
        stem = f"{i:06d}"
        img_path = image_dir / f"{stem}.{image_format}"
        if image_format == "jpg":
            image.save(img_path, quality=95)
        else:
            image.save(img_path)
        label = garment_label(g, i, img_path.name, size, box)
        lbl_path = label_dir / f"{stem}.json"
        lbl_path.write_text(json.dumps(label, ensure_ascii=False), encoding="utf-8")
        items.append(SyntheticItem(stem, g, img_path, lbl_path))
    return items


# ---- reading garments back from pixels ---------------------------------------------------------
def foreground(image, threshold: float = 60.0) -> np.ndarray:
    """Pixels that are not background white (RGB distance from white above ``threshold``)."""
    arr = rgb_array(image)
    return np.linalg.norm(arr - 255.0, axis=-1) > threshold


_SOLID = 45.0  # RGB distance within which a pixel counts as a palette colour


def garment_colour(image, palette: dict[str, tuple[int, int, int]] | None = None) -> str | None:
    """The colour word of the garment in ``image`` (PIL image, HWC array or CHW tensor in
    [0, 1] or [0, 255]): the palette colour most non-background pixels are nearest to.
    None when the image is all background."""
    palette = palette or COLOURS
    arr = rgb_array(image)
    fg = arr[foreground(arr)]
    if len(fg) == 0:
        return None
    names = list(palette)
    colours = np.array([palette[n] for n in names], np.float32)  # [C, 3]
    dist = ((fg[:, None, :] - colours[None]) ** 2).sum(-1)
    nearest = np.argmin(dist, axis=1)
    # vote with the pixels that are close to a palette colour: edge pixels and pixels next to
    # a white print are blends (antialiasing, JPEG chroma subsampling) that sit nearer to
    # other colours; fall back to every pixel when none is close
    solid = dist[np.arange(len(fg)), nearest] < _SOLID**2
    if solid.sum() >= max(1, 0.05 * len(fg)):
        nearest = nearest[solid]
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


_GRID = 32


def _normalised_silhouette(mask: np.ndarray) -> tuple[np.ndarray, float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    im = Image.fromarray((crop * 255).astype(np.uint8), "L").resize((_GRID, _GRID),
                                                                    Image.Resampling.BOX)
    aspect = crop.shape[1] / crop.shape[0]
    return np.asarray(im, np.float32) / 255.0 > 0.5, aspect


def _closed_mask(foreground_mask: np.ndarray) -> np.ndarray:
    """The garment's silhouette: the holes a white print leaves closed (a morphological
    closing whose size follows the image's)."""
    size = max(foreground_mask.shape)
    mask = Image.fromarray(foreground_mask.astype(np.uint8) * 255, "L")
    k = max(3, (size // 32) | 1)
    mask = mask.filter(ImageFilter.MaxFilter(k)).filter(ImageFilter.MinFilter(k))
    return np.asarray(mask) > 127


@lru_cache(maxsize=8)
def _templates(size: int) -> list[tuple[str, np.ndarray, float]]:
    """Every category, sleeve and length, drawn at ``size`` and closed as images are."""
    out = []
    for category in CATEGORIES:
        for sleeve in SLEEVES.get(category, (None,)):
            for length in LENGTHS.get(category, (None,)):
                mask = _closed_mask(garment_mask(category, size, sleeve, length) > 0.5)
                out.append((category, *_normalised_silhouette(mask)))
    return out


def garment_category(image) -> str | None:
    """The category of the garment in ``image``: the template silhouette (every category,
    sleeve and length) that best matches its shape, after normalising position and scale.
    None when the image is all background."""
    arr = rgb_array(image)
    size = max(arr.shape[:2])
    sil = _normalised_silhouette(_closed_mask(foreground(arr)))
    if sil is None:
        return None
    shape, aspect = sil
    best, best_score = None, -math.inf
    for category, tpl, tpl_aspect in _templates(64 if size < 128 else 128):
        iou = (shape & tpl).sum() / max(1, (shape | tpl).sum())
        score = iou - abs(math.log(aspect / tpl_aspect))
        if score > best_score:
            best, best_score = category, score
    return best
