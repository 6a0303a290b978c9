"""Training-step throughput: kodalle's DALLE vs dalle-pytorch 1.6.6, same machine and config.

(a) both on precomputed codes; (b) end to end: dalle-pytorch encodes raw images with a VQGAN
every step (as its train_dalle.py does), kodalle reads token shards. Prints samples/s.

    .venv/bin/python benchmarks/train_step.py            # CPU config of the issue
    .venv/bin/python benchmarks/train_step.py --device cuda --dim 1024 --depth 16 \
        --text-seq-len 128 --fmap 16 --batch 40 --text-vocab 32000 --image-vocab 16384
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def timed(step, warmup: int, iters: int, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim-head", type=int, default=64)
    ap.add_argument("--text-seq-len", type=int, default=64)
    ap.add_argument("--fmap", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-vocab", type=int, default=32000)
    ap.add_argument("--image-vocab", type=int, default=1024)
    ap.add_argument("--vqgan-ch", type=int, default=32, help="VQGAN width for (b)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import dalle_pytorch

    from kodalle_cli.model import DALLE
    from kodalle_cli.model.convert import from_dalle_pytorch
    from kodalle_cli.vqgan import VQGAN, VQGANConfig, save_taming_checkpoint

    B, T, N = args.batch, args.text_seq_len, args.fmap**2
    vq = VQGAN(VQGANConfig(n_embed=args.image_vocab, embed_dim=64, ch=args.vqgan_ch,
                           ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(16,),
                           resolution=args.fmap * 16, z_channels=64))
    tmp = Path(tempfile.mkdtemp())
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

    def step_ref(image=codes):
        loss = ref(text, image, return_loss=True)
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    def step_ours(batch=None):
        t, c = (text, codes) if batch is None else (batch["ids"], batch["codes"])
        loss, _ = ours(t, c, return_loss=True)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    print(f"device {device}, dim {args.dim}, depth {args.depth}, heads {args.heads}x"
          f"{args.dim_head}, text {T} + image {N} tokens, batch {B}, text vocab "
          f"{args.text_vocab}, image vocab {args.image_vocab}, torch {torch.__version__}")
    t_ref = timed(step_ref, args.warmup, args.iters, device)
    t_ours = timed(step_ours, args.warmup, args.iters, device)
    print(f"(a) precomputed codes: dalle-pytorch {B / t_ref:.2f} samples/s, kodalle "
          f"{B / t_ours:.2f} samples/s, speed-up {t_ref / t_ours:.2f}x")

    if args.skip_e2e:
        return
    # (b) dalle-pytorch encodes raw images every step; kodalle reads token shards
    from kodalle_cli.data.tokens import TokenBatches, TokenShardsWriter

    with TokenShardsWriter(tmp / "tokens", text_seq_len=T, num_image_tokens=args.image_vocab,
                           image_fmap_size=args.fmap, pad_id=0, tokenizer_hash="bench",
                           vqgan={"hash": "bench"}) as w:
        for i in range(B * 4):
            w.write("train", f"s{i:05d}", text[i % B].cpu().numpy().astype(np.int32),
                    codes[i % B].cpu().numpy(), "caption")
    batches = iter(torch.utils.data.DataLoader(
        TokenBatches(tmp / "tokens", batch_size=B), batch_size=None, num_workers=1))

    def step_ours_e2e():
        batch = next(batches)
        step_ours({k: v.to(device) for k, v in batch.items()})

    t_ref_e2e = timed(lambda: step_ref(images), args.warmup, args.iters, device)
    t_ours_e2e = timed(step_ours_e2e, args.warmup, args.iters, device)
    print(f"(b) end to end: dalle-pytorch (VQGAN encode each step) {B / t_ref_e2e:.2f} "
          f"samples/s, kodalle (token shards) {B / t_ours_e2e:.2f} samples/s, speed-up "
          f"{t_ref_e2e / t_ours_e2e:.2f}x")
    if device.type == "cuda":
        flops = ours.flops_per_token() * B * (T + N) / t_ours
        peak = torch.cuda.get_device_properties(device).name
        print(f"kodalle model FLOP/s {flops / 1e12:.1f} TFLOP/s on {peak}")


if __name__ == "__main__":
    main()
