"""Reranker and score on synthetic garments: how well a tiny reranker learns, and what it costs.

Trains a tiny reranker (EfficientNet-B0 at 48 px + a 1-layer 32-dim KLUE-like text tower) for
100 steps of 16 pairs on 320 synthetic garments (4 colours x 2 categories = 8 captions),
then measures how often the matching caption ranks first among the 8 on 48 fresh images
(chance 1/8), and times `kodalle score`'s torch-fidelity pass (Inception at 299 px) on
N generated/reference PNGs with a locally built random-weight Inception.

    .venv/bin/python benchmarks/reranker.py [--threads 1] [--score-images 16]
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the stdlib's tokenize: keep this folder off the import path
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from kodalle_cli.data.synthetic import random_garment, render  # noqa: E402
from kodalle_cli.rerank.model import load_reranker  # noqa: E402
from kodalle_cli.rerank.train import RerankerTrainConfig, train_reranker  # noqa: E402
from kodalle_cli.score import (  # noqa: E402
    fidelity_metrics,
    fidelity_settings,
    write_pngs,
    write_random_inception_weights,
)
from kodalle_cli.tiny_backbone import build_klue_like  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--score-images", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shard(root / "train-000000.tar", pairs(320, 1))
        shard(root / "val-000000.tar", pairs(40, 2))
        backbone = build_klue_like(root / "klue", texts=CAPTIONS * 4, vocab_size=128,
                                   hidden=32, layers=1)
        t = time.perf_counter()
        result = train_reranker(RerankerTrainConfig(
            backbone=str(backbone), data=str(root), out=str(root / "rr"), image_size=48,
            embed_dim=32, text_seq_len=32, max_steps=100, batch_size=16, lr=2e-3,
            weight_decay=0.0, warmup_steps=10, eval_every=50, eval_samples=40, save_every=50,
            shuffle_buffer=64, device="cpu", precision="fp32"), progress=False)
        train_s = time.perf_counter() - t
        reranker = load_reranker(root / "rr")
        test = pairs(48, 3)
        sims = reranker.score([p[0] for p in test], CAPTIONS)
        hits = sum(CAPTIONS[j] == c for j, (_, c) in zip(sims.argmax(1).tolist(), test,
                                                          strict=True))
        n = args.score_images
        weights = write_random_inception_weights(root / "inception.pth")
        a = write_pngs([p[0] for p in pairs(n, 4)], root / "a", 48)
        b = write_pngs([p[0] for p in pairs(n, 5)], root / "b", 48)
        t = time.perf_counter()
        metrics = fidelity_metrics(a, b, weights, torch.device("cpu"), fidelity_settings(n, n))
        score_s = time.perf_counter() - t
    print(json.dumps({"threads": args.threads, "train_100_steps_s": round(train_s, 1),
                      "val_image_to_text": result["val_image_to_text"],
                      "rank_first_accuracy": round(hits / len(test), 3),
                      "chance": round(1 / len(CAPTIONS), 3),
                      "fidelity_images_per_set": n, "fidelity_s": round(score_s, 1),
                      "fid_two_synthetic_sets": round(metrics["fid"], 3)}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
