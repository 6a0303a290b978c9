"""Benchmark `kodalle prepare`: images/s for 800x1067 JPEGs -> 256 px shards.

Compares, in one run on the same files:
- baseline: a plain PIL loop (open, convert, resize with aspect kept, pad, save JPEG q95)
- kodalle prepare with 1 worker and with 2 workers, into 8 shards (wall time of the whole
  call: scan, process start-up, label parsing, captions, tar writing, manifest)

    .venv/bin/python benchmarks/prepare.py --n 300
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from kodalle_cli.data.prepare import PrepareConfig, prepare
from kodalle_cli.data.synthetic import COLOURS, Garment, garment_label

W, H, SIZE = 800, 1067, 256


def photo_like(rng: np.random.Generator) -> Image.Image:
    """A smooth random image with fine noise: compresses like a photograph (~100-200 KB)."""
    low = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((W, H), Image.Resampling.BICUBIC)
    arr = np.asarray(im, np.int16) + rng.integers(-12, 13, (H, W, 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_dataset(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    colours = list(COLOURS)
    for i in range(n):
        stem = f"{i:06d}"
        path = root / f"{stem}.jpg"
        photo_like(rng).save(path, quality=90)
        g = Garment(colours[i % len(colours)], "티셔츠", sleeve="반팔")
        label = garment_label(g, i, path.name, W, (150, 200, 500, 700))
        label["이미지 정보"]["이미지 높이"] = H
        (root / f"{stem}.json").write_text(json.dumps(label, ensure_ascii=False), encoding="utf-8")
        paths.append(path)
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (load-independent cost)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def baseline(paths: list[Path]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), cpu_seconds()
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            s = SIZE / max(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
            canvas = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
            canvas.paste(im, ((SIZE - im.width) // 2, (SIZE - im.height) // 2))
            canvas.save(io.BytesIO(), "JPEG", quality=95)
    return len(paths) / (time.perf_counter() - start), len(paths) / (cpu_seconds() - cpu)


def run_prepare(src: Path, out: Path, workers: int) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    n = len(list(src.glob("*.jpg")))
    # 8 shards, so that both workers have work (a single shard is processed in-process)
    m = prepare(PrepareConfig(source=src, out=out, workers=workers, image_size=SIZE,
                              shard_size=max(1, n // 8), progress=False))
    elapsed, used = time.perf_counter() - start, cpu_seconds() - cpu
    assert m["samples"] == len(list(src.glob("*.jpg"))), m["skip_reasons"]
    return m["samples"] / elapsed, m["samples"] / used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="number of 800x1067 JPEGs")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        paths = make_dataset(src, args.n)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e3
        results = {"baseline PIL loop": [], "prepare --workers 1": [], "prepare --workers 2": []}
        for _ in range(args.repeats):  # interleaved, so load changes hit all alike
            results["baseline PIL loop"].append(baseline(paths))
            results["prepare --workers 1"].append(run_prepare(src, Path(tmp) / "o1", 1))
            results["prepare --workers 2"].append(run_prepare(src, Path(tmp) / "o2", 2))
    print(f"{args.n} JPEGs {W}x{H} (mean {mb:.0f} KB) -> {SIZE}px pad, JPEG q95; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; best of {args.repeats}")
    print(f"{'':22s} {'images/s':>9s} {'vs base':>8s} {'img/CPU-s':>10s}  wall images/s of each run")
    base = max(r[0] for r in results["baseline PIL loop"])
    for name, values in results.items():
        best = max(r[0] for r in values)
        per_cpu = max(r[1] for r in values)
        runs = ", ".join(f"{r[0]:.1f}" for r in values)
        print(f"{name:22s} {best:9.1f} {best / base:7.2f}x {per_cpu:10.1f}  {runs}")

if __name__ == "__main__":
    main()
