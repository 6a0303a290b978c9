"""Images/s of ``kodalle sample``'s decoding loop vs dalle-pytorch 1.6.6 ``generate_images``.

Same machine, same process, same weights: a stock dalle-pytorch DALLE (full attention, no
rotary, no token shift) with random weights is converted into kodalle's DALLE with
``kodalle_cli.model.convert.from_dalle_pytorch``; the logits of both are compared first.

What is timed, for n images of one caption (one batch of n rows):
  dalle-pytorch: ``generate_images(text, filter_thres=0.9, cond_scale=S, use_cache=C)``, which
    samples the 256 image tokens and decodes them with its VAE;
  kodalle: ``generate_codes`` (preallocated KV cache, SDPA, batched guidance, top-k 0.9 as
    filter_thres) followed by the SAME VAE's ``decode``.
The VAE is a small dalle-pytorch DiscreteVAE (64x64 pixels, 16x16 codes) shared by both sides,
so decoding costs the same on both and the difference is token generation.

    .venv/bin/python benchmarks/sample.py                 # dim 256, depth 4, 64 + 256 tokens
    .venv/bin/python benchmarks/sample.py --kodalle-size  # GPU: 16 layers, dim 1024, 128 + 256

``--kodalle-size`` times kodalle alone (bf16 on GPUs that have it) for 16 images and compares
with the memory-bandwidth floor: weight bytes x 256 steps / bandwidth.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import dalle_pytorch

from kodalle_cli.model.convert import from_dalle_pytorch
from kodalle_cli.model.dalle import DALLE, DALLEConfig
from kodalle_cli.model.sampling import SamplingSettings, generate_codes, row_uniforms


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_pair(dim, depth, heads, dim_head, text_seq_len, num_text, num_image, image_size):
    torch.manual_seed(0)
    vae = dalle_pytorch.DiscreteVAE(image_size=image_size, num_tokens=num_image, codebook_dim=64,
                                    num_layers=2, hidden_dim=16)
    ref = dalle_pytorch.DALLE(
        dim=dim, vae=vae, num_text_tokens=num_text, text_seq_len=text_seq_len, depth=depth,
        heads=heads, dim_head=dim_head, rotary_emb=False, shift_tokens=False,
        attn_types=("full",),
    ).eval()
    cfg, sd = from_dalle_pytorch(ref.state_dict(), {"heads": heads, "text_seq_len": text_seq_len})
    ours = DALLE(cfg).eval()
    ours.load_state_dict(sd)
    return ref, ours, vae


def timed(fn, device, repeat):
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def compare(args):
    device = torch.device("cpu")
    ref, ours, vae = build_pair(args.dim, args.depth, args.heads, args.dim_head,
                                args.text_seq_len, args.num_text, args.num_image, 64)
    n = args.n
    text = torch.randint(1, args.num_text, (1, args.text_seq_len)).repeat(n, 1)
    text[:, args.text_seq_len // 2 :] = 0  # padding (dalle-pytorch's pad id 0)
    codes = torch.randint(0, args.num_image, (n, 100))
    with torch.no_grad():
        diff = (ref(text, codes) - ours(text, codes)).abs().max().item()
    print(f"model: dim {args.dim}, depth {args.depth}, {args.heads}x{args.dim_head} heads, "
          f"{args.text_seq_len} text + {ours.image_seq_len} image tokens, vocab "
          f"{args.num_text} text / {args.num_image} image; "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters; "
          f"max |logit diff| dalle-pytorch vs kodalle: {diff:.2e}")
    print(f"n = {n} images of one caption, one batch, CPU threads {torch.get_num_threads()}, "
          f"best of {args.repeat}")
    results = {}
    for cond_scale in (1.0, 3.0):
        settings = SamplingSettings(top_k=0.9, cond_scale=cond_scale)
        uniforms = torch.stack([row_uniforms(0, 0, i, ours.image_seq_len) for i in range(n)])

        def kd(settings=settings, uniforms=uniforms):
            with torch.no_grad():
                return vae.decode(generate_codes(ours, text, uniforms, settings))

        secs, _ = timed(kd, device, args.repeat)
        results[("kodalle", cond_scale)] = secs
        print(f"kodalle generate_codes + decode cond_scale {cond_scale:g}: {secs:.2f} s, "
              f"{n / secs:.2f} images/s", flush=True)
        for use_cache in (False, True):
            def dp(cond_scale=cond_scale, use_cache=use_cache):
                with torch.no_grad():
                    return ref.generate_images(text, filter_thres=0.9, cond_scale=cond_scale,
                                               use_cache=use_cache)

            secs, _ = timed(dp, device, args.repeat)
            note = " (ignored: recomputes)" if use_cache and cond_scale == 1 else ""
            results[("dalle-pytorch", cond_scale, use_cache)] = secs
            print(f"dalle-pytorch generate_images cond_scale {cond_scale:g} use_cache "
                  f"{use_cache}{note}: {secs:.2f} s, {n / secs:.2f} images/s", flush=True)

        secs = results[("kodalle", cond_scale)]
        base = results[("dalle-pytorch", cond_scale, False)]
        cached = results[("dalle-pytorch", cond_scale, True)]
        print(f"  => kodalle cond_scale {cond_scale:g}: {base / secs:.1f}x dalle-pytorch default "
              f"(use_cache=False), {cached / secs:.1f}x its use_cache=True path", flush=True)


def kodalle_size(args):
    from kodalle_cli.device import pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype("auto", device)
    cfg = DALLEConfig(num_text_tokens=32000, num_image_tokens=16384, image_fmap_size=16,
                      dim=1024, depth=16, heads=8, dim_head=64, text_seq_len=128)
    model = DALLE(cfg).eval().to(device=device, dtype=dtype)
    n = 16
    text = torch.randint(5, 32000, (n, 128), device=device)
    text[:, 40:] = cfg.pad_id
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # the per-step weights actually read: everything but the embedding tables (rows gathered)
    read_bytes = weight_bytes - sum(
        p.numel() * p.element_size()
        for p in (model.text_emb.weight, model.text_pos_emb.weight, model.image_emb.weight))
    print(f"KoDALLE-size model on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"{dtype}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{read_bytes / 1e9:.2f} GB read per step")
    for cond_scale in (1.0, 3.0):
        settings = SamplingSettings(top_k=0.9, cond_scale=cond_scale)
        uniforms = torch.stack([row_uniforms(0, 0, i, 256) for i in range(n)])
        secs, _ = timed(lambda s=settings, u=uniforms: generate_codes(model, text, u, s),
                        device, args.repeat)
        floor = read_bytes * 256 / (args.bandwidth_gbs * 1e9)
        print(f"cond_scale {cond_scale:g}: {secs:.2f} s for {n} images ({n / secs:.1f} "
              f"images/s); bandwidth floor {floor:.2f} s at {args.bandwidth_gbs:g} GB/s "
              f"({floor / secs:.0%} of it reached)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--text-seq-len", type=int, default=64)
    p.add_argument("--num-text", type=int, default=10000)
    p.add_argument("--num-image", type=int, default=1024)
    p.add_argument("-n", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 on a shared, busy machine)")
    p.add_argument("--kodalle-size", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--bandwidth-gbs", type=float, default=3350.0,
                   help="GPU memory bandwidth for the floor (H100 SXM: 3350, A100 80GB: 2039)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kodalle_size:
        kodalle_size(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
