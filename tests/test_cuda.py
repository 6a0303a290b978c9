"""The GPU paths: bf16 autocast, fp16 with its gradient scaler, torch.compile, CUDA sampling.

They run where CUDA is present (the GPU machine: `pytest tests/test_cuda.py`) and skip with
their reason elsewhere. Each trains the tiny DALLE through the real command and checks what
a user relies on: the loss is finite and falls, a resumed run equals an uninterrupted one,
and sampling on the GPU gives the same codes for the same seed.
"""

from __future__ import annotations

import pytest
import torch

from kodalle_cli.cli import main
from kodalle_cli.runs import load_run
from kodalle_cli.train.metrics import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (runs on the GPU machine)")

TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16", "--device", "cuda",
        "--workers", "0", "--no-progress", "--lr", "3e-3", "--warmup-steps", "5",
        "--batch-size", "8", "--sample-every", "0", "--eval-every", "20"]


def train(data, out, *extra, steps=40):
    backbone, tokens, _vqgan = data
    main(["train", "--backbone", str(backbone), "--data", str(tokens), "--out", str(out),
          *TINY, "--max-steps", str(steps), "--save-every", "20", *extra])


def train_losses(run):
    return [r["value"] for r in read_metrics(run / "metrics.csv")
            if r["split"] == "train" and r["metric"] == "loss"]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_each_precision_learns_and_resumes_exactly(tiny_dalle_data, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    whole = tmp_path / "whole"
    train(tiny_dalle_data, whole, "--precision", precision)
    losses = train_losses(whole)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    halves = tmp_path / "halves"
    train(tiny_dalle_data, halves, "--precision", precision, steps=20)
    train(tiny_dalle_data, halves, "--precision", precision, "--resume")
    a, b = load_run(whole, with_vqgan=False).model, load_run(halves, with_vqgan=False).model
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_compile_trains_like_eager(tiny_dalle_data, tmp_path):
    train(tiny_dalle_data, tmp_path / "eager", "--precision", "bf16", steps=20)
    train(tiny_dalle_data, tmp_path / "compiled", "--precision", "bf16", "--compile", steps=20)
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert abs(eager[-1] - compiled[-1]) < 0.05 * abs(eager[-1])


def test_cuda_sampling_is_seeded(tiny_dalle_data, tmp_path):
    from kodalle_cli.configs import SampleConfig
    from kodalle_cli.sample import sample

    train(tiny_dalle_data, tmp_path / "run", "--precision", "bf16", steps=20)
    caption = ["상의에서 색상은 레드이다."]
    runs = [sample(SampleConfig(caption, n=4, seed=7, checkpoint=tmp_path / "run", out=None,
                                device="cuda", progress=False)) for _ in range(2)]
    assert torch.equal(runs[0][0].codes, runs[1][0].codes)


@pytest.mark.parametrize("mode", ["plain", "reversible", "checkpointing"])
def test_memory_estimate_matches_max_memory_allocated(mode):
    """`kodalle plan`'s memory per GPU against the CUDA allocator's peak over two bf16
    training steps (the second holds AdamW's state), within 25%."""
    from kodalle_cli import plan
    from kodalle_cli.model import DALLE, DALLEConfig

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = DALLEConfig(num_text_tokens=8000, num_image_tokens=1024, image_fmap_size=16,
                      dim=512, depth=6, heads=8, dim_head=64, text_seq_len=64,
                      reversible=mode == "reversible")
    cuda, batch = torch.device("cuda"), 16
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = DALLE(cfg).to(cuda).train()
    model.grad_checkpointing = mode == "checkpointing"
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    text = torch.randint(2, cfg.num_text_tokens, (batch, cfg.text_seq_len), device=cuda)
    codes = torch.randint(0, cfg.num_image_tokens, (batch, cfg.image_seq_len), device=cuda)
    for _ in range(2):
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = model(text, codes, return_loss=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() - base
    estimate = plan.memory(cfg, batch, "bf16", reversible=mode == "reversible",
                           checkpointing=mode == "checkpointing").total
    print(f"{mode}: estimate {estimate / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB")
    assert 0.75 <= estimate / peak <= 1.25
