"""Sampling: `kodalle sample` against dalle-pytorch 1.6.6, as whole processes and in-process.

    .venv/bin/python -m benchmarks.sample                 # the small config, 5 runs per arm
    .venv/bin/python -m benchmarks.sample --quick         # smoke run: a tiny model, n 2
    .venv/bin/python -m benchmarks.sample --cond-scale 3 --vqgan-ch 128 --json out.json

The files, written once into a temporary folder, are the same for both sides:
- ``dalle.pt``: a DALLE in dalle-pytorch's ``.pt`` format and layout (unique padding
  tokens, pad id 0), written by ``save_dalle_pytorch_checkpoint``; random weights. The small
  config: dim 256, depth 4, 4 heads x 64, 64 text + 256 image tokens, 10000 text / 1024
  image vocabulary, stock layers (full attention, no rotary, no token shift);
- one VQGAN (f16, 256 px, ch ``--vqgan-ch`` (default 32, KoDALLE's is 128), ch_mult
  1,1,2,2,4, 2 res blocks, attention at 16, 1024 codes; random weights), saved for kodalle
  (``save_vqgan``: ``model.safetensors`` + ``config.yaml``) and for dalle-pytorch (a taming
  ``.ckpt`` + ``.yaml`` of the same weights, read by its ``VQGanVAE``);
- a KLUE-like tokenizer (``kodalle_cli.experiments.tiny_backbone.build_klue_like``).

Whole process (one comparison per ``--sizes`` n, default 8 and 32; start-up, imports,
loading, tokenizing, generating, decoding and writing PNGs all timed):
- ``dalle-pytorch script`` (baseline): ``python dalle_pytorch_sample.py ...``, the script in
  ``DALLE_PYTORCH_SCRIPT`` below, what a dalle-pytorch user writes after its generate.py:
  ``torch.load(weights_only=True)``, ``DALLE(vae=VQGanVAE(...), **hparams)``, the caption
  through ``transformers.AutoTokenizer`` (as KoDALLE's notebook does; padded with 0 as
  dalle-pytorch's own tokenizers do), one batch of n through
  ``generate_images(filter_thres=0.9, cond_scale=S, use_cache=True)``, one PNG per image
  (torchvision's ``save_image``);
- ``kodalle sample .pt``: ``.venv/bin/kodalle sample CAPTION --checkpoint dalle.pt --backbone
  DIR --vqgan DIR -n N --batch-size N --seed 0 --device cpu --cond-scale S --out DIR``, which
  also writes ``grid.png``, ``codes.npy`` and ``metadata.json``;
- ``kodalle sample run``: the same, from a run directory holding the same model, tokenizer
  and VQGAN (``runs.save_run``, as ``kodalle train`` leaves one: its tokenizer is read with
  the tokenizers library, without importing transformers).
Each run writes into an emptied folder (emptying it is not timed). Both processes get
``HF_HUB_OFFLINE=1`` and, with ``--threads``, ``OMP_NUM_THREADS``.

In-process (n = ``--in-process-n``, default 8; both sides loaded once, untimed; no files
written): ``generate(...)`` of the same script (tokenize, ``generate_images``, its VAE decode)
against ``kodalle_cli.sample.sample(config, loaded_run)`` (tokenize, cached decoding,
VQGAN decode, PIL images), with the run from ``load_run(dalle.pt, backbone=, vqgan=)``.

What differs: each side decodes with its own VQGAN code (taming's ``VQModel`` in
dalle-pytorch, kodalle's ``VQGAN``; same weights); the random draws differ (same
distribution, top-k 0.9 = ``filter_thres=0.9``). dalle-pytorch 1.6.6 ignores
``use_cache=True`` at ``cond_scale`` 1 (``forward_with_cond_scale`` drops the cache), so at
the default ``--cond-scale 1`` it recomputes the whole sequence at every step; at
``--cond-scale 3`` its cache works and both sides run guidance (two passes per step).
Numbers for KoDALLE's size on a GPU (16 images against the memory-bandwidth floor):
``benchmarks/gpu.py``.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import Arm, command, compare, parser
from kodalle_cli.experiments.tiny_backbone import SAMPLE_CAPTIONS, build_klue_like

CAPTION = SAMPLE_CAPTIONS[2]  # 상의에서 색상은 레드이다. 카테고리는 티셔츠이다. ...
SMALL = dict(dim=256, depth=4, heads=4, dim_head=64, text_seq_len=64, num_text_tokens=10000,
             num_image_tokens=1024)
TINY = dict(dim=32, depth=1, heads=2, dim_head=16, text_seq_len=16, num_text_tokens=600,
            num_image_tokens=64)

DALLE_PYTORCH_SCRIPT = '''\
"""A dalle-pytorch 1.6.6 user's sampling script (written by benchmarks/sample.py)."""
import argparse
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
from dalle_pytorch import DALLE, VQGanVAE  # noqa: E402
from torchvision.utils import save_image  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def load(checkpoint, vqgan_ckpt, vqgan_yaml, tokenizer_dir):
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    dalle = DALLE(vae=VQGanVAE(vqgan_ckpt, vqgan_yaml), **ckpt["hparams"])
    missing, unexpected = dalle.load_state_dict(ckpt["weights"], strict=False)
    assert not unexpected and all(k.startswith("vae.") for k in missing), (missing, unexpected)
    return dalle.eval(), AutoTokenizer.from_pretrained(tokenizer_dir)


def generate(dalle, tokenizer, caption, n, cond_scale):
    ids = tokenizer(caption, truncation=True, max_length=dalle.text_seq_len)["input_ids"]
    text = torch.zeros(n, dalle.text_seq_len, dtype=torch.long)  # dalle-pytorch pads with 0
    text[:, : len(ids)] = torch.tensor(ids)
    with torch.no_grad():
        return dalle.generate_images(text, filter_thres=0.9, cond_scale=cond_scale,
                                     use_cache=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    for name in ("checkpoint", "vqgan_ckpt", "vqgan_yaml", "tokenizer", "caption", "out"):
        ap.add_argument(name)
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--cond-scale", type=float, default=1.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    dalle, tokenizer = load(args.checkpoint, args.vqgan_ckpt, args.vqgan_yaml, args.tokenizer)
    images = generate(dalle, tokenizer, args.caption, args.n, args.cond_scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, out / f"{i:04d}.png")
'''


def build(work: Path, size: dict, vqgan_ch: int, quick: bool) -> dict:
    """The shared files: the .pt, the VQGAN in both formats, the tokenizer, the script."""
    from kodalle_cli.model.convert import save_dalle_pytorch_checkpoint
    from kodalle_cli.model.dalle import DALLE, DALLEConfig
    from kodalle_cli.vqgan import VQGAN, VQGANConfig, save_taming_checkpoint, save_vqgan

    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(n_embed=size["num_image_tokens"], ch=vqgan_ch,
                           num_res_blocks=1 if quick else 2))
    model = DALLE(DALLEConfig(**size, image_fmap_size=vq.fmap_size, unique_pad_tokens=True,
                              pad_id=0))  # dalle-pytorch's layout: its DALLE loads the file
    files = {"pt": work / "dalle.pt", "vqgan": save_vqgan(vq, work / "vqgan"),
             "taming": save_taming_checkpoint(vq, work / "taming" / "vqgan.ckpt"),
             "backbone": build_klue_like(work / "backbone"),
             "script": work / "dalle_pytorch_sample.py"}
    save_dalle_pytorch_checkpoint(model, files["pt"])
    files["script"].write_text(DALLE_PYTORCH_SCRIPT, encoding="utf-8")
    # the same model as a run directory: what `kodalle train` leaves and users sample from
    from kodalle_cli.runs import load_run, save_run

    loaded = load_run(files["pt"], backbone=str(files["backbone"]), vqgan=str(files["vqgan"]))
    files["run"] = save_run(work / "run", loaded.model, loaded.tokenizer, loaded.vqgan,
                            captions=list(SAMPLE_CAPTIONS))
    return files


def emptied(folder: Path):
    return lambda: shutil.rmtree(folder, ignore_errors=True)


def outputs(work: Path, n: int) -> tuple[Path, Path]:
    return work / f"out-dalle-pytorch-{n}", work / f"out-kodalle-{n}"


def whole_process_arms(files: dict, work: Path, n: int, cond_scale: float, env: dict) -> list:
    taming = files["taming"]
    dp_out, kd_out = outputs(work, n)
    kodalle = Path(sys.executable).with_name("kodalle")
    return [
        command("dalle-pytorch script", [
            sys.executable, files["script"], files["pt"], taming, taming.with_suffix(".yaml"),
            files["backbone"], CAPTION, dp_out, "-n", n, "--cond-scale", cond_scale,
        ], env=env, per=n, before=emptied(dp_out)),
        command("kodalle sample .pt", [
            kodalle, "sample", CAPTION, "--checkpoint", files["pt"], "--backbone",
            files["backbone"], "--vqgan", files["vqgan"], "-n", n, "--batch-size", n,
            "--seed", 0, "--device", "cpu", "--cond-scale", cond_scale, "--out", kd_out,
        ], env=env, per=n, before=emptied(kd_out)),
        command("kodalle sample run", [
            kodalle, "sample", CAPTION, "--checkpoint", files["run"], "-n", n,
            "--batch-size", n, "--seed", 0, "--device", "cpu", "--cond-scale", cond_scale,
            "--out", kd_out,
        ], env=env, per=n, before=emptied(kd_out)),
    ]


def in_process_arms(files: dict, n: int, cond_scale: float) -> list:
    from kodalle_cli.runs import load_run
    from kodalle_cli.sample import SampleConfig, sample

    spec = importlib.util.spec_from_file_location("dalle_pytorch_sample", files["script"])
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    taming = files["taming"]
    dalle, tokenizer = script.load(str(files["pt"]), str(taming),
                                   str(taming.with_suffix(".yaml")), str(files["backbone"]))
    run = load_run(files["pt"], backbone=str(files["backbone"]), vqgan=str(files["vqgan"]))
    config = SampleConfig([CAPTION], n=n, out=None, batch_size=n, seed=0, device="cpu",
                          cond_scale=cond_scale, progress=False)

    def dalle_pytorch() -> None:
        script.generate(dalle, tokenizer, CAPTION, n, cond_scale)

    def kodalle() -> None:
        sample(config, run)

    return [Arm("dalle-pytorch generate_images", dalle_pytorch, per=n),
            Arm("kodalle sample()", kodalle, per=n)]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--sizes", default="8,32", help="images per whole-process comparison")
    ap.add_argument("--in-process-n", type=int, default=8, help="0: no in-process comparison")
    ap.add_argument("--cond-scale", type=float, default=1.0, help="both sides (1: no guidance)")
    ap.add_argument("--vqgan-ch", type=int, default=32, help="VQGAN width (KoDALLE: 128)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of both sides (default: torch's own)")
    args = ap.parse_args()
    size, sizes, in_n = SMALL, [int(s) for s in args.sizes.split(",") if s], args.in_process_n
    if args.quick:
        size, sizes, in_n = TINY, [2], min(in_n, 2)
    env = {"HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    desc = (f"dim {size['dim']}, depth {size['depth']}, {size['heads']}x{size['dim_head']} "
            f"heads, {size['text_seq_len']} text + 256 image tokens, VQGAN ch {args.vqgan_ch}, "
            f"top-k 0.9, cond_scale {args.cond_scale:g}, dalle-pytorch use_cache=True"
            + (" (ignored by it at cond_scale 1)" if args.cond_scale == 1 else ""))
    with tempfile.TemporaryDirectory(prefix="kodalle-bench-sample-") as tmp:
        work = Path(tmp)
        files = build(work, size, args.vqgan_ch, args.quick)
        for n in sizes:
            compare(f"whole process, {n} images of one caption, PNGs written; {desc}; "
                    "per s = images/s",
                    whole_process_arms(files, work, n, args.cond_scale, env), args)
            for out in outputs(work, n):  # both really wrote n images
                pngs = list(out.rglob("[0-9]*.png"))
                assert len(pngs) == n, f"{out}: {len(pngs)} PNGs, expected {n}"
        if in_n:
            compare(f"in-process, {in_n} images of one caption, weights already loaded; "
                    f"{desc}; per s = images/s",
                    in_process_arms(files, in_n, args.cond_scale), args)


if __name__ == "__main__":
    main()
