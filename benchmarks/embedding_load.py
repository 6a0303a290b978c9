"""Getting a klue-roberta-large-sized backbone's two embedding tables: time and memory.

    .venv/bin/python -m benchmarks.embedding_load                 # 5 interleaved runs per arm
    .venv/bin/python -m benchmarks.embedding_load --quick         # smoke run, a tiny model
    .venv/bin/python -m benchmarks.embedding_load --json out.json --cache DIR

The checkpoint has klue/roberta-large's shape (24 layers x 1024, vocab 32000, 514 positions,
random weights), written once into ``--cache`` twice: ``safetensors/`` (``save_pretrained``)
and ``bin/`` (the same state_dict as ``pytorch_model.bin``, as pre-safetensors models ship).

The arms, each run in a fresh Python process (the harness interleaves them):
- ``AutoModel + 2 tables`` (the baseline: what a user writes): ``AutoModel.from_pretrained``,
  then ``get_input_embeddings().weight`` and ``embeddings.position_embeddings.weight``, and
  one read of just those two tensors (a sum; no forward pass);
- ``AutoModel, whole model read``: the same load, then every parameter read once (what
  holding the whole model in memory costs);
- ``kodalle .safetensors``: ``get_backbone(dir).load_embeddings()`` (``safe_open``, the two
  tensors only), then the same read;
- ``kodalle pytorch_model.bin``: the same call on the ``.bin`` copy (a memory-mapped
  ``torch.load(weights_only=True)``, the two tensors copied out), then the same read.

Timed: from the start of the load to the end of the read, inside the child, after its
library imports (torch, transformers, kodalle's backbone module; the same for every arm and
reported as ``imports_s``). Files are in the page cache after the warm-up round, so cold-disk
reads are not measured. Memory, from ``/proc/self/status`` (the high-water mark is reset after
the imports): ``load_mib`` the peak resident memory above the start right after the load,
``used_mib`` the same after the read (memory-mapped pages become resident only when read),
``held_mib`` the bytes of the tensors the arm read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.harness import compare, parser, reporting_command

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path.home() / ".cache" / "kodalle" / "bench-roberta-large"
LARGE = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
             intermediate_size=4096, max_position_embeddings=514)
TINY = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=256, max_position_embeddings=130)
ARMS = {
    "user-tables": "AutoModel + 2 tables",
    "user-whole": "AutoModel, whole model read",
    "kodalle-safetensors": "kodalle .safetensors",
    "kodalle-bin": "kodalle pytorch_model.bin",
}


def build(cache: Path, size: dict) -> tuple[Path, Path]:
    """``cache/safetensors`` and ``cache/bin``: one random RoBERTa saved both ways (once)."""
    safe, binary = cache / "safetensors", cache / "bin"
    if (safe / "model.safetensors").is_file() and (binary / "pytorch_model.bin").is_file():
        return safe, binary
    import torch
    from transformers import RobertaConfig, RobertaModel

    print(f"building a random RoBERTa {size} in {cache} (once)...", file=sys.stderr)
    config = RobertaConfig(**size, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                           type_vocab_size=1)
    torch.manual_seed(0)
    model = RobertaModel(config)
    model.save_pretrained(safe, safe_serialization=True)
    binary.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(binary)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    return safe, binary


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(method: str, path: str) -> None:
    """One load in this (fresh) process; prints the harness's JSON result line."""
    start = time.perf_counter()
    import torch  # noqa: F401
    from transformers import AutoModel
    from transformers.models.roberta import modeling_roberta  # noqa: F401

    from kodalle_cli.backbone import get_backbone

    imports = time.perf_counter() - start
    Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")  # reset VmHWM: imports are not the load
    base = _status_mib("VmRSS")
    start = time.perf_counter()
    if method.startswith("kodalle"):
        emb = get_backbone(path).load_embeddings()
        tensors = [emb.token, emb.position]
    else:
        model = AutoModel.from_pretrained(path)
        tensors = [model.get_input_embeddings().weight,
                   model.embeddings.position_embeddings.weight]
        if method == "user-whole":
            tensors = list(model.parameters())
    load_peak = _status_mib("VmHWM")
    for t in tensors:
        float(t.detach().float().sum())
    seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds, "imports_s": imports, "load_mib": load_peak - base,
        "used_mib": _status_mib("VmHWM") - base,
        "held_mib": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
    }))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help="where the checkpoint is built once (about 2.6 GB: both formats)")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    cache = args.cache / "quick" if args.quick else args.cache
    safe, binary = build(cache, TINY if args.quick else LARGE)
    paths = {"user-tables": safe, "user-whole": safe, "kodalle-safetensors": safe,
             "kodalle-bin": binary}
    arms = [reporting_command(ARMS[m], [sys.executable, "-m", "benchmarks.embedding_load",
                                        "--child", m, str(paths[m])], cwd=ROOT)
            for m in ARMS]
    mib = (safe / "model.safetensors").stat().st_size / 2**20
    result = compare(
        f"embedding tables of a {'tiny' if args.quick else 'klue-roberta-large-sized'} "
        f"checkpoint ({mib:.0f} MiB); one fresh process per run; seconds after the imports",
        arms, args)
    base = result["arms"][0]
    for row in result["arms"][2:]:
        print(f"{row['name']}: {base['median'] / row['median']:.1f}x faster than "
              f"'{base['name']}' (medians); resident memory once read "
              f"{row['measured']['used_mib']['median']:.0f} vs "
              f"{base['measured']['used_mib']['median']:.0f} MiB")


if __name__ == "__main__":
    main()
