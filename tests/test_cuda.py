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
