"""--strategy fsdp (FSDP2): 2 gloo processes on CPU give the losses of 1 process with the same
global batch, and a run killed half-way resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import pytest
from conftest import torchrun, write_tiny_tokens
from safetensors.torch import load_file

from kodalle_cli.cli import main
from kodalle_cli.train.metrics import read_metrics

COMMON = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16", "--device", "cpu",
          "--workers", "0", "--no-progress", "--lr", "1e-3", "--warmup-steps", "2",
          "--max-steps", "4", "--save-every", "2", "--keep-last", "0", "--eval-every", "2",
          "--sample-every", "0", "--log-every", "1"]


def rows(run, split, metric="loss"):
    return [r["value"] for r in read_metrics(run / "metrics.csv")
            if r["split"] == split and r["metric"] == metric]


@pytest.mark.slow
def test_fsdp_two_gloo_ranks_match_one_process_and_resume(tiny_klue, tmp_path, capsys):
    # one shard: the ranks split it by sample, so rank 0 + rank 1 = the single process's batch
    tokens = write_tiny_tokens(tmp_path / "tokens", tiny_klue, train=48, val=8, shard_size=100)
    args = ["train", "--backbone", str(tiny_klue), "--data", str(tokens), *COMMON]
    main([*args, "--out", str(tmp_path / "one"), "--batch-size", "8", "--eval-batches", "1"])

    # 2 ranks x 2 micro-batches of 2 (FSDP's no-sync accumulation) = the same global batch
    # (evaluation: the same 8 validation samples, in batches of 2)
    fsdp = [*args, "--strategy", "fsdp", "--batch-size", "2", "--grad-accum", "2",
            "--eval-batches", "4"]
    full = torchrun([*fsdp, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, (full.stdout + full.stderr)[-6000:]
    one, two = rows(tmp_path / "one", "train"), rows(tmp_path / "full", "train")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (one, two)
    # evaluation ran on both ranks (a forward under FSDP is collective); rank 0 wrote it
    val_one, val_two = rows(tmp_path / "one", "val"), rows(tmp_path / "full", "val")
    assert len(val_one) == len(val_two) == 3
    assert val_two == pytest.approx(val_one, rel=1e-5, abs=1e-6)
    # the checkpoint holds the full weights under the plain model's names
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000004"
    full_w = load_file(str(ckpt / "model.safetensors"))
    one_w = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000004" /
                          "model.safetensors"))
    assert full_w.keys() == one_w.keys()
    for k in one_w:
        assert full_w[k].shape == one_w[k].shape
        assert (full_w[k] - one_w[k]).abs().max() < 1e-4, k

    # the run resumes only with its own strategy (--strategy is not among what may change)
    ddp = [a for a in fsdp if a not in ("--strategy", "fsdp")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([*ddp, "--out", str(tmp_path / "full")])
    assert exited.value.code == 1
    assert "--strategy fsdp (now ddp)" in capsys.readouterr().err

    # killed after step 3 (checkpoint of step 2 on disk), then the same command resumes
    cut = [*fsdp, "--out", str(tmp_path / "cut")]
    killed = torchrun(cut, {"KODALLE_TEST_KILL_AT_STEP": "3"})
    assert killed.returncode != 0
    assert (tmp_path / "cut" / "checkpoints" / "step-0000002").is_dir()
    assert not (tmp_path / "cut" / "checkpoints" / "step-0000004").exists()
    resumed = torchrun(cut)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
    assert "resuming from" in resumed.stdout
    # bitwise: the resumed run's losses of steps 3-4 and its final weights and optimizer state
    assert rows(tmp_path / "cut", "train")[-2:] == two[-2:]
    cut_ckpt = tmp_path / "cut" / "checkpoints" / "step-0000004"
    cut_w = load_file(str(cut_ckpt / "model.safetensors"))
    for k in full_w:
        assert full_w[k].equal(cut_w[k]), k
    import torch

    a = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    b = torch.load(cut_ckpt / "optimizer.pt", weights_only=True)["state"]
    assert a.keys() == b.keys() and all(isinstance(k, str) for k in a)  # keyed by name
    for name in a:
        for key in a[name]:
            assert a[name][key].equal(b[name][key]), (name, key)


def test_strategy_is_fixed_on_resume():
    from kodalle_cli.configs import TRAIN_RESUME_MAY_CHANGE, DalleTrainConfig

    assert "strategy" not in TRAIN_RESUME_MAY_CHANGE
    assert DalleTrainConfig(backbone="x").strategy == "ddp"
