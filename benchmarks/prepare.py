"""`kodalle prepare` against plain PIL loops: images/s for 800x1067 JPEGs -> 256 px samples.

    .venv/bin/python -m benchmarks.prepare                # 400 JPEGs, 5 interleaved runs per arm
    .venv/bin/python -m benchmarks.prepare --quick        # smoke run: 16 JPEGs
    .venv/bin/python -m benchmarks.prepare --n 400 --json out.json

The input: ``--n`` generated photo-like 800x1067 JPEGs (quality 90, about 230 KB each) with
K-Fashion label JSONs, written once into a temporary folder. The arms, interleaved:
- ``PIL loop`` (baseline): open, convert to RGB, LANCZOS resize with the aspect kept, paste
  on a white 256x256 canvas, save JPEG q95 to memory (no labels, no tar);
- ``PIL loop + draft``: the same with one more line, ``im.draft("RGB", (w, h))`` for the size
  it is resized to, so PIL decodes the JPEG at a reduced scale (1/4 here): what a competent
  user writes. The gain of ``prepare`` over this arm is the pipeline's own;
- ``prepare --workers 1`` and ``--workers 2``: the whole ``prepare()`` call into 8 shards
  (scan, label parsing, captions, worker start-up, decode with draft, resize, tar writing,
  stats and manifest), into an emptied output folder (emptying it is not timed).

Timed: wall seconds of each arm's whole loop or call; ``per s`` is images per second.
``cpu_s`` is the CPU time of this process and its worker processes during the run (images
per CPU-second = n / cpu_s), which the machine's load changes much less than the wall clock.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.harness import Arm, compare, parser, with_cpu
from kodalle_cli.data.prepare import PrepareConfig, prepare
from kodalle_cli.data.synthetic import COLOURS, Garment, garment_label

W, H, SIZE = 800, 1067, 256


def photo_like(rng: np.random.Generator) -> Image.Image:
    """A smooth random image with fine noise: compresses like a photograph."""
    low = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((W, H), Image.Resampling.BICUBIC)
    arr = np.asarray(im, np.int16) + rng.integers(-12, 13, (H, W, 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_dataset(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    colours = list(COLOURS)
    for i in range(n):
        path = root / f"{i:06d}.jpg"
        photo_like(rng).save(path, quality=90)
        label = garment_label(Garment(colours[i % len(colours)], "티셔츠", sleeve="반팔"), i,
                              path.name, W, (150, 200, 500, 700))
        label["이미지 정보"]["이미지 높이"] = H
        path.with_suffix(".json").write_text(json.dumps(label, ensure_ascii=False),
                                             encoding="utf-8")
        paths.append(path)
    return paths


def pil_loop(paths: list[Path], draft: bool) -> None:
    for p in paths:
        with Image.open(p) as im:
            s = SIZE / max(im.size)
            size = (round(im.width * s), round(im.height * s))
            if draft:
                im.draft("RGB", size)  # the one line: decode at the smallest scale >= size
            im = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            canvas = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
            canvas.paste(im, ((SIZE - im.width) // 2, (SIZE - im.height) // 2))
            canvas.save(io.BytesIO(), "JPEG", quality=95)


def run_prepare(src: Path, out: Path, workers: int, n: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    manifest = {}

    def call() -> None:
        # 8 shards, so that both workers have work (a single shard is processed in-process)
        manifest.update(prepare(PrepareConfig(source=src, out=out, workers=workers,
                                              image_size=SIZE, shard_size=max(1, n // 8),
                                              progress=False)))

    result = with_cpu(call)()
    assert manifest["samples"] == n, manifest.get("skip_reasons")
    return result


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=400, help="number of 800x1067 JPEGs")
    args = ap.parse_args()
    n = 16 if args.quick else args.n
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        paths = make_dataset(src, n)
        kb = sum(p.stat().st_size for p in paths) / n / 1e3
        arms = [
            Arm("PIL loop", with_cpu(lambda: pil_loop(paths, draft=False)), per=n),
            Arm("PIL loop + draft", with_cpu(lambda: pil_loop(paths, draft=True)), per=n),
            *(Arm(f"prepare --workers {w}",
                  lambda w=w: run_prepare(src, Path(tmp) / f"out{w}", w, n), per=n)
              for w in (1, 2)),
        ]
        compare(f"{n} JPEGs {W}x{H} (mean {kb:.0f} KB) -> {SIZE} px pad, JPEG q95; "
                "per s = images/s; images per CPU-second = n / cpu_s", arms, args)


if __name__ == "__main__":
    main()
