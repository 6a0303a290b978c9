"""Images/s of VQGAN encoding (the image half of `kodalle tokenize`).

The KoDALLE-size VQGAN (f16, ch 128, ch_mult 1,1,2,2,4, 16384 codes, 256 px; random
weights) encodes 256x256 images at batch 1 and 16. With ``--compare-taming`` the same
weights also run through taming-transformers' VQModel.encode (the reference package).
Prints wall-clock images/s and images per CPU-second of this process.

    .venv/bin/python benchmarks/tokenize.py [--device cpu|cuda] [--repeats 2] [--compare-taming]
"""

from __future__ import annotations

import os
import sys

# this file is named like the stdlib's tokenize module: keep its folder off the import path
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from kodalle_cli.vqgan import VQGAN, VQGANConfig  # noqa: E402


def measure(fn, images: torch.Tensor, repeats: int, device: torch.device) -> tuple[list, float]:
    fn(images[:1])  # warm-up
    walls, cpu0 = [], time.process_time()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    return walls, time.process_time() - cpu0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--compare-taming", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig()).eval().to(device)
    runs = [("kodalle VQGAN.encode", lambda x: model.encode(x))]
    if args.compare_taming:
        from taming.main import instantiate_from_config

        from kodalle_cli.vqgan.io import config_to_taming

        cfg = config_to_taming(model.config)["model"]
        cfg["params"]["lossconfig"] = {"target": "torch.nn.Identity"}
        taming = instantiate_from_config(cfg).eval().to(device)
        taming.load_state_dict(model.state_dict(), strict=False)

        def taming_encode(x):
            with torch.inference_mode():
                return taming.encode(x.to(device) * 2 - 1)[2][2].view(len(x), -1)

        runs.append(("taming VQModel.encode", taming_encode))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"KoDALLE-size VQGAN ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"256x256 -> 16x16 codes; device {device}; torch threads {torch.get_num_threads()}; "
          f"load average {load:.1f}; best of {args.repeats}")
    print(f"{'':24}{'batch':>6}{'images/s':>10}{'img/CPU-s':>11}  wall s per batch")
    for batch in (int(b) for b in args.batches.split(",")):
        images = torch.rand(batch, 3, 256, 256, device=device)
        for name, fn in runs:
            walls, cpu = measure(fn, images, args.repeats, device)
            best = min(walls)
            print(f"{name:24}{batch:>6}{batch / best:>10.2f}{batch * len(walls) / cpu:>11.2f}  "
                  + ", ".join(f"{w:.2f}" for w in walls))


if __name__ == "__main__":
    main()
