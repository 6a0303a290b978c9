"""Time and peak memory to get a klue-roberta-large-sized backbone's embedding tables.

Compares kodalle's safetensors-only path (reads two tensors) with loading the whole model
through ``AutoModel.from_pretrained`` and taking ``get_input_embeddings()``. The checkpoint
has klue/roberta-large's shape (24 layers x 1024, vocab 32000, 514 positions) with random
weights, saved once with ``save_pretrained`` into a cache directory. Each load runs in a
fresh process, after the library imports (timed apart, equal for both). Both methods map
the safetensors file, so pages become resident only when read: "RSS+ load" is the peak RSS
(VmHWM, reset after the imports) above the RSS before the load, right after it; "RSS+ used"
the same after every tensor the method holds has been read once (what using them costs);
"held" the bytes of those tensors (the whole model for ``from_pretrained``).

    python benchmarks/embedding_load.py [--cache DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "kodalle" / "bench-roberta-large"


def build(cache: Path) -> Path:
    if (cache / "model.safetensors").exists():
        return cache
    import torch
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, max_position_embeddings=514, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, type_vocab_size=1,
    )
    torch.manual_seed(0)
    print(f"building a random klue-roberta-large-sized checkpoint in {cache} (once)...")
    RobertaModel(config).save_pretrained(cache, safe_serialization=True)
    return cache


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (VmHWM; unlike ru_maxrss, not inherited)."""
    return _status_mb("VmHWM")


def child(method: str, path: str) -> None:
    # Library imports are the same for both methods and are timed on their own.
    start = time.perf_counter()
    import torch  # noqa: F401
    from transformers import AutoModel
    from transformers.models.roberta import modeling_roberta  # noqa: F401

    from kodalle_cli.backbone import get_backbone

    imports = time.perf_counter() - start
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark after imports
    base = rss_mb()
    start = time.perf_counter()
    if method == "safetensors":
        emb = get_backbone(path).load_embeddings()
        token, position = emb.token, emb.position
    else:
        model = AutoModel.from_pretrained(path)
        token = model.get_input_embeddings().weight.detach()
        position = model.embeddings.position_embeddings.weight.detach()
    tensors = [token, position] if method == "safetensors" else list(model.parameters())
    held = sum(t.numel() * t.element_size() for t in tensors)
    load_peak = peak_rss_mb()
    for t in tensors:  # use them: memory-mapped pages become resident
        float(t.float().sum())
    seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds, "added_mb": load_peak - base, "used_mb": peak_rss_mb() - base, "imports": imports,
        "held_mb": held / 2**20,
        "shapes": [list(token.shape), list(position.shape)],
    }))


def measure(method: str, path: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--child", method, str(path)],
            capture_output=True, text=True, check=True,
        ).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "used_mb": statistics.median(r["used_mb"] for r in runs),
        "added_mb": statistics.median(r["added_mb"] for r in runs),
        "imports": statistics.median(r["imports"] for r in runs),
        "held_mb": runs[0]["held_mb"],
        "shapes": runs[0]["shapes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    path = build(args.cache)
    size_mb = (path / "model.safetensors").stat().st_size / 2**20
    fast = measure("safetensors", path, args.repeats)
    full = measure("full-model", path, args.repeats)
    print(f"checkpoint: {size_mb:.0f} MB safetensors; tables {fast['shapes']}")
    print(f"library imports (torch, transformers, same for both, not in the times below): "
          f"{fast['imports']:.2f} s")
    print(f"{'method':<27}{'seconds':>8}{'RSS+ load MB':>14}{'RSS+ used MB':>14}"
          f"{'held MB':>9}")
    for name, r in (("kodalle safetensors-only", fast), ("AutoModel.from_pretrained", full)):
        print(f"{name:<27}{r['seconds']:>8.3f}{r['added_mb']:>14.0f}{r['used_mb']:>14.0f}"
              f"{r['held_mb']:>9.0f}")
    print(
        f"speed-up {full['seconds'] / fast['seconds']:.1f}x; peak memory once the tensors are "
        f"used {full['used_mb'] / fast['used_mb']:.1f}x less; tensors held "
        f"{full['held_mb'] / fast['held_mb']:.1f}x less"
    )


if __name__ == "__main__":
    main()
