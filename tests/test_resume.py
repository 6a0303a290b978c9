"""A run killed with SIGKILL at any point (its whole process group, data-loader workers
included, with the default settings) and resumed reaches bitwise the uninterrupted weights:
`kodalle train` and `kodalle train vqgan`. Resuming with other settings is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import write_image_shard
from PIL import Image
from safetensors.torch import load_file

from kodalle_cli.configs import DalleTrainConfig
from kodalle_cli.errors import KodalleError

TINY = dict(dim=32, depth=2, heads=2, dim_head=16, device="cpu", progress=False, lr=1e-3,
            warmup_steps=2, batch_size=4, max_steps=8, save_every=3, eval_every=4,
            sample_every=0, cond_drop=0.3, keep_last=2)  # workers: the default (2)


def killed(cmd, kill_env):
    """Run a kodalle command in its own process group until a test hook SIGKILLs the group."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KODALLE_TEST_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **kill_env)  # as in-process: one_thread
    proc = subprocess.run([sys.executable, "-m", "kodalle_cli", *cmd], env=env,
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc


def dalle_cmd(backbone, tokens, out):
    flags = []
    for k, v in TINY.items():
        flag = "--" + k.replace("_", "-")
        flags += [flag if v is not False else f"--no-{flag[2:]}"] + (
            [] if isinstance(v, bool) else [str(v)])
    return ["train", "--backbone", str(backbone), "--data", str(tokens), "--out", str(out),
            *flags]


def assert_same_weights(got, want, what):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].equal(want[k]), f"{what}: {k} differs"


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise_identical(tiny_dalle_data, tmp_path, capsys,
                                                           one_thread):
    from kodalle_cli.train.dalle import run_train

    backbone, tokens, _ = tiny_dalle_data
    cfg = DalleTrainConfig(backbone=str(backbone), data=tokens, **TINY)
    assert cfg.workers == 2  # the default: killed with its data-loader workers
    run_train(DalleTrainConfig(**{**cfg.__dict__, "out": tmp_path / "straight"}))
    want = load_file(tmp_path / "straight/checkpoints/step-0000008/model.safetensors")

    # killed between checkpoints (after step 5; the last checkpoint is step 3), then, resumed,
    # killed half-way through writing the checkpoint of step 6: step 3 stays usable
    out = tmp_path / "killed"
    killed(dalle_cmd(backbone, tokens, out), {"KODALLE_TEST_KILL_AT_STEP": "5"})
    assert (out / "latest").read_text().strip() == "checkpoints/step-0000003"
    killed(dalle_cmd(backbone, tokens, out), {"KODALLE_TEST_KILL_IN_SAVE": "6"})
    assert (out / "latest").read_text().strip() == "checkpoints/step-0000003"
    assert not (out / "checkpoints" / "step-0000006").exists()
    assert (out / "lock").read_text().split()[0].isdigit()  # left by the killed run: stale
    capsys.readouterr()
    run_train(DalleTrainConfig(**{**cfg.__dict__, "out": out}))  # the same command resumes
    assert "resuming from" in capsys.readouterr().out
    assert not (out / "lock").exists()

    got = load_file(out / "checkpoints/step-0000008/model.safetensors")
    assert_same_weights(got, want, "resumed")
    # the metrics keep one row per step and metric (rows past the checkpoint replaced)
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    keys = [tuple(r.split(",")[:3]) for r in rows]
    assert len(keys) == len(set(keys))
    assert ("0", "data", "train_skipped") in keys

    # resuming with other hyperparameters: one error listing them; --max-steps may change
    changed = {**cfg.__dict__, "out": out, "lr": 2e-3, "depth": 3, "max_steps": 9}
    with pytest.raises(KodalleError) as err:
        run_train(DalleTrainConfig(**changed))
    message = str(err.value)
    assert "--lr 0.001 (now 0.002)" in message and "--depth 2 (now 3)" in message
    assert "--max-steps" in message.split("may change only")[1]  # listed as allowed
    assert "\n" not in message
    result = run_train(DalleTrainConfig(**{**cfg.__dict__, "out": out, "max_steps": 9,
                                           "save_every": 9, "log_every": 1, "workers": 0}))
    assert result.step == 9


# ---- train vqgan -----------------------------------------------------------------------------
VQ = ["--resolution", "32", "--ch", "32", "--ch-mult", "1,2", "--n-embed", "32", "--embed-dim",
      "8", "--num-res-blocks", "1", "--lr", "1e-3", "--batch-size", "4", "--max-steps", "6",
      "--restart-after", "2", "--disc-start", "2", "--save-every", "2", "--log-every", "1",
      "--device", "cpu"]


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqshards")
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("val", 4)):
        samples = []
        for i in range(n):
            im = np.full((32, 32, 3), 255, dtype=np.uint8)
            x, y = rng.integers(0, 16, 2)
            im[y:y + 12, x:x + 12] = rng.integers(0, 200, 3)
            samples.append((f"{split}{i:03d}", Image.fromarray(im), "c"))
        write_image_shard(root / f"{split}-000000.tar", samples)
    return root


def vq_config(data, out, **kw):
    from kodalle_cli.vqgan.train import VQGANTrainConfig

    base = dict(data=data, out=out, resolution=32, ch=32, ch_mult=(1, 2), n_embed=32,
                embed_dim=8, num_res_blocks=1, lr=1e-3, batch_size=4, max_steps=6,
                restart_after=2, disc_start=2, save_every=2, log_every=1, device="cpu",
                progress=False)
    return VQGANTrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_train_vqgan_sigkill_then_resume_is_bitwise_identical(image_shards, tmp_path,
                                                               one_thread):
    from kodalle_cli.vqgan.train import train_vqgan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_vqgan(vq_config(image_shards, tmp_path / "straight"))
    out = tmp_path / "killed"
    cmd = ["train", "vqgan", "--data", str(image_shards), "--out", str(out), *VQ]
    killed(cmd, {"KODALLE_TEST_KILL_AT_STEP": "3"})
    assert (out / "latest").read_text().strip() == "checkpoints/step-0000002"
    killed(cmd, {"KODALLE_TEST_KILL_IN_SAVE": "4"})
    assert (out / "latest").read_text().strip() == "checkpoints/step-0000002"
    assert not (out / "checkpoints/step-0000004").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KodalleError, match=r"--lr 0.001 \(now 0.002\)"):
            train_vqgan(vq_config(image_shards, out, lr=2e-3))
        train_vqgan(vq_config(image_shards, out))
    for name in ("model.safetensors", "discriminator.safetensors"):
        a = load_file(tmp_path / "straight/checkpoints/step-0000006" / name)
        b = load_file(out / "checkpoints/step-0000006" / name)
        assert_same_weights(b, a, name)
    a, b = load_file(tmp_path / "straight/model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
