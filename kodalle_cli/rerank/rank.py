"""Ranking images against a caption with a trained reranker: what ``kodalle rerank`` and
``kodalle sample --rerank DIR --keep K`` call.

    from kodalle_cli.rerank.rank import load_reranker, keep_best
    reranker = load_reranker("runs/reranker", device="cpu")
    sims = reranker.score(images, captions)          # [len(images), len(captions)] cosine
    order, scores = keep_best(reranker, images, caption, keep=4)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kodalle_cli.errors import KodalleError
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
               top: int | None = None, device: str = "auto") -> list[dict]:
    """Rank image files by similarity to ``caption``: ``[{rank, score, image}]`` best first."""
    from kodalle_cli.data.images import ImageError, open_image
    from kodalle_cli.device import pick_device

    images = []
    for path in paths:
        try:
            images.append(open_image(path)[0])
        except ImageError as exc:
            raise KodalleError(f"{path}: {exc}") from None
    model = load_reranker(reranker, pick_device(device))
    order, scores = keep_best(model, images, caption, top)
    return [{"rank": r + 1, "score": scores[i], "image": str(paths[i])}
            for r, i in enumerate(order)]
