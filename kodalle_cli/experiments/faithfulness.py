"""Does a generated garment follow its caption? Shares with intervals, and chance measured.

The synthetic garments (:mod:`kodalle_cli.data.synthetic`) are flat colours on white in a
handful of shapes, so an image's colour and category can be read back from its pixels
(:func:`~kodalle_cli.data.synthetic.garment_colour`,
:func:`~kodalle_cli.data.synthetic.garment_category`), against the generator's true palette:
nothing is fitted, so nothing can be fitted on the images it scores.

    from kodalle_cli.experiments.faithfulness import Judged, judge, summarise, shuffled
    judged = [judge(image, colour, category) for image, colour, category in records]
    summarise(judged)             # {"colour": Share, "category": Share, "both": Share}
    summarise(shuffled(judged))   # the same images against other images' captions: chance

Chance is measured, not assumed: every image is scored against the wanted colour and
category of another image of the set (a seeded derangement), so the shares it gives are
what a model that ignores its caption, but draws the same mix of garments, would score.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Share:
    """``hits`` of ``n``, with its 95% Wilson score interval."""

    hits: int
    n: int

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.hits, self.n)

    def __str__(self) -> str:
        if not self.n:
            return "n/a"
        lo, hi = self.interval
        return f"{self.value:.0%} [{lo:.0%}, {hi:.0%}] of {self.n}"

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"share": self.value, "hits": self.hits, "n": self.n, "ci95": [lo, hi]}


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial share (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Judged:
    """What one image shows against what its caption asked for."""

    want_colour: str
    want_category: str
    colour: str | None  # read from the pixels; None for an empty image
    category: str | None

    @property
    def colour_ok(self) -> bool:
        return self.colour == self.want_colour

    @property
    def category_ok(self) -> bool:
        return self.category == self.want_category

    @property
    def both_ok(self) -> bool:
        return self.colour_ok and self.category_ok


def judge(image, want_colour: str, want_category: str,
          palette: dict[str, tuple[int, int, int]] | None = None) -> Judged:
    """Read the garment in ``image`` (PIL image, HWC array or CHW tensor)."""
    from kodalle_cli.data import synthetic

    return Judged(want_colour, want_category, synthetic.garment_colour(image, palette),
                  synthetic.garment_category(image))


def summarise(judged: Iterable[Judged]) -> dict[str, Share]:
    """Colour, category and both right, each a :class:`Share`."""
    judged = list(judged)
    return {
        "colour": Share(sum(j.colour_ok for j in judged), len(judged)),
        "category": Share(sum(j.category_ok for j in judged), len(judged)),
        "both": Share(sum(j.both_ok for j in judged), len(judged)),
    }


def shuffled(judged: Sequence[Judged], seed: int = 0) -> list[Judged]:
    """The same readings against the captions of other images (a seeded derangement): what a
    caption-blind model that draws the same mix of garments would score."""
    n = len(judged)
    if n < 2:
        return list(judged)
    rng = random.Random(seed)
    order = list(range(n))
    for _ in range(100):
        rng.shuffle(order)
        if all(i != j for i, j in enumerate(order)):
            break
    return [Judged(judged[j].want_colour, judged[j].want_category, judged[i].colour,
                   judged[i].category) for i, j in enumerate(order)]


def to_dict(shares: dict[str, Share]) -> dict[str, dict]:
    return {k: v.to_dict() for k, v in shares.items()}


# ---- per class: what catches a model that draws one default for every word it doesn't know --
def _pairs(judged: Iterable[Judged], what: str) -> list[tuple[str, str | None]]:
    return [(getattr(j, f"want_{what}"), getattr(j, what)) for j in judged]


def per_class(judged: Iterable[Judged], what: str, classes: Sequence[str]) -> dict[str, dict]:
    """For each class (``what``: "colour" or "category"): its recall (images that asked for
    it and show it, a :class:`Share`), how many images asked for it, and how many show it
    (of every image, whatever it asked for: a default class is drawn far more often than
    it is asked for)."""
    pairs = _pairs(judged, what)
    out = {}
    for c in classes:
        asked = [got for want, got in pairs if want == c]
        out[c] = {"recall": Share(sum(got == c for got in asked), len(asked)),
                  "asked": len(asked), "drawn": sum(got == c for _, got in pairs)}
    out["(none)"] = {"recall": Share(0, 0), "asked": 0,
                     "drawn": sum(got is None for _, got in pairs)}
    return out


def kappa(judged: Iterable[Judged], what: str) -> float:
    """Cohen's kappa between the class asked for and the class drawn: 1 when every image
    follows its caption, 0 for what the two marginal distributions agree on by chance (a
    model that draws one class for everything scores 0 however often that class is asked
    for), below 0 for worse than that. An unreadable image counts as a class of its own."""
    pairs = _pairs(judged, what)
    n = len(pairs)
    if not n:
        return float("nan")
    observed = sum(want == got for want, got in pairs) / n
    wants, gots = {}, {}
    for want, got in pairs:
        wants[want] = wants.get(want, 0) + 1
        gots[got] = gots.get(got, 0) + 1
    expected = sum(wants[c] * gots.get(c, 0) for c in wants) / (n * n)
    return (observed - expected) / (1 - expected) if expected < 1 else float("nan")


def kappa_difference(a: Sequence[Sequence[Judged]], b: Sequence[Sequence[Judged]], what: str,
                     seed: int = 0, reps: int = 2000) -> dict:
    """kappa(a) - kappa(b) with a 95% percentile bootstrap interval. ``a`` and ``b`` are the
    images of the same captions, grouped by caption (``a[i]`` and ``b[i]`` answer caption
    ``i``): captions are resampled, keeping their images together (images of one caption
    are not independent)."""
    if len(a) != len(b) or not a:
        raise ValueError("kappa_difference needs the same captions on both sides")
    diff = kappa([j for g in a for j in g], what) - kappa([j for g in b for j in g], what)
    rng = random.Random(seed)
    n, draws = len(a), []
    for _ in range(reps):
        pick = [rng.randrange(n) for _ in range(n)]
        draws.append(kappa([j for i in pick for j in a[i]], what)
                     - kappa([j for i in pick for j in b[i]], what))
    draws = sorted(d for d in draws if d == d)
    lo, hi = draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]
    return {"diff": diff, "ci95": [lo, hi]}
