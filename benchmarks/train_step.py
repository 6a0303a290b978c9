"""Training-step throughput: kodalle's DALLE against dalle-pytorch 1.6.6, same weights.

    .venv/bin/python -m benchmarks.train_step             # the small CPU config, 5 runs per arm
    .venv/bin/python -m benchmarks.train_step --quick     # smoke run: a tiny model
    .venv/bin/python -m benchmarks.train_step --json out.json --steps 3

Config (the issue's CPU config): dim 256, depth 4, 4 heads x 64, text 64 + image 256 tokens,
batch 8, text vocab 32000 (klue's size), image vocab 1024; stock dalle-pytorch layers (full
attention, no rotary, no token shift), its random weights converted into kodalle's DALLE with
``from_dalle_pytorch``. The VQGAN is KoDALLE's (f16, ch 128, ch_mult 1,1,2,2,4, 2 res blocks,
256 px; ``--vqgan-ch`` narrows it) with a 1024-entry codebook, random weights; dalle-pytorch
reads it through its ``VQGanVAE`` from a taming checkpoint of the same weights.

A run of an arm is ``--steps`` training steps (forward, backward, one AdamW step each); the
time is seconds per step, ``per s`` samples/s. Two comparisons, arms interleaved in each:
(a) precomputed codes: dalle-pytorch ``DALLE(text, codes, return_loss=True)`` against
    kodalle's ``DALLE(text, codes, return_loss=True)``;
(b) end to end: dalle-pytorch on raw 256 px images (its VAE encodes them every step, as its
    train_dalle.py does) against kodalle reading token shards (``TokenBatches`` through a
    one-worker DataLoader); a third arm times the one-off cost kodalle pays instead,
    ``kodalle tokenize``'s image half: ``VQGAN.encode`` of one batch.
From (b) the script prints the epoch count from which kodalle, tokenize included, costs less
than dalle-pytorch: tokenize / (dalle-pytorch step - kodalle step), per batch. Neither side's
JPEG decoding or caption tokenization is counted (dalle-pytorch's loader decodes every epoch,
``kodalle tokenize`` once). GPU numbers (KoDALLE size, MFU): ``benchmarks/gpu.py``.
"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import Arm, compare, parser, sync
from kodalle_cli.data.tokens import TokenBatches, TokenShardsWriter
from kodalle_cli.model import DALLE
from kodalle_cli.model.convert import from_dalle_pytorch
from kodalle_cli.vqgan import VQGAN, VQGANConfig, save_taming_checkpoint

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import dalle_pytorch

QUICK = dict(dim=32, depth=1, heads=2, dim_head=16, text_seq_len=8, fmap=16, batch=2,
             text_vocab=100, image_vocab=64, vqgan_ch=32, steps=1)


def per_step(step, steps: int, device) -> float:
    """Seconds per step over ``steps`` steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim-head", type=int, default=64)
    ap.add_argument("--text-seq-len", type=int, default=64)
    ap.add_argument("--fmap", type=int, default=16, help="image code grid side (16: 256 px)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-vocab", type=int, default=32000)
    ap.add_argument("--image-vocab", type=int, default=1024)
    ap.add_argument("--vqgan-ch", type=int, default=128, help="VQGAN width (KoDALLE: 128)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per timed run")
    args = ap.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    device = torch.device(args.device)
    torch.manual_seed(0)
    B, T, N = args.batch, args.text_seq_len, args.fmap**2

    tmp = Path(tempfile.mkdtemp(prefix="kodalle-bench-"))
    atexit.register(shutil.rmtree, tmp, True)
    vq = VQGAN(VQGANConfig(n_embed=args.image_vocab, ch=args.vqgan_ch, resolution=args.fmap * 16,
                           num_res_blocks=1 if args.quick else 2)).eval().to(device)
    ckpt = save_taming_checkpoint(vq, tmp / "vqgan.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = dalle_pytorch.VQGanVAE(str(ckpt), str(ckpt.with_suffix(".yaml")))
    ref = dalle_pytorch.DALLE(
        dim=args.dim, vae=vae, num_text_tokens=args.text_vocab, text_seq_len=T,
        depth=args.depth, heads=args.heads, dim_head=args.dim_head, rotary_emb=False,
        shift_tokens=False, attn_types=("full",),
    ).to(device)
    cfg, sd = from_dalle_pytorch(ref.state_dict(), {"heads": args.heads, "text_seq_len": T})
    ours = DALLE(cfg).to(device)
    ours.load_state_dict(sd)

    text = torch.randint(1, args.text_vocab, (B, T), device=device)
    codes = torch.randint(0, args.image_vocab, (B, N), device=device)
    images = torch.rand(B, 3, args.fmap * 16, args.fmap * 16, device=device)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)

    def step_ref(image) -> None:
        ref(text, image, return_loss=True).backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    def step_ours(ids, image_codes) -> None:
        loss, _ = ours(ids, image_codes, return_loss=True)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    # token shards for (b): what `kodalle tokenize` writes; TokenBatches streams them forever
    with TokenShardsWriter(tmp / "tokens", text_seq_len=T, num_image_tokens=args.image_vocab,
                           image_fmap_size=args.fmap, pad_id=0, tokenizer_hash="bench",
                           vqgan={"hash": "bench"}) as w:
        for i in range(B * 4):
            w.write("train", f"s{i:05d}", text[i % B].cpu().numpy().astype(np.int32),
                    codes[i % B].cpu().numpy(), "caption")
    batches = iter(torch.utils.data.DataLoader(
        TokenBatches(tmp / "tokens", batch_size=B), batch_size=None, num_workers=1))

    def step_ours_shards() -> None:
        batch = next(batches)
        step_ours(batch["ids"].to(device), batch["codes"].to(device))

    def tokenize_once() -> float:
        sync(device)
        start = time.perf_counter()
        vq.encode(images)
        sync(device)
        return time.perf_counter() - start

    size = (f"dim {args.dim}, depth {args.depth}, heads {args.heads}x{args.dim_head}, text {T} "
            f"+ image {N} tokens, batch {B}, vocab {args.text_vocab} text / {args.image_vocab} "
            f"image, {device}; seconds per step, per s = samples/s")
    steps = args.steps
    compare(f"(a) training step on precomputed codes; {size}", [
        Arm("dalle-pytorch", lambda: per_step(lambda: step_ref(codes), steps, device), per=B),
        Arm("kodalle", lambda: per_step(lambda: step_ours(text, codes), steps, device), per=B),
    ], args, unit="s/step")
    result = compare(f"(b) end to end (VQGAN ch {args.vqgan_ch}); {size}", [
        Arm("dalle-pytorch, VQGAN encode every step",
            lambda: per_step(lambda: step_ref(images), steps, device), per=B),
        Arm("kodalle, token shards", lambda: per_step(step_ours_shards, steps, device), per=B),
        Arm("one-off: kodalle tokenize's VQGAN.encode", tokenize_once, per=B),
    ], args, unit="s/step")
    dp, ours_step, tok = (row["median"] for row in result["arms"])
    print(f"one-off tokenize: {tok / B:.3g} s per sample ({tok / ours_step:.2g} kodalle steps' "
          f"worth); per epoch and sample: dalle-pytorch {dp / B:.3g} s, kodalle "
          f"{ours_step / B:.3g} s")
    if dp > ours_step:
        even = tok / (dp - ours_step)
        print(f"break-even: kodalle end to end, tokenize included, costs less than dalle-pytorch "
              f"from epoch {math.floor(even) + 1} on (tokenize / (dalle-pytorch step - kodalle "
              f"step) = {even:.2f} epochs)")
    else:
        print("break-even: none (kodalle's step is not faster than dalle-pytorch's here)")


if __name__ == "__main__":
    main()
