"""Memorisation, for ``kodalle score``: is each generated image a near-copy of a training image?

For every generated image its nearest training image is found:

- with a reranker (``--reranker``): by its image embedding, distance ``1 - cosine``;
- otherwise: by VQGAN codes, distance = the share of the ``N`` code positions that differ
  (normalised Hamming distance, 0 = the same codes). Training codes come from the token
  shards (``DATA/tokens``, or the run's); the generated images' codes are the codes the run
  drew (``--checkpoint``) or the VQGAN's codes of the given images (``--images``).

**The near-copy threshold** is chosen on held-out real images, which are not copies of the
training set by construction: it is the 1st percentile of the distances from the
validation split's images to their nearest training image (``THRESHOLD_PERCENTILE``). A
generated image at or below it is closer to a training image than 99% of real held-out
images are to theirs: a near-copy. About 1% of held-out images fall at or below it too (the
false-positive rate; reported as ``heldout_flagged_share``). Without a validation split the
training images stand in, each against the others (leave-one-out). A data set with exact
duplicates across splits gives a threshold of 0: only exact copies count then.

``score.json``'s ``memorisation`` holds the method, the threshold and how it was chosen, the
near-copy count and share, the distance distributions (generated and held-out: quantiles and
a histogram on shared bins), every generated image's nearest training image, and the
closest pairs, drawn side by side in ``OUT/closest_pairs.png`` (generated above, training
image below, the distance under each pair).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kodalle_cli.data.shards import read_image
from kodalle_cli.errors import KodalleError

THRESHOLD_PERCENTILE = 1.0
PICTURE = "closest_pairs.png"
CLOSEST_PAIRS = 8
HISTOGRAM_BINS = 20


# ---- distances -------------------------------------------------------------------------------
def nearest_hamming(queries: torch.Tensor, pool: torch.Tensor, *, same: bool = False,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``queries [G, N]`` (codes) its nearest row of ``pool [M, N]``: the
    share of positions that differ ``[G]`` (float) and the index ``[G]``. ``same``: queries
    are the pool (leave-one-out: a row never matches itself)."""
    g, n = queries.shape
    q = queries.to(device)
    best = torch.full((g,), float("inf"), device=device)
    index = torch.zeros(g, dtype=torch.long, device=device)
    chunk = max(1, (1 << 25) // max(g * n, 1))
    for start in range(0, pool.shape[0], chunk):
        p = pool[start:start + chunk].to(device)
        dist = (q[:, None, :] != p[None, :, :]).sum(-1).float() / n  # [G, m]
        if same:
            rows = torch.arange(g, device=device)
            cols = rows - start
            inside = (cols >= 0) & (cols < p.shape[0])
            dist[rows[inside], cols[inside]] = float("inf")
        d, i = dist.min(dim=1)
        better = d < best
        best = torch.where(better, d, best)
        index = torch.where(better, i + start, index)
    return best.cpu(), index.cpu()


def nearest_embedding(queries: torch.Tensor, pool: torch.Tensor, *, same: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`nearest_hamming` for unit-length embeddings: distance ``1 - cosine``."""
    sims = queries.float() @ pool.float().t()
    if same:
        sims.fill_diagonal_(-float("inf"))
    s, i = sims.max(dim=1)
    return (1.0 - s).clamp(min=0.0).cpu(), i.cpu()


def quantiles(values: Sequence[float]) -> dict:
    """min, 1st/5th/25th percentile, median, mean, 75th/95th percentile and max."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {}
    q = np.percentile(a, [0, 1, 5, 25, 50, 75, 95, 100])
    return {"min": float(q[0]), "p1": float(q[1]), "p5": float(q[2]), "p25": float(q[3]),
            "median": float(q[4]), "mean": float(a.mean()), "p75": float(q[5]),
            "p95": float(q[6]), "max": float(q[7])}


def histogram(generated: Sequence[float], heldout: Sequence[float],
              bins: int = HISTOGRAM_BINS) -> dict:
    """Counts of both distance sets on the same bins (from 0 to the largest distance)."""
    top = max([*generated, *heldout, 1e-6])
    edges = np.linspace(0.0, top, bins + 1)
    return {"edges": [round(float(e), 6) for e in edges],
            "generated": np.histogram(generated, edges)[0].tolist(),
            "heldout": np.histogram(heldout, edges)[0].tolist()}


def near_copy_threshold(heldout: Sequence[float],
                        percentile: float = THRESHOLD_PERCENTILE) -> float | None:
    """The ``percentile``-th percentile of held-out images' nearest-training distances."""
    return float(np.percentile(np.asarray(heldout, np.float64), percentile)) if len(
        heldout) else None


# ---- the training pool -----------------------------------------------------------------------
@dataclass
class Pool:
    """Training (or held-out) images: what they are compared by, and where each lives."""

    vectors: torch.Tensor  # codes [M, N] or embeddings [M, D]
    keys: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)  # the shard file name of each


def token_pool(tokens: Path, split: str, limit: int = 0) -> Pool | None:
    """The VQGAN codes of a token-shard split (None when it has no samples)."""
    from kodalle_cli.data.tokens import read_manifest, read_shard

    manifest = read_manifest(tokens)
    # the shards' own width (int16 for codebooks up to 32768): K-Fashion's 1.2M x 256 codes
    # take 0.6 GB instead of 2.4 as int64
    dtype = np.int16 if manifest.get("codes_dtype") == "int16" else np.int32
    codes, keys, shards = [], [], []
    for shard in manifest["splits"].get(split, {"shards": []})["shards"]:
        for s in read_shard(tokens / shard["name"]):
            codes.append(torch.from_numpy(s["codes"].astype(dtype)))
            keys.append(s["key"])
            shards.append(shard["name"])
            if limit and len(codes) >= limit:
                break
        if limit and len(codes) >= limit:
            break
    return Pool(torch.stack(codes), keys, shards) if codes else None


def embedding_pool(reranker, data: str | Path, split: str, limit: int = 0,
                   batch: int = 64) -> Pool | None:
    """The reranker's image embeddings of an image-shard split (read in batches)."""
    from kodalle_cli.data.shards import iter_image_samples, shard_paths

    try:
        paths = shard_paths(data, split)
    except KodalleError:  # no shards of this split
        return None
    vectors, keys, shards, images = [], [], [], []

    def flush():
        if images:
            vectors.append(reranker.embed_images(images).cpu())
            images.clear()

    for s in iter_image_samples(paths, split=split, split_by_worker=False,
                                limit=limit or None):
        images.append(s.image)
        keys.append(s.key)
        shards.append(Path(s.shard).name if s.shard else "")
        if len(images) >= batch:
            flush()
    flush()
    return Pool(torch.cat(vectors), keys, shards) if vectors else None


def find_tokens(data: str | Path, run_config: dict | None = None) -> Path | None:
    """The token shards of the training set: the run's, ``DATA/tokens`` or ``DATA``."""
    from kodalle_cli.data.tokens import MANIFEST

    candidates = []
    recorded = ((run_config or {}).get("data") or {}).get("tokens")
    if recorded:
        candidates.append(Path(recorded))
    candidates += [Path(data) / "tokens", Path(data)]
    for c in candidates:
        if (c / MANIFEST).is_file():
            try:
                if json.loads((c / MANIFEST).read_text(encoding="utf-8")).get(
                        "format") == "kodalle-tokens":
                    return c
            except (OSError, ValueError):
                continue
    return None


def training_image(data: str | Path, shard: str, key: str):
    """The image of ``key`` in image shard ``shard`` of ``data`` (None when not there)."""
    path = Path(data) / shard
    if not shard or not path.is_file():
        return None
    return read_image(path, key)


# ---- the check -------------------------------------------------------------------------------
def check(*, generated: torch.Tensor, train: Pool, heldout: Pool | None, method: str,
          device: torch.device | str = "cpu") -> dict:
    """Distances, threshold and near-copies (no pictures): the numbers of ``score.json``.
    ``generated``: codes ``[G, N]`` (method ``vqgan-hamming``) or embeddings ``[G, D]``
    (``reranker-embedding``)."""
    if method == "vqgan-hamming":
        def nearest(q, p, same=False):
            return nearest_hamming(q, p, same=same, device=device)
        unit = "share of the image's VQGAN code positions that differ from the training image's"
    else:
        nearest = nearest_embedding
        unit = "1 - cosine similarity of the reranker's image embeddings"
    dist, index = nearest(generated, train.vectors)
    if heldout is not None and len(heldout.vectors):
        held, _ = nearest(heldout.vectors, train.vectors)
        rule = (f"{THRESHOLD_PERCENTILE:g}st percentile of the {len(held)} validation images' "
                "distances to their nearest training image")
    elif len(train.vectors) > 1:
        held, _ = nearest(train.vectors, train.vectors, same=True)
        rule = (f"{THRESHOLD_PERCENTILE:g}st percentile of the {len(held)} training images' "
                "distances to their nearest other training image (no validation split)")
    else:
        held, rule = torch.empty(0), "none: no held-out images and a single training image"
    threshold = near_copy_threshold(held.tolist())
    flagged = [threshold is not None and d <= threshold for d in dist.tolist()]
    nearest_rows = [{"index": i, "train_key": train.keys[j], "train_shard": train.shards[j],
                     "distance": round(float(d), 6), "near_copy": f}
                    for i, (d, j, f) in enumerate(zip(dist.tolist(), index.tolist(), flagged,
                                                      strict=True))]
    closest = sorted(nearest_rows, key=lambda r: (r["distance"], r["index"]))[:CLOSEST_PAIRS]
    return {
        "method": method,
        "distance": unit,
        "threshold": threshold,
        "threshold_rule": rule,
        "near_copies": sum(flagged) if threshold is not None else None,
        "near_copy_share": sum(flagged) / len(flagged) if threshold is not None and flagged
        else None,
        "heldout_flagged_share": float((held <= threshold).float().mean())
        if threshold is not None and len(held) else None,
        "generated_images": len(dist),
        "train_images": len(train.vectors),
        "heldout_images": len(held),
        "generated_distances": quantiles(dist.tolist()),
        "heldout_distances": quantiles(held.tolist()),
        "histogram": histogram(dist.tolist(), held.tolist()),
        "closest": closest,
        "nearest": nearest_rows,
    }


def pairs_picture(pairs: Sequence[tuple], path: Path, tile: int = 96) -> Path:
    """Pairs ``(generated image, training image or None, distance, near_copy)`` side by
    side: each column a pair, generated above, training below, the distance under it."""
    from PIL import Image, ImageDraw

    label, pad = 14, 4
    width = len(pairs) * (tile + pad) + pad
    height = 2 * tile + 3 * pad + label
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (gen, train, dist, copy) in enumerate(pairs):
        x = pad + k * (tile + pad)
        for y, im in ((pad, gen), (2 * pad + tile, train)):
            if im is None:
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=(200, 200, 200))
                continue
            canvas.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
        text = f"{dist:.3f}" + (" copy" if copy else "")
        draw.text((x + 2, 2 * tile + 3 * pad - 2), text,
                  fill=(220, 30, 35) if copy else (0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def memorisation(*, generated_images: Sequence, generated_codes: torch.Tensor | None,
                 data: str | Path, out: Path, reranker=None, run=None, limit: int = 0,
                 device: torch.device | str = "cpu",
                 warn: Callable[[str], None] | None = None) -> dict:
    """``score``'s memorisation check (module docstring): numbers for ``score.json`` plus
    ``OUT/closest_pairs.png``. ``generated_images``: PIL images or paths; ``generated_codes``
    their codes when the run drew them; ``run``: the loaded run (its VQGAN and token
    shards); ``limit``: training images compared (0: all). A check that cannot run returns
    ``{"skipped": reason}``."""
    from kodalle_cli.data.images import open_image, to_tensor

    def image(x):
        return x if hasattr(x, "size") else open_image(x)[0]

    tokens = find_tokens(data, run.config if run is not None else None)
    if reranker is not None:
        method = "reranker-embedding"
        train = embedding_pool(reranker, data, "train", limit)
        if train is None:
            return {"skipped": f"no training images in {data}"}
        heldout = embedding_pool(reranker, data, "val", 1000)
        generated = reranker.embed_images([image(x) for x in generated_images]).cpu()
        vqgan = None
    else:
        method = "vqgan-hamming"
        if tokens is None:
            return {"skipped": f"no token shards for {data} (the training images' VQGAN codes;"
                               " run `kodalle tokenize`, or pass --reranker)"}
        train = token_pool(tokens, "train", limit)
        if train is None:
            return {"skipped": f"no training samples in {tokens}"}
        heldout = token_pool(tokens, "val", 1000)
        vqgan = run.vqgan if run is not None else None
        if vqgan is None:
            source = ((json.loads((tokens / "manifest.json").read_text(encoding="utf-8"))
                       .get("vqgan")) or {}).get("source")
            try:
                from kodalle_cli.vqgan import load_vqgan

                vqgan = load_vqgan(source, device=device) if source else None
            except KodalleError:
                vqgan = None
        if generated_codes is None:
            if vqgan is None:
                return {"skipped": "no VQGAN to encode the images with (the token shards name "
                                   "none that loads); pass --reranker to compare embeddings"}
            # at the training images' size: their grid times the VQGAN's factor
            side = math.isqrt(train.vectors.shape[1]) * vqgan.downsample_factor
            pixels = to_tensor([image(x) for x in generated_images], size=side)
            generated_codes = vqgan.encode(pixels.to(vqgan.device), batch_size=64).cpu()
        generated = generated_codes.long()
        if generated.shape[1] != train.vectors.shape[1]:
            return {"skipped": f"the images have {generated.shape[1]} codes, the training "
                               f"images {train.vectors.shape[1]} (another VQGAN)"}
    result = check(generated=generated, train=train, heldout=heldout, method=method,
                   device=device)
    pairs = []
    for row in result["closest"]:
        train_im = training_image(data, row["train_shard"], row["train_key"])
        if train_im is None and vqgan is not None and method == "vqgan-hamming":
            j = train.keys.index(row["train_key"])
            from kodalle_cli.output import to_pil

            train_im = to_pil(vqgan.decode(train.vectors[j:j + 1].to(vqgan.device)))[0]
        pairs.append((image(generated_images[row["index"]]), train_im, row["distance"],
                      row["near_copy"]))
    if pairs:
        result["picture"] = str(pairs_picture(pairs, Path(out) / PICTURE))
    return result
