"""The check of the token shards that `kodalle train` runs before its first step, cold and
warm (cached in the run directory, see ``kodalle_cli.data.tokens.check_shards``).

    .venv/bin/python -m benchmarks.shard_check                # 800k samples, 5 runs per arm
    .venv/bin/python -m benchmarks.shard_check --quick        # smoke run: 20k samples
    .venv/bin/python -m benchmarks.shard_check --samples 200000 --json out.json

Synthetic token shards like K-Fashion's at full size: ``--samples`` samples (default
800,000) in shards of 10,000, text_seq_len 64, a 16x16 grid of a 16384-entry codebook, one
bad sample per shard (a code outside the codebook). One shard is written with
:class:`TokenShardsWriter`; the others are hard links to it under their own names (so the
disk holds one shard; each is read through the page cache like a recently written shard),
and the manifest lists them all. Two arms, interleaved:

- ``cold``: ``--check-shards new`` with no cache yet (what a first start reads: every
  sample), the same as ``full``;
- ``warm``: ``--check-shards new`` with the cache a previous start left (a restart or
  resume: one ``stat`` per shard, nothing read).

Timed: one ``check_shards`` call. ``per s`` is samples/s. Target: warm < 5 s at 800k.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import Arm, compare, parser
from kodalle_cli.atomic import write_json_atomic
from kodalle_cli.data import tokens as token_shards

SHARD = 10_000
TEXT, GRID, CODES, VOCAB = 64, 16, 16384, 32000


def build(root: Path, samples: int) -> Path:
    """``samples`` samples in hard-linked shards of up to SHARD, and their manifest."""
    per = min(SHARD, samples)
    rng = np.random.default_rng(0)
    with token_shards.TokenShardsWriter(
            # one entry more while writing: the writer refuses codes outside its codebook
            root, text_seq_len=TEXT, num_image_tokens=CODES + 1, image_fmap_size=GRID, pad_id=1,
            tokenizer_hash="sha256:bench", vqgan={"hash": "sha256:bench"},
            shard_size=per) as writer:
        for i in range(per):
            codes = rng.integers(0, CODES, GRID * GRID)
            if i == per // 2:
                codes[0] = CODES  # one code outside the codebook: a bad sample per shard
            writer.write("train", f"s{i:07d}", rng.integers(2, VOCAB, TEXT), codes,
                         "synthetic caption")
    manifest = token_shards.read_manifest(root)
    manifest["num_image_tokens"] = CODES
    (first,) = manifest["splits"]["train"]["shards"]
    listed = [first]
    for n in range(1, -(-samples // per)):
        name = f"train-{n:06d}.tar"
        os.link(root / first["name"], root / name)
        listed.append({**first, "name": name})
    manifest["splits"]["train"]["shards"] = listed
    manifest["splits"]["train"]["count"] = per * len(listed)
    write_json_atomic(root / token_shards.MANIFEST, manifest)
    return root


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--samples", type=int, default=800_000)
    ap.add_argument("--dir", type=Path, default=None, help="where to build (default: a temp dir)")
    args = ap.parse_args()
    samples = 20_000 if args.quick and args.samples == 800_000 else args.samples
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = build(Path(tmp) / "tokens", samples)
        cache = Path(tmp) / "run" / token_shards.CHECK_CACHE
        cache.parent.mkdir()

        def check() -> float:
            start = time.perf_counter()
            found = token_shards.check_shards(root, num_text_tokens=VOCAB, splits=("train",),
                                              mode="new", cache=cache, max_bad_fraction=0.01,
                                              report=lambda message: None)
            seconds = time.perf_counter() - start
            assert found["train"].good + len(found["train"].bad) == samples
            return seconds

        def cold() -> float:
            cache.unlink(missing_ok=True)
            return check()

        def warm() -> float:
            if not cache.is_file():
                check()  # untimed: the start before this one
            return check()

        compare(f"token-shard check before training, {samples:,} samples in "
                f"{-(-samples // SHARD)} shards",
                [Arm("cold (no cache)", cold, per=samples),
                 Arm("warm (restart, cache)", warm, per=samples)], args, unit="s",
                note="hard-linked shards read through the page cache")


if __name__ == "__main__":
    main()
