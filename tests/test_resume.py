"""A run killed with SIGKILL at any point and resumed reaches bitwise the uninterrupted weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file


def run_train(backbone, tokens, out, kill_env=None, expect_kill=False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("KODALLE_TEST_KILL_AT_STEP", None)
    env.pop("KODALLE_TEST_KILL_IN_SAVE", None)
    env.update(kill_env or {})
    cmd = [sys.executable, "-m", "kodalle_cli", "train", "--backbone", str(backbone),
           "--data", str(tokens), "--out", str(out), "--dim", "32", "--depth", "2",
           "--heads", "2", "--dim-head", "16", "--device", "cpu", "--workers", "0",
           "--no-progress", "--lr", "1e-3", "--warmup-steps", "2", "--batch-size", "4",
           "--max-steps", "8", "--save-every", "3", "--eval-every", "4", "--sample-every", "0",
           "--cond-drop", "0.3", "--keep-last", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def final_weights(out):
    return load_file(str(out / "checkpoints" / "step-0000008" / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise_identical(tiny_dalle_data, tmp_path):
    backbone, tokens, _ = tiny_dalle_data
    run_train(backbone, tokens, tmp_path / "straight")
    want = final_weights(tmp_path / "straight")

    # killed between checkpoints (after step 5; the last checkpoint is step 3), then, resumed,
    # killed half-way through writing the checkpoint of step 6: step 3 stays usable
    killed = tmp_path / "killed"
    run_train(backbone, tokens, killed, {"KODALLE_TEST_KILL_AT_STEP": "5"}, expect_kill=True)
    assert (killed / "latest").read_text().strip() == "checkpoints/step-0000003"
    run_train(backbone, tokens, killed, {"KODALLE_TEST_KILL_IN_SAVE": "6"}, expect_kill=True)
    assert (killed / "latest").read_text().strip() == "checkpoints/step-0000003"
    assert not (killed / "checkpoints" / "step-0000006").exists()
    proc = run_train(backbone, tokens, killed)  # re-running into the same --out resumes
    assert "resuming from" in proc.stdout

    for out in [killed]:
        got = final_weights(out)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].equal(want[k]), f"{out.name}: {k} differs"
        # the metrics keep one row per step and metric (rows past the checkpoint replaced)
        rows = (out / "metrics.csv").read_text().splitlines()[1:]
        keys = [tuple(r.split(",")[:3]) for r in rows]
        assert len(keys) == len(set(keys))
