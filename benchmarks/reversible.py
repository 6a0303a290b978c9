"""Reversible vs plain DALLE layers: step time and peak training memory at depth 16.

    .venv/bin/python -m benchmarks.reversible              # depth 16, dim 128, 5 runs per arm
    .venv/bin/python -m benchmarks.reversible --quick      # smoke run (depth 4, 64 image tokens)
    .venv/bin/python -m benchmarks.reversible --device cuda --dim 512 --batch 16 --json out.json

Two arms, ``plain`` (baseline) and ``reversible``, interleaved by the harness. Each run is a
fresh child process (one arm), so the memory of one arm never hides in the other's
high-water mark. A child builds the model, zero gradients and AdamW's state (one optimizer
step on the zero gradients), then runs ``--steps`` training steps (forward, backward,
optimizer step). Timed: the fastest of those steps (the child's imports and set-up are not).
Also recorded per run, ``peak_mib``: what the training steps add on top of the model, its
gradients and AdamW's state:

- CPU: the process's peak resident set (``ru_maxrss``) minus its resident set before the
  first training step. The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc hands
  freed tensors back to the system instead of keeping them (its default raises that threshold
  as large blocks are freed, which would hide activations in the baseline);
- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at that point.

So the number is mostly activation memory (plus the transient gradients of one step), the
part reversible layers make independent of depth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from benchmarks.harness import compare, parser, reporting_command

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("plain", "reversible")


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    """One arm, one run: {"seconds": fastest step, "peak_mib": training memory}."""
    import torch

    from kodalle_cli.model import DALLE, DALLEConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = DALLEConfig(num_text_tokens=args.text_vocab, num_image_tokens=args.image_vocab,
                      image_fmap_size=args.fmap, dim=args.dim, depth=args.depth,
                      heads=args.heads, dim_head=args.dim_head, text_seq_len=args.text_seq_len,
                      reversible=args.arm == "reversible")
    model = DALLE(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(2, args.text_vocab, (args.batch, args.text_seq_len), generator=g)
    image = torch.randint(0, args.image_vocab, (args.batch, args.fmap**2), generator=g)
    text, image = text.to(device), image.to(device)

    def step():
        loss, _ = model.loss(text, image)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for p in model.parameters():  # gradients and AdamW's state exist from here on
        p.grad = torch.zeros_like(p)
    opt.step()
    sync()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": min(times), "peak_mib": peak / 2**20}


def arm(args, name: str):
    """The harness arm: one fresh child process per run."""
    cmd = [sys.executable, "-m", "benchmarks.reversible", "--child", "--arm", name]
    for option in ("device", "dim", "depth", "heads", "dim_head", "text_seq_len", "fmap",
                   "batch", "text_vocab", "image_vocab", "steps", "threads"):
        cmd += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return reporting_command(name, cmd, env={"MALLOC_MMAP_THRESHOLD_": "65536"}, cwd=ROOT)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim-head", type=int, default=32)
    ap.add_argument("--text-seq-len", type=int, default=64)
    ap.add_argument("--fmap", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-vocab", type=int, default=1000)
    ap.add_argument("--image-vocab", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="training steps per child (fastest kept)")
    ap.add_argument("--threads", type=int, default=torch_threads())
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.depth, args.steps, args.fmap, args.batch = 4, 2, 8, 2
    result = compare(
        f"training step, plain vs reversible: {args.device}, depth {args.depth}, dim {args.dim}, "
        f"heads {args.heads}x{args.dim_head}, sequence {args.text_seq_len}+{args.fmap ** 2}, "
        f"batch {args.batch}, {args.threads} threads; time: fastest of {args.steps} steps per "
        "child; peak_mib: memory the steps add", [arm(args, name) for name in ARMS], args,
        unit="s/step")
    plain, rev = (row["measured"]["peak_mib"]["median"] for row in result["arms"])
    print(f"reversible / plain (medians): step time {result['arms'][1]['ratio_to_first']:.2f}x, "
          f"peak training memory {rev / plain:.2f}x")


def torch_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


if __name__ == "__main__":
    main()
