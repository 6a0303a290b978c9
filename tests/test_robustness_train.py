"""What users do to a training run: Ctrl-C (once, twice), a second run on the same directory,
a full disk, damaged or mismatched shards. Each ends in one clear line and loses no work."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from conftest import toy_regression_task, wait_for_step

from kodalle_cli.configs import DalleTrainConfig
from kodalle_cli.errors import KodalleError
from kodalle_cli.runlock import run_lock
from kodalle_cli.runs import latest_checkpoint
from kodalle_cli.train.metrics import read_metrics
from kodalle_cli.train.trainer import TrainerConfig, TrainingInterrupted, train

TINY = dict(dim=32, depth=2, heads=2, dim_head=16, device="cpu", progress=False, lr=1e-3,
            warmup_steps=2, batch_size=4, eval_every=0, sample_every=0)


class Toy(toy_regression_task()):
    """A linear regression with hooks: the trainer is shared, so its guards are tested on
    something small."""

    def __init__(self, on_step=None, on_save=None):
        super().__init__()
        self.on_step, self.on_save = on_step, on_save
        self.step = 0

    def after_step(self, model, step, optimizer):
        self.step = step
        if self.on_step:
            self.on_step(step)

    def save_extra(self, ckpt_dir):
        if self.on_save:
            self.on_save(self.step)


def toy_config(out, **kw):
    base = dict(out=out, lr=0.05, max_steps=20, warmup_steps=0, save_every=2, eval_every=0,
                sample_every=0, device="cpu", progress=False, log_every=1)
    return TrainerConfig(**{**base, **kw})


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


# ---- Ctrl-C ------------------------------------------------------------------------------------
def test_ctrl_c_finishes_the_step_saves_and_restores_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    task = Toy(on_step=lambda step: step == 3 and ctrl_c())
    with pytest.raises(TrainingInterrupted) as err:
        train(task, toy_config(tmp_path))
    assert err.value.exit_code == 130
    assert "interrupted at step 3" in str(err.value) and "same command" in str(err.value)
    assert "\n" not in str(err.value)
    assert latest_checkpoint(tmp_path).name == "step-0000003"  # the step, then a checkpoint
    assert signal.getsignal(signal.SIGINT) is before
    assert not (tmp_path / "lock").exists()
    result = train(Toy(), toy_config(tmp_path, max_steps=5))  # the same call resumes
    assert result.step == 5


def test_second_ctrl_c_stops_at_once_leaving_the_last_checkpoint(tmp_path):
    # the first Ctrl-C after step 5; the second while step 5's checkpoint is being written
    task = Toy(on_step=lambda step: step == 5 and ctrl_c(),
               on_save=lambda step: step == 5 and ctrl_c())
    with pytest.raises(KeyboardInterrupt):
        train(task, toy_config(tmp_path))
    assert latest_checkpoint(tmp_path).name == "step-0000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000002", "step-0000004"]  # nothing partial, not even hidden
    assert train(Toy(), toy_config(tmp_path, max_steps=6)).step == 6


@pytest.mark.slow
def test_cli_ctrl_c_and_a_second_run_on_the_same_directory(tiny_dalle_data, tmp_path):
    """A real `kodalle train` (default data-loader workers): a second run on its --out is
    refused naming its pid; Ctrl-C (SIGINT to the process group, as a terminal sends it)
    finishes the step, writes its checkpoint, says how to resume and exits 130."""
    from kodalle_cli.train.dalle import run_train

    backbone, tokens, _ = tiny_dalle_data
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kodalle_cli", "train", "--backbone", str(backbone), "--data",
           str(tokens), "--out", str(out), "--dim", "32", "--depth", "2", "--heads", "2",
           "--dim-head", "16", "--device", "cpu", "--no-progress", "--batch-size", "4",
           "--max-steps", "100000", "--save-every", "100000", "--eval-every", "0",
           "--sample-every", "0", "--log-every", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for_step(proc, out, 2, timeout=120, poll=0.2)
        assert (out / "lock").read_text().split()[0] == str(proc.pid)
        with pytest.raises(KodalleError, match=f"in use by another run \\(pid {proc.pid}"):
            run_train(DalleTrainConfig(backbone=str(backbone), data=tokens, out=out,
                                       max_steps=3, **TINY))
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert "interrupted at step" in last and "run the same command again to resume" in last
    assert "Traceback" not in stderr
    step = int(last.split("interrupted at step ")[1].split(":")[0])
    assert latest_checkpoint(out).name == f"step-{step:07d}"
    assert not (out / "lock").exists()


# ---- one run per directory -------------------------------------------------------------------
def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(f'{os.getpid()}\\n'); f.flush(); print('locked', flush=True); time.sleep(60)"),
        str(tmp_path / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KodalleError, match=f"pid {holder.pid}, lock file"):
            train(Toy(), toy_config(tmp_path, max_steps=2))
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock (file still there, naming it) is stale and taken over
    assert (tmp_path / "lock").read_text().split()[0] == str(holder.pid)
    assert train(Toy(), toy_config(tmp_path, max_steps=2)).step == 2
    assert not (tmp_path / "lock").exists()

    # a lock file naming a live process is refused even where flock cannot tell
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "lock").write_text(f"{sleeper.pid}\n")
        with pytest.raises(KodalleError, match=f"pid {sleeper.pid}"), run_lock(tmp_path):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with run_lock(tmp_path), run_lock(tmp_path):  # re-entrant within a process
        assert (tmp_path / "lock").read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / "lock").exists()
    # a directory the lock created is removed when nothing was written to it, kept otherwise
    with run_lock(tmp_path / "new" / "run"):
        assert (tmp_path / "new/run/lock").is_file()
    assert not (tmp_path / "new/run").exists() and (tmp_path / "new").is_dir()
    with run_lock(tmp_path / "written"):
        (tmp_path / "written/config.json").write_text("{}", encoding="utf-8")
    assert (tmp_path / "written/config.json").is_file()


# ---- a full disk -------------------------------------------------------------------------------
def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *args, **kw):
        if "step-0000004" in str(f):  # half a file, then ENOSPC
            with open(f, "wb") as fh:
                fh.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(KodalleError) as err:
        train(Toy(), toy_config(tmp_path, max_steps=6))
    message = str(err.value)
    assert "disk full (no space left on device)" in message and "\n" not in message
    assert "step-0000002 and `latest` are intact" in message
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step-0000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(torch, "save", real_save)
    assert train(Toy(), toy_config(tmp_path, max_steps=6)).step == 6  # space freed: resumes


# ---- damaged and mismatched token shards -----------------------------------------------------
def rewrite_tar(path, edit):
    """Rewrite a tar with ``edit(name, data) -> data`` applied to each member."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            data = edit(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.fixture
def damaged_tokens(tiny_dalle_data, tmp_path):
    """Token shards with a code outside the codebook (s00003), ids of the wrong length
    (s00005) and the second train shard cut in the middle of a sample."""
    from conftest import write_tiny_tokens

    backbone, _, vqgan = tiny_dalle_data
    tokens = write_tiny_tokens(tmp_path / "tokens", backbone, vqgan)

    def edit(name, data):
        if name == "s00003.codes.npy":
            return npy(np.full(16, 64, dtype=np.int16))
        if name == "s00005.ids.npy":
            return npy(np.ones(15, dtype=np.int32))
        return data

    rewrite_tar(tokens / "train-000000.tar", edit)
    second = tokens / "train-000001.tar"
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2 + 700])
    return backbone, tokens


def test_damaged_token_shards_are_skipped_or_stop_the_run_before_its_first_step(
        damaged_tokens, tmp_path, capsys, one_thread):
    from kodalle_cli.train.dalle import run_train

    backbone, tokens = damaged_tokens
    cfg = dict(backbone=str(backbone), data=tokens, max_steps=2, workers=0, **TINY)
    with pytest.raises(KodalleError) as err:  # the default --max-bad-fraction 0.01
        run_train(DalleTrainConfig(out=tmp_path / "strict", **cfg))
    assert "of 48 train samples" in str(err.value) and "--max-bad-fraction" in str(err.value)
    assert latest_checkpoint(tmp_path / "strict") is None  # stopped before the first step
    capsys.readouterr()

    result = run_train(DalleTrainConfig(out=tmp_path / "run", max_bad_fraction=0.5, **cfg))
    assert result.step == 2
    warned = capsys.readouterr().err
    assert "train-000000.tar: s00003: codes outside the VQGAN's codebook [0, 64)" in warned
    assert "train-000000.tar: s00005: ids.npy has shape (15,)" in warned
    assert "train-000001.tar" in warned and "sample lost after" in warned
    skipped = {r["metric"]: r["value"] for r in read_metrics(tmp_path / "run/metrics.csv")
               if r["split"] == "data"}
    assert skipped["val_skipped"] == 0 and 2 + 1 <= skipped["train_skipped"] < 24


def test_token_shards_another_vqgan_cannot_decode_are_refused(tiny_dalle_data, tmp_path):
    from conftest import save_tiny_vqgan, write_tiny_tokens

    from kodalle_cli.train.dalle import run_train
    from kodalle_cli.vqgan import VQGAN, load_vqgan, save_vqgan

    backbone, tokens, vqgan = tiny_dalle_data
    other = VQGAN(load_vqgan(vqgan).config)  # same shape, other weights
    save_vqgan(other, tmp_path / "other")
    cfg = dict(backbone=str(backbone), max_steps=1, workers=0, **TINY)
    with pytest.raises(KodalleError, match="were made with another VQGAN than --vqgan"):
        run_train(DalleTrainConfig(data=tokens, vqgan=str(tmp_path / "other"),
                                   out=tmp_path / "a", **cfg))
    # codes of a 128-entry codebook for a 64-entry VQGAN
    big = write_tiny_tokens(tmp_path / "big", backbone, save_tiny_vqgan(tmp_path / "vq64"),
                            num_image_tokens=128, train=8, val=0)
    with pytest.raises(KodalleError, match="128-entry codebook .* has 64 entries"):
        run_train(DalleTrainConfig(data=big, out=tmp_path / "b", **cfg))
    assert latest_checkpoint(tmp_path / "a") is None and latest_checkpoint(tmp_path / "b") is None


def test_train_vqgan_skips_unreadable_images(tmp_path, one_thread):
    from conftest import write_image_shard
    from PIL import Image

    from kodalle_cli.vqgan.train import VQGANTrainConfig, train_vqgan

    data = tmp_path / "shards"
    data.mkdir()
    samples = []
    for i in range(12):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (20 * i, 0, 0)).save(buf, format="JPEG")
        jpg = buf.getvalue() if i != 5 else buf.getvalue()[:60]  # cut: undecodable
        samples.append((f"k{i:02d}", jpg, "c"))
    write_image_shard(data / "train-000000.tar", samples)  # with its stats: 12 samples
    cfg = dict(data=data, resolution=16, ch=32, ch_mult=(1, 2), n_embed=16, embed_dim=8,
               num_res_blocks=1, batch_size=4, max_steps=3, save_every=3, log_every=1,
               device="cpu", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KodalleError, match="bad images .* --max-bad-fraction"):
            train_vqgan(VQGANTrainConfig(out=tmp_path / "strict", **cfg))
        train_vqgan(VQGANTrainConfig(out=tmp_path / "run", max_bad_fraction=0.2, **cfg))
    skipped = [r["value"] for r in read_metrics(tmp_path / "run/metrics.csv")
               if r["metric"] == "skipped_images"]
    assert skipped[-1] == 1


def test_disk_full_while_writing_an_image_shard(tmp_path, monkeypatch):
    from kodalle_cli.data.shards import ShardWriter

    writer = ShardWriter(tmp_path / "train-000000.tar")
    writer.write("a", b"jpg", "caption", {})

    def full_disk(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer._tar, "addfile", full_disk)
    with pytest.raises(KodalleError, match=r"^disk full \(no space left on device\) while "
                                           r"writing shard train-000000.tar"):
        writer.write("b", b"jpg", "caption", {})
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone, no shard appeared
