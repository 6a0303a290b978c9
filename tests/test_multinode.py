"""Several machines: two torchrun "nodes" on this machine (``--nnodes 2 --nproc-per-node 1``,
c10d rendezvous on 127.0.0.1, gloo) train like one process, and a run killed on both nodes
resumes to the weights of an uninterrupted one, bit for bit. The run directory is shared
(here: the same disk), as the README asks of a real cluster; rank 0 writes it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import train_losses, write_tiny_tokens

from kodalle_cli.cli import main

ARGS = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16", "--device", "cpu",
        "--workers", "0", "--no-progress", "--lr", "1e-3", "--warmup-steps", "2",
        "--eval-every", "0", "--sample-every", "0", "--log-every", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args, logs, env_extra=None, timeout: int = 400) -> list[tuple[int, str]]:
    """``kodalle ARGS`` launched as two torchrun nodes of one process each, as a user types
    it on each machine; -> (exit status, output) of each launch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KODALLE_TEST_")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})})
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"127.0.0.1:{free_port()}", "-m", "kodalle_cli", *args]
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    try:
        for node in range(2):
            files.append(open(logs / f"node{node}.log", "w+", encoding="utf-8"))  # noqa: SIM115
            procs.append(subprocess.Popen(command, env=env, stdout=files[-1],
                                          stderr=subprocess.STDOUT, start_new_session=True))
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for f in files:
            f.close()
    return [(p.returncode, (logs / f"node{i}.log").read_text(encoding="utf-8"))
            for i, p in enumerate(procs)]


def assert_ok(results):
    for status, output in results:
        assert status == 0, output[-6000:]


@pytest.fixture
def tokens(tiny_klue, tmp_path):
    # one shard: the ranks split it by sample, so rank 0 + rank 1 = the single process's batch
    return write_tiny_tokens(tmp_path / "tokens", tiny_klue, train=48, val=0, shard_size=100)


@pytest.mark.slow
def test_two_nodes_train_like_one_process(tiny_klue, tokens, tmp_path):
    args = ["train", "--backbone", str(tiny_klue), "--data", str(tokens), *ARGS,
            "--max-steps", "4", "--save-every", "4"]
    main([*args, "--out", str(tmp_path / "one"), "--batch-size", "8"])
    # --log-to: torchrun's own parser refuses --log (an abbreviation of its --log-dir)
    assert_ok(two_nodes([*args, "--out", str(tmp_path / "two"), "--batch-size", "4",
                         "--log-to", "tensorboard"], tmp_path / "logs"))
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 1e-5, (one, two)
    # rank 0 alone wrote the run: one checkpoint of a 2-rank world, one row per step
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-0000004"]
    state = (tmp_path / "two" / "checkpoints" / "step-0000004" / "trainer_state.json")
    assert '"world_size": 2' in state.read_text(encoding="utf-8")
    (events,) = (tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_nodes_killed_then_resumed_equal_an_uninterrupted_run(tiny_klue, tokens, tmp_path):
    from safetensors.torch import load_file

    args = ["train", "--backbone", str(tiny_klue), "--data", str(tokens), *ARGS,
            "--max-steps", "6", "--save-every", "2", "--batch-size", "4"]
    straight = tmp_path / "straight"
    assert_ok(two_nodes([*args, "--out", str(straight)], tmp_path / "logs-straight"))

    # both nodes die at step 5 (SIGKILL, no checkpoint of their own): step 4's is the last
    out = tmp_path / "killed"
    killed = two_nodes([*args, "--out", str(out)], tmp_path / "logs-killed",
                       env_extra={"KODALLE_TEST_KILL_AT_STEP": "5"})
    assert all(status != 0 for status, _ in killed), killed
    assert (out / "latest").read_text(encoding="utf-8").strip() == "checkpoints/step-0000004"

    resumed = two_nodes([*args, "--out", str(out)], tmp_path / "logs-resumed")
    assert_ok(resumed)
    assert any("resuming from" in output and "(step 4)" in output for _, output in resumed)
    want = load_file(straight / "checkpoints/step-0000006/model.safetensors")
    got = load_file(out / "checkpoints/step-0000006/model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].equal(want[key]), key
    assert train_losses(out) == train_losses(straight)
