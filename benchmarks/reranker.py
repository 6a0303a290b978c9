"""The reranker and `kodalle score` on synthetic garments: cost, and how well it learns.

    .venv/bin/python -m benchmarks.reranker                # 1 and 2 threads, 5 runs per arm
    .venv/bin/python -m benchmarks.reranker --quick        # smoke run: 10 steps, 8 images
    .venv/bin/python -m benchmarks.reranker --threads 1,2 --json out.json

Data, built once: 320 training and 40 validation synthetic garments at 48 px (4 colours x 2
categories = 8 distinct captions) in image shards, and a KLUE-like backbone
(``build_klue_like``: a 1-layer, 32-dim RoBERTa with a WordPiece tokenizer on the captions).

Two comparisons, one arm per torch thread count (``--threads``), interleaved:
- ``train``: ``train_reranker`` (EfficientNet-B0 at 48 px, random init, + that text tower)
  for 100 steps of 16 pairs into a fresh folder. Timed: the ``train_reranker`` call. Also
  recorded per run (not timed): ``val_image_to_text`` (its validation retrieval accuracy on
  the 40 pairs) and ``rank_first_accuracy``: the trained reranker ranks the 8 captions for
  48 new images; how often the true one comes first (chance 0.125);
- ``fidelity``: one torch-fidelity pass (FID + KID + IS; Inception at 299 px with random
  weights built locally, as the tests do) over two folders of ``--score-images`` PNGs.
  Timed: the ``fidelity_metrics`` call.
"""

from __future__ import annotations

import io
import random
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

from benchmarks.harness import Arm, compare, parser
from kodalle_cli.data.synthetic import random_garment, render
from kodalle_cli.experiments.tiny_backbone import build_klue_like
from kodalle_cli.rerank.model import load_reranker
from kodalle_cli.rerank.train import RerankerTrainConfig, train_reranker
from kodalle_cli.score import (
    fidelity_metrics,
    fidelity_settings,
    write_pngs,
    write_random_inception_weights,
)

COLOURS = ("레드", "블루", "그린", "옐로우")
CATEGORIES = {"티셔츠": "상의", "스커트": "하의"}
CAPTIONS = [f"{part}에서 색상은 {c}이다. 카테고리는 {k}이다."
            for k, part in CATEGORIES.items() for c in COLOURS]


def pairs(n: int, seed: int, size: int = 48):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour, category = rng.choice(COLOURS), rng.choice(list(CATEGORIES))
        image, _ = render(random_garment(rng, colour, category), size)
        out.append((image, f"{CATEGORIES[category]}에서 색상은 {colour}이다. "
                           f"카테고리는 {category}이다."))
    return out


def shard(path: Path, items) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i, (image, caption) in enumerate(items):
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": caption,
                        "json": "{}"})


def train_once(root: Path, backbone: Path, steps: int, test) -> dict:
    """One training run into a fresh folder: its seconds and what the reranker learnt."""
    with tempfile.TemporaryDirectory(dir=root) as out:
        start = time.perf_counter()
        result = train_reranker(RerankerTrainConfig(
            backbone=str(backbone), data=str(root), out=out, image_size=48, embed_dim=32,
            text_seq_len=32, max_steps=steps, batch_size=16, lr=2e-3, weight_decay=0.0,
            warmup_steps=min(10, steps // 2), eval_every=steps, eval_samples=40,
            save_every=steps, shuffle_buffer=64, device="cpu", precision="fp32"),
            progress=False)
        seconds = time.perf_counter() - start
        sims = load_reranker(out).score([p[0] for p in test], CAPTIONS)
    best = sims.argmax(1).tolist()
    hits = sum(CAPTIONS[j] == caption for j, (_, caption) in zip(best, test, strict=True))
    return {"seconds": seconds, "val_image_to_text": result["val_image_to_text"],
            "rank_first_accuracy": hits / len(test)}


def threaded(threads: int, fn):
    """``fn`` run with ``threads`` torch threads (the previous count restored after)."""
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return run


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--threads", default="1,2", help="torch thread counts, one arm each")
    ap.add_argument("--steps", type=int, default=100, help="reranker training steps")
    ap.add_argument("--score-images", type=int, default=16, help="PNGs per fidelity folder")
    args = ap.parse_args()
    steps, n = (10, 8) if args.quick else (args.steps, args.score_images)
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shard(root / "train-000000.tar", pairs(320, 1))
        shard(root / "val-000000.tar", pairs(40, 2))
        backbone = build_klue_like(root / "klue", texts=CAPTIONS * 4, vocab_size=128,
                                   hidden=32, layers=1)
        test = pairs(48, 3)
        compare(f"train_reranker, {steps} steps of 16 pairs (EfficientNet-B0 at 48 px); "
                f"rank_first_accuracy: 8 captions, 48 new images, chance {1 / len(CAPTIONS)}",
                [Arm(f"train, {t} thread{'s' * (t > 1)}",
                     threaded(t, lambda: train_once(root, backbone, steps, test)))
                 for t in threads], args)
        weights = write_random_inception_weights(root / "inception.pth")
        a = write_pngs([p[0] for p in pairs(n, 4)], root / "a", 48)
        b = write_pngs([p[0] for p in pairs(n, 5)], root / "b", 48)
        settings = fidelity_settings(n, n)

        def score() -> None:
            fidelity_metrics(a, b, weights, torch.device("cpu"), settings)

        compare(f"torch-fidelity FID+KID+IS, {n} + {n} PNGs, Inception at 299 px; "
                "per s = images/s",
                [Arm(f"fidelity, {t} thread{'s' * (t > 1)}", threaded(t, score), per=2 * n)
                 for t in threads], args)


if __name__ == "__main__":
    main()
