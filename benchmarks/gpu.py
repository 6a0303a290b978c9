"""One GPU, under 5 minutes: KoDALLE-size training and sampling speed, MFU, peak memory.

    .venv/bin/python -m benchmarks.gpu --json gpu.json       # on a machine with a GPU
    .venv/bin/python -m benchmarks.gpu --quick               # smoke run (tiny model, any device)

What it measures (random weights; the speed does not depend on them):
- Training: kodalle's DALLE at KoDALLE's size (dim 1024, depth 16, 16 heads x 64, 128 text +
  256 image tokens, 32000 text / 16384 image vocabulary) with AdamW, bf16 autocast (as
  ``kodalle train --precision bf16``), eager and ``torch.compile`` arms interleaved. Prints
  samples/s and MFU: model FLOPs per sample (6 x parameters x tokens + the attention term,
  as nanoGPT counts them) x samples/s / the card's peak dense bf16 FLOP/s.
- Training with ``--text-encoder contextual``: the same DALLE reading its captions through a
  frozen klue/roberta-large-sized language model (24 layers, 1024 wide, random weights),
  the caption cache emptied before every step (the cost for all-distinct captions; label
  captions mostly hit the cache), beside the tables arm.
- Sampling: 16 images of one caption (cached decoding, top-k 0.9, bf16), against the floor
  set by memory bandwidth: every step reads all weights once, so weight bytes x 256 steps /
  bandwidth is the least time any implementation can take at batch 16.
- Peak memory of each (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import time

import torch

from benchmarks.harness import Arm, compare, parser
from kodalle_cli.model.contextual import ContextualText
from kodalle_cli.model.dalle import DALLE, DALLEConfig
from kodalle_cli.model.sampling import SamplingSettings, generate_codes, row_uniforms

# Peak dense bf16 FLOP/s and memory bandwidth (bytes/s) of the cards this runs on.
CARDS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}


def card_limits(name: str) -> tuple[float | None, float | None]:
    for key, limits in CARDS.items():
        if key in name:
            return limits
    return None, None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_sample(model: DALLE) -> float:
    cfg = model.config
    tokens = cfg.text_seq_len + cfg.image_seq_len
    params = sum(p.numel() for p in model.parameters())
    attention = 12 * cfg.depth * cfg.heads * cfg.dim_head * tokens * tokens
    return 6 * params * tokens + attention


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=40, help="training batch (KoDALLE: 40)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per run")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none (CPU)"
    size = dict(dim=1024, depth=16, heads=16, dim_head=64, text_seq_len=128, image_fmap_size=16,
                num_text_tokens=32000, num_image_tokens=16384)
    if args.quick:
        size = dict(dim=64, depth=2, heads=2, dim_head=32, text_seq_len=8, image_fmap_size=4,
                    num_text_tokens=100, num_image_tokens=64)
        args.batch, args.steps = 2, 2
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() \
        else torch.float32
    cfg = DALLEConfig(**size)
    lm_width, lm_layers = (32, 1) if args.quick else (1024, 24)

    def language_model():
        from transformers import RobertaConfig, RobertaModel

        return RobertaModel(RobertaConfig(
            vocab_size=size["num_text_tokens"], hidden_size=lm_width,
            num_hidden_layers=lm_layers, num_attention_heads=max(lm_width // 64, 1),
            intermediate_size=4 * lm_width, max_position_embeddings=size["text_seq_len"] + 2,
            pad_token_id=1), add_pooling_layer=False)

    torch.manual_seed(0)
    peak_flops, bandwidth = card_limits(gpu)

    # ---- training: eager and compiled, interleaved ----------------------------------------
    def trainer(compiled: bool, contextual: bool = False):
        model = DALLE(DALLEConfig(**size, text_encoder="contextual", text_dim=lm_width)
                      if contextual else cfg).to(device)
        if contextual:
            model.attach_text_encoder(ContextualText(language_model().to(device), pad_id=1))
        step_model = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=3e-5, fused=device.type == "cuda")
        text = torch.randint(0, cfg.num_text_tokens, (args.batch, cfg.text_seq_len), device=device)
        codes = torch.randint(0, cfg.num_image_tokens, (args.batch, cfg.image_seq_len),
                              device=device)

        def run() -> float:
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                if contextual:
                    model.text_encoder.cache.clear()
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss, _ = step_model.loss(text, codes)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync(device)
            return (time.perf_counter() - start) / args.steps

        return model, run

    arms, models = [], {}
    for compiled in (False, True):
        if compiled and device.type != "cuda":  # CPU compile: minutes, and not the question
            continue
        model, run = trainer(compiled)
        name = "train compiled" if compiled else "train eager"
        models[name] = model
        arms.append(Arm(name, run, per=args.batch))
    _, run = trainer(False, contextual=True)
    arms.append(Arm("train eager, contextual (no cache)", run, per=args.batch))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = compare(f"training step, {dtype} autocast, batch {args.batch}; GPU: {gpu}", arms,
                     args, unit="s/step")
    flops = flops_per_sample(next(iter(models.values())))
    for row in result["arms"]:
        samples_per_s = row["rate_median"]
        mfu = flops * samples_per_s / peak_flops if peak_flops else None
        print(f"{row['name']}: {samples_per_s:.1f} samples/s, "
              f"{flops * samples_per_s / 1e12:.1f} TFLOP/s model FLOPs"
              + (f", MFU {mfu:.1%} of {peak_flops / 1e12:.0f} TFLOP/s" if mfu else ""))
    if device.type == "cuda":
        print(f"training peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
              f"(both arms alive)")
    del models, arms

    # ---- sampling: 16 images against the bandwidth floor ---------------------------------
    model = DALLE(cfg).to(device, dtype).eval()
    images = 16
    text = torch.randint(0, cfg.num_text_tokens, (images, cfg.text_seq_len), device=device)
    settings = SamplingSettings(top_k=0.9).validate()
    uniforms = torch.stack([row_uniforms(0, 0, i, cfg.image_seq_len) for i in range(images)])
    uniforms = uniforms.to(device)

    def sample() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            generate_codes(model, text, uniforms, settings)
        sync(device)
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = compare(f"sampling {images} images ({cfg.image_seq_len} steps, {dtype}); GPU: {gpu}",
                     [Arm("kodalle generate_codes", sample, per=images)], args)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    median = result["arms"][0]["median"]
    if bandwidth:
        floor = weight_bytes * cfg.image_seq_len / bandwidth
        print(f"bandwidth floor {floor:.3f} s ({weight_bytes / 2**20:.0f} MiB of weights x "
              f"{cfg.image_seq_len} steps / {bandwidth / 1e12:.2f} TB/s): measured is "
              f"{median / floor:.1f}x the floor")
    if device.type == "cuda":
        print(f"sampling peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
