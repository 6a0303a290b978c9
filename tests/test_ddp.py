"""DDP: 2 gloo processes on CPU give the losses of 1 process with the same global batch."""

from __future__ import annotations

import pytest
from conftest import torchrun, write_tiny_tokens

from kodalle_cli.cli import main
from kodalle_cli.train.metrics import read_metrics

COMMON = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16", "--device", "cpu",
          "--workers", "0", "--no-progress", "--lr", "1e-3", "--warmup-steps", "2",
          "--max-steps", "4", "--save-every", "4", "--eval-every", "0", "--sample-every", "0",
          "--log-every", "1"]


def train_losses(run):
    return [r["value"] for r in read_metrics(run / "metrics.csv")
            if r["split"] == "train" and r["metric"] == "loss"]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tiny_klue, tmp_path):
    # one shard: the ranks split it by sample, so rank 0 + rank 1 = the single process's batch
    tokens = write_tiny_tokens(tmp_path / "tokens", tiny_klue, train=48, val=0, shard_size=100)
    args = ["train", "--backbone", str(tiny_klue), "--data", str(tokens), *COMMON]
    main([*args, "--out", str(tmp_path / "one"), "--batch-size", "8"])

    proc = torchrun([*args, "--out", str(tmp_path / "two"), "--batch-size", "4"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 1e-5, (one, two)
    # only rank 0 wrote: one checkpoint, one row per step and metric
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-0000004"]
    state = (tmp_path / "two" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text()
    assert '"world_size": 2' in state
