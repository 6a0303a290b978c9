"""VQGAN encoding, the image half of `kodalle tokenize`: kodalle against taming-transformers.

    .venv/bin/python -m benchmarks.tokenize                  # batches 1 and 16, 5 runs per arm
    .venv/bin/python -m benchmarks.tokenize --quick          # smoke run: a tiny VQGAN
    .venv/bin/python -m benchmarks.tokenize --device cuda --batches 1,32 --json out.json

(Run it with ``-m``: as a script, this file would shadow the standard library's tokenize.)

The KoDALLE-size VQGAN (f16, ch 128, ch_mult 1,1,2,2,4, 16384 codes, embed_dim 256, 256 px;
random weights) encodes random 256x256 images to 16x16 codes. For each batch size, two arms
with the same weights, interleaved:
- ``taming VQModel.encode`` (baseline, the reference package): ``model.encode(2x - 1)``'s
  code indices, under ``torch.inference_mode``;
- ``kodalle VQGAN.encode``: what ``kodalle tokenize`` calls per batch.

Timed: one ``encode`` call of a whole batch (input already in memory; JPEG decoding is not
included). ``per s`` is images/s; ``cpu_s`` the CPU seconds of the call (images per
CPU-second = batch / cpu_s, steadier than the wall clock on a shared machine).
"""

from __future__ import annotations

import torch

from benchmarks.harness import Arm, compare, parser, sync, with_cpu
from kodalle_cli.vqgan import VQGAN, VQGANConfig
from kodalle_cli.vqgan.io import config_to_taming

TINY = dict(n_embed=64, embed_dim=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(), resolution=32, z_channels=8)


def taming_twin(model: VQGAN, device: torch.device):
    """taming's VQModel with the same weights (the loss is not needed to encode)."""
    from taming.main import instantiate_from_config

    cfg = config_to_taming(model.config)["model"]
    cfg["params"]["lossconfig"] = {"target": "torch.nn.Identity"}
    taming = instantiate_from_config(cfg).eval().to(device)
    taming.load_state_dict(model.state_dict(), strict=False)
    return taming


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,16", help="batch sizes, one comparison each")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**TINY) if args.quick else VQGANConfig()).eval().to(device)
    taming = taming_twin(model, device)
    size = model.config.resolution
    params = sum(p.numel() for p in model.parameters()) / 1e6
    for batch in (1, 2) if args.quick else (int(b) for b in args.batches.split(",")):
        images = torch.rand(batch, 3, size, size, device=device)

        def encode(fn, images=images):
            def run():
                with torch.inference_mode():
                    fn(images)
                sync(device)
            return with_cpu(run)

        arms = [
            Arm("taming VQModel.encode", encode(lambda x: taming.encode(x * 2 - 1)[2][2]),
                per=batch),
            Arm("kodalle VQGAN.encode", encode(model.encode), per=batch),
        ]
        compare(f"VQGAN encode ({params:.1f}M params) of {batch} x {size}x{size} images -> "
                f"{model.fmap_size}x{model.fmap_size} codes on {device}; per s = images/s",
                arms, args)


if __name__ == "__main__":
    main()
