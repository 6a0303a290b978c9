"""DDP: 2 gloo processes on CPU give the losses of 1 process with the same global batch."""

from __future__ import annotations

import pytest
from conftest import torchrun, train_losses, wait_for_step, write_tiny_tokens

from kodalle_cli.cli import main

COMMON = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16", "--device", "cpu",
          "--workers", "0", "--no-progress", "--lr", "1e-3", "--warmup-steps", "2",
          "--max-steps", "4", "--save-every", "4", "--eval-every", "0", "--sample-every", "0",
          "--log-every", "1"]


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


@pytest.mark.slow
def test_sigint_to_torchrun_saves_and_the_resume_is_bitwise(tiny_klue, tmp_path):
    """Ctrl-C reaches torchrun, which forwards SIGINT to both ranks: they agree to stop
    after the same step, rank 0 writes that step's checkpoint, and the same command run
    again ends with the weights of an uninterrupted 2-rank run, bit for bit."""
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    tokens = write_tiny_tokens(tmp_path / "tokens", tiny_klue, train=48, val=0, shard_size=100)
    args = ["train", "--backbone", str(tiny_klue), "--data", str(tokens), "--dim", "32",
            "--depth", "2", "--heads", "2", "--dim-head", "16", "--device", "cpu", "--workers",
            "0", "--no-progress", "--lr", "1e-3", "--warmup-steps", "2", "--max-steps", "60",
            "--save-every", "1000", "--eval-every", "0", "--sample-every", "0", "--log-every",
            "1", "--batch-size", "4"]
    straight = torchrun([*args, "--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-6000:]

    out = tmp_path / "stopped"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KODALLE_TEST_")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "kodalle_cli", *args, "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        wait_for_step(proc, out, 3, timeout=300)
        proc.send_signal(signal.SIGINT)  # to torchrun only: it forwards it to the ranks
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, "the run finished before the interrupt: make it longer"
    assert "interrupted at step" in stderr, stderr[-3000:]
    step = int(stderr.split("interrupted at step ")[1].split(":")[0])
    assert 3 <= step < 60
    assert (out / "latest").read_text(encoding="utf-8").strip() == f"checkpoints/step-{step:07d}"

    resumed = torchrun([*args, "--out", str(out)])
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
    want = load_file(tmp_path / "straight/checkpoints/step-0000060/model.safetensors")
    got = load_file(out / "checkpoints/step-0000060/model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].equal(want[key]), key
