"""Reversible vs plain DALLE layers: peak training memory and step time at depth 16.

Each measurement is a fresh child process (one arm, one repeat), so the memory of one arm
never hides in the other's high-water mark; the arms alternate (plain, reversible, then
reversible, plain, ...) so a machine that slows down or speeds up affects both alike.

A child builds the model, zero gradients and AdamW's state (one optimizer step on the zero
gradients), then runs ``--steps`` training steps (forward, backward, optimizer step) and
reports the fastest. Memory is what the training steps add on top of the model, its
gradients and AdamW's state:

- CPU: the process's peak resident set (``ru_maxrss``) minus its resident set before the
  first training step. The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc hands
  freed tensors back to the system instead of keeping them (its default raises that threshold
  as large blocks are freed, which would hide activations in the baseline);
- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at that point.

So the number is mostly activation memory (plus the transient gradients of one step), the
part reversible layers make independent of depth.

    .venv/bin/python -m benchmarks.reversible              # depth 16, dim 128, 5 repeats
    .venv/bin/python -m benchmarks.reversible --quick      # a smoke run (depth 4, 1 repeat)
    .venv/bin/python -m benchmarks.reversible --device cuda --dim 512 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ARMS = ("plain", "reversible")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    """One arm, one repeat: {"step_s": [...], "peak_bytes": int}."""
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
    return {"step_s": times, "peak_bytes": peak}


def run_child(args, arm: str) -> dict:
    # -P: benchmarks/ must not shadow the standard library (benchmarks/tokenize.py)
    cmd = [sys.executable, "-P", __file__, "--child", "--arm", arm]
    for name in ("device", "dim", "depth", "heads", "dim_head", "text_seq_len", "fmap",
                 "batch", "text_vocab", "image_vocab", "steps", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    ap.add_argument("--steps", type=int, default=3, help="training steps per child (best kept)")
    ap.add_argument("--repeats", type=int, default=5, help="children per arm")
    ap.add_argument("--threads", type=int, default=torch_threads())
    ap.add_argument("--quick", action="store_true", help="smoke run: depth 4, 1 repeat")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.depth, args.repeats, args.steps, args.fmap, args.batch = 4, 1, 2, 8, 2

    results = {arm: {"step_s": [], "peak_bytes": []} for arm in ARMS}
    for r in range(args.repeats):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:  # interleaved, order alternating
            res = run_child(args, arm)
            results[arm]["step_s"].append(min(res["step_s"]))
            results[arm]["peak_bytes"].append(res["peak_bytes"])
            print(f"repeat {r + 1}/{args.repeats} {arm:10s} step {min(res['step_s']):.3f} s  "
                  f"peak +{res['peak_bytes'] / 2**20:.1f} MiB", flush=True)

    print(f"\ndevice {args.device}, depth {args.depth}, dim {args.dim}, heads {args.heads}x"
          f"{args.dim_head}, sequence {args.text_seq_len}+{args.fmap ** 2}, batch {args.batch}, "
          f"{args.repeats} repeats x {args.steps} steps (best step per child)")
    print(f"{'arm':10s} {'step min':>9s} {'step med':>9s} {'peak min':>10s} {'peak med':>10s}")
    med = {}
    for arm in ARMS:
        s, p = results[arm]["step_s"], results[arm]["peak_bytes"]
        med[arm] = statistics.median(s), statistics.median(p)
        print(f"{arm:10s} {min(s):8.3f}s {med[arm][0]:8.3f}s {min(p) / 2**20:8.1f}Mi "
              f"{med[arm][1] / 2**20:8.1f}Mi")
    print(f"reversible / plain (medians): step time {med['reversible'][0] / med['plain'][0]:.2f}x, "
          f"peak training memory {med['reversible'][1] / med['plain'][1]:.2f}x")


def torch_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


if __name__ == "__main__":
    main()
