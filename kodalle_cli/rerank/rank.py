"""Ranking images against a caption with a trained reranker: what ``kodalle rerank`` and
``kodalle sample --rerank DIR --keep K`` call.

    from kodalle_cli.rerank.rank import load_reranker, keep_best
    reranker = load_reranker("runs/reranker", device="cpu")
    sims = reranker.score(images, captions)          # [len(images), len(captions)] cosine
    order, scores = keep_best(reranker, images, caption, keep=4)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from kodalle_cli.errors import ConfigError, KodalleError
from kodalle_cli.rerank.model import Reranker, load_reranker

__all__ = ["Reranker", "keep_best", "load_reranker", "rank_files"]


def keep_best(reranker: Reranker, images: Sequence, caption: str,
              keep: int | None = None) -> tuple[list[int], list[float]]:
    """Indices of the best ``keep`` images (all when None), best first, and every image's
    score in the original order (so callers can record them all)."""
    sims = reranker.score(list(images), [caption])[:, 0]
    scores = [float(s) for s in sims]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:keep] if keep is not None else order, scores


def rank_files(paths: Sequence[str | Path], caption: str, reranker: str | Path,
               top: int | None = None, device: str = "auto",
               warn: Callable[[str], None] | None = None) -> list[dict]:
    """Rank image files by similarity to ``caption``: ``[{rank, score, image}]`` best first.

    A path that is not a readable image (another kind of file, a damaged image, a folder,
    a missing file) is skipped with a warning giving the reason (``warn``, default
    :func:`kodalle_cli.errors.warn`); when none is left it is an error. An empty caption is
    a usage error."""
    from kodalle_cli.data.images import ImageError, open_image
    from kodalle_cli.device import pick_device
    from kodalle_cli.errors import UsageError
    from kodalle_cli.errors import warn as warn_user

    warn = warn or warn_user
    if not caption.strip():
        raise UsageError("--caption is empty: give the caption to rank the images against")
    if top is not None and top < 1:
        raise ConfigError("top", top, "must be at least 1")
    images, kept = [], []
    for path in paths:
        try:
            images.append(open_image(path)[0])
            kept.append(path)
        except ImageError as exc:
            warn(f"skipped {path}: {exc}")
    if not images:
        raise KodalleError(
            f"none of the {len(paths)} file(s) given is a readable image: nothing to rank")
    model = load_reranker(reranker, pick_device(device))
    order, scores = keep_best(model, images, caption, top)
    return [{"rank": r + 1, "score": scores[i], "image": str(kept[i])}
            for r, i in enumerate(order)]
