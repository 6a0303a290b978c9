"""--log csv|tensorboard|wandb: the trainer's numbers and preview grids in TensorBoard's event
files (read back with TensorBoard's own reader) and in a W&B offline run, a resume that
continues both, and the one-line error for a missing extra."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch

# tensorboard and wandb: installed by the test extra (make install), so these tests run
from conftest import toy_regression_task
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kodalle_cli.errors import KodalleError, UsageError
from kodalle_cli.runs import latest_checkpoint
from kodalle_cli.train.loggers import WANDB_ID, parse_logs
from kodalle_cli.train.metrics import read_metrics
from kodalle_cli.train.trainer import TrainerConfig, train


class Toy(toy_regression_task()):
    """A linear regression with a validation loss and a preview grid (a 6x8 PNG whose
    pixels are the step), so every kind of value the trainer logs is there."""

    def evaluate(self, model, step):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(-1 % 2**31))
        return {"loss": float(torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)))}

    def sample(self, model, step, out_dir):
        from PIL import Image

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step-{step:07d}.png"
        Image.fromarray(np.full((6, 8, 3), step, np.uint8)).save(path)
        return path


def config(out, **kw):
    base = dict(out=out, lr=0.05, max_steps=6, warmup_steps=0, save_every=2, eval_every=3,
                sample_every=3, device="cpu", progress=False, log_every=1)
    return TrainerConfig(**{**base, **kw})


def events(out) -> EventAccumulator:
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def csv_values(out, split, metric):
    return {r["step"]: r["value"] for r in read_metrics(out / "metrics.csv")
            if r["split"] == split and r["metric"] == metric}


# ---- --log values ------------------------------------------------------------------------------
def test_log_names_repeated_or_comma_separated_csv_always_first():
    assert parse_logs(None) == ("csv",)
    assert parse_logs(["tensorboard"]) == ("csv", "tensorboard")
    assert parse_logs(["wandb", "tensorboard,csv", "wandb"]) == ("csv", "wandb", "tensorboard")
    with pytest.raises(UsageError) as err:
        parse_logs(["tensorbord"])
    assert str(err.value) == ("--log tensorbord: choose csv, tensorboard or wandb "
                              "(repeat --log for several)")


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line_naming_it_before_the_run_starts(tmp_path, monkeypatch,
                                                                     name):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == name else find_spec(mod, *a))
    with pytest.raises(KodalleError) as err:
        train(Toy(), config(tmp_path / "run", log=("csv", name)))
    assert str(err.value) == (f"--log {name} needs the {name} package: "
                              f"pip install 'kodalle[{name}]'")
    assert not (tmp_path / "run").exists()


# ---- TensorBoard -------------------------------------------------------------------------------
def test_tensorboard_event_file_holds_the_scalars_and_the_preview_grids(tmp_path):
    out = tmp_path / "run"
    train(Toy(), config(out, log=("tensorboard",)))
    acc = events(out)
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s",
                "train/tokens_per_s", "val/loss"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    # the same numbers as metrics.csv, step for step
    for split, metric in (("train", "loss"), ("train", "lr"), ("train", "grad_norm"),
                          ("val", "loss")):
        board = {e.step: e.value for e in acc.Scalars(f"{split}/{metric}")}
        assert board == pytest.approx(csv_values(out, split, metric), rel=1e-6)
    assert sorted(e.step for e in acc.Scalars("train/loss")) == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 3, 6]
    grids = acc.Images("samples/preview")
    assert [(g.step, g.width, g.height) for g in grids] == [(3, 8, 6), (6, 8, 6)]
    from io import BytesIO

    from PIL import Image

    pixels = np.asarray(Image.open(BytesIO(grids[1].encoded_image_string)))
    assert (pixels == 6).all()


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    """A run killed after its step-4 checkpoint logged steps 5 and 6; resumed from step 2
    (the step-4 checkpoint lost), TensorBoard shows each step once, as metrics.csv does."""
    out = tmp_path / "run"
    train(Toy(), config(out, log=("tensorboard",), max_steps=6, save_every=2))
    shutil.rmtree(out / "checkpoints" / "step-0000006")
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    (out / "latest").write_text("checkpoints/step-0000002\n", encoding="utf-8")
    assert latest_checkpoint(out).name == "step-0000002"
    train(Toy(), config(out, log=("tensorboard",), max_steps=8, save_every=2))
    acc = events(out)
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6, 7, 8]
    board = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert board == pytest.approx(csv_values(out, "train", "loss"), rel=1e-6)


# ---- wandb (offline) ---------------------------------------------------------------------------
def wandb_records(run_file):
    """The records of a W&B ``run-ID.wandb`` file (a LevelDB-style log of protobufs: 32 KiB
    blocks of [crc u32, length u16, type u8] chunks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # padding to the end of the block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_file) -> list[dict]:
    rows = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def wandb_run_id(run_file) -> str:
    return next(r.run.run_id for r in wandb_records(run_file)
                if r.WhichOneof("record_type") == "run")


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR",
                "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_run_holds_the_metrics_and_a_resume_continues_its_id(tmp_path,
                                                                          wandb_offline):
    out = tmp_path / "run"
    train(Toy(), config(out, log=("wandb",), max_steps=4, sample_every=2))
    run_id = (out / WANDB_ID).read_text(encoding="utf-8").strip()
    (first,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert first.name == f"run-{run_id}.wandb" and wandb_run_id(first) == run_id
    rows = wandb_history(first)
    loss = {r["trainer/step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert loss == pytest.approx(csv_values(out, "train", "loss"), rel=1e-6)
    for key in ("train/lr", "train/grad_norm", "train/samples_per_s"):
        assert sorted(r["trainer/step"] for r in rows if key in r) == [1, 2, 3, 4], key
    val = {r["trainer/step"]: r["val/loss"] for r in rows if "val/loss" in r}
    assert val == pytest.approx(csv_values(out, "val", "loss"), rel=1e-6)
    images = [r for r in rows if "samples/preview/_type" in r]
    assert [(r["trainer/step"], r["samples/preview/_type"]) for r in images] == [
        (2, "image-file"), (4, "image-file")]
    assert all((first.parent / "files" / r["samples/preview/path"]).is_file() for r in images)

    # resumed: the same W&B run id (a second offline directory that `wandb sync` merges)
    train(Toy(), config(out, log=("wandb",), max_steps=6, sample_every=2))
    assert (out / WANDB_ID).read_text(encoding="utf-8").strip() == run_id
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and all(wandb_run_id(r) == run_id for r in runs)
    (second,) = [r for r in runs if r != first]
    assert sorted(r["trainer/step"] for r in wandb_history(second) if "train/loss" in r) == [
        5, 6]


def test_a_new_run_in_a_directory_without_checkpoints_gets_a_new_wandb_id(tmp_path,
                                                                          wandb_offline):
    out = tmp_path / "run"
    out.mkdir()
    (out / WANDB_ID).write_text("stale123\n", encoding="utf-8")
    train(Toy(), config(out, log=("wandb",), max_steps=1, eval_every=0, sample_every=0))
    assert (out / WANDB_ID).read_text(encoding="utf-8").strip() != "stale123"


def test_only_rank_0_logs(tmp_path):
    from kodalle_cli.train.loggers import Loggers

    logs = Loggers(tmp_path, ["tensorboard"], enabled=False, resume_step=None)
    logs.write(1, "train", {"loss": 1.0})
    logs.close()
    assert list(tmp_path.iterdir()) == []


# ---- the three commands ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """Synthetic garments with K-Fashion-style captions: a train and a val shard."""
    import random

    from conftest import write_image_shard

    from kodalle_cli.data.synthetic import random_garment, render

    root = tmp_path_factory.mktemp("log-shards")
    rng = random.Random(0)
    for split, n in (("train", 32), ("val", 8)):
        samples = []
        for i in range(n):
            colour = rng.choice(("레드", "블루", "그린"))
            image, _ = render(random_garment(rng, colour, "티셔츠"), 32)
            samples.append((f"{split}{i:04d}", image, f"상의에서 색상은 {colour}이다."))
        write_image_shard(root / f"{split}-000000.tar", samples)
    return root


def test_cli_train_logs_to_tensorboard_and_wandb(tiny_dalle_data, tmp_path, wandb_offline):
    from kodalle_cli.cli import main

    backbone, tokens, _ = tiny_dalle_data
    out = tmp_path / "run"
    main(["train", "--backbone", str(backbone), "--data", str(tokens), "--out", str(out),
          "--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16", "--device", "cpu",
          "--workers", "0", "--no-progress", "--batch-size", "4", "--max-steps", "4",
          "--save-every", "4", "--eval-every", "2", "--eval-batches", "1", "--sample-every",
          "4", "--sample-captions", "2", "--log-every", "1", "--log", "tensorboard",
          "--log", "wandb"])
    acc = events(out)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s",
            "val/loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 2, 4]
    (grid,) = acc.Images("samples/preview")  # the preview grid of step 4: 2 captions
    from PIL import Image

    png = Image.open(out / "samples" / "step-0000004.png")
    assert (grid.step, grid.width, grid.height) == (4, *png.size)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    assert sorted(r["trainer/step"] for r in rows if "train/loss" in r) == [1, 2, 3, 4]
    assert [r["trainer/step"] for r in rows if "samples/preview/_type" in r] == [4]


def test_cli_train_vqgan_logs_its_losses_and_reconstruction_grids(image_shards, tmp_path):
    from kodalle_cli.cli import main

    out = tmp_path / "vqgan"
    with pytest.warns(UserWarning, match="without the perceptual loss"):
        main(["train", "vqgan", "--recipe", "small-flat", "--data", str(image_shards),
              "--out", str(out), "--ch", "32", "--n-embed", "32", "--max-steps", "4",
              "--batch-size", "4", "--save-every", "2", "--log-every", "1", "--device", "cpu",
              "--log", "tensorboard"])
    acc = events(out)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/rec_loss", "train/lr", "train/grad_norm",
            "train/samples_per_s", "val/rec_loss", "val/perplexity"} <= scalars, scalars
    grids = acc.Images("samples/preview")  # originals above their reconstructions
    assert [(g.step, g.height) for g in grids] == [(2, 2 * 32 + 3 * 2), (4, 2 * 32 + 3 * 2)]
    assert (out / "samples" / "step-0000004.png").is_file()


def test_cli_train_reranker_logs_its_loss_and_retrieval(image_shards, tmp_path, one_thread):
    from kodalle_cli.cli import main
    from kodalle_cli.experiments.tiny_backbone import build_klue_like

    backbone = build_klue_like(tmp_path / "klue", texts=["상의에서 색상은 레드이다."] * 8,
                               vocab_size=128, hidden=32, layers=1)
    out = tmp_path / "reranker"
    main(["train", "reranker", "--backbone", str(backbone), "--data", str(image_shards),
          "--out", str(out), "--image-size", "32", "--embed-dim", "8", "--batch-size", "4",
          "--max-steps", "2", "--eval-every", "2", "--eval-samples", "8", "--save-every", "2",
          "--warmup-steps", "1", "--device", "cpu", "--precision", "fp32", "--log",
          "tensorboard"])
    acc = events(out)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s",
            "val/val_image_to_text"} <= scalars, scalars
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]

    # the retrieval preview: a row per distinct validation caption (3 colours), the 6 images
    # the reranker ranks first for it, framed green where the image's caption is the row's
    from PIL import Image

    from kodalle_cli.rerank.model import load_reranker
    from kodalle_cli.rerank.train import PREVIEW_TILE, RIGHT, WRONG, load_val_pairs

    (grid,) = acc.Images("samples/preview")
    png = Image.open(out / "samples" / "step-0000002.png").convert("RGB")
    tile, pad = PREVIEW_TILE + 6, 2
    assert (grid.step, grid.width, grid.height) == (2, *png.size)
    assert png.size == (6 * tile + 7 * pad, 3 * tile + 4 * pad)
    images, captions = load_val_pairs(str(image_shards), 8)
    rows = list(dict.fromkeys(captions))
    sims = load_reranker(out).score(images, rows)
    seen = []
    for r, caption in enumerate(rows):
        best = sims[:, r].topk(6).indices.tolist()
        frames = [png.getpixel((pad + c * (tile + pad), pad + r * (tile + pad)))
                  for c in range(6)]
        assert frames == [RIGHT if captions[i] == caption else WRONG for i in best]
        seen += frames
    assert RIGHT in seen  # 8 images, 3 captions: some row's best 6 hold one of its own


@pytest.mark.parametrize("command, target", [
    (["train", "--backbone", "b"], "kodalle_cli.train.dalle.run_train"),
    (["train", "vqgan"], "kodalle_cli.vqgan.train.train_vqgan"),
    (["train", "reranker", "--backbone", "b"], "kodalle_cli.rerank.train.train_reranker"),
])
def test_each_training_command_takes_log_repeated_and_log_to(monkeypatch, command, target):
    from kodalle_cli.cli import main

    seen = {}

    def fake(cfg, *args, **kwargs):
        seen["log"] = cfg.log
        raise SystemExit(0)

    monkeypatch.setattr(target, fake)
    with pytest.raises(SystemExit):
        main([*command, "--log", "tensorboard", "--log-to", "wandb"])
    assert parse_logs(seen["log"]) == ("csv", "tensorboard", "wandb")
    with pytest.raises(SystemExit):
        main(command)
    assert parse_logs(seen["log"]) == ("csv",)


def test_a_run_that_stops_on_an_error_ends_its_wandb_run_as_failed(tmp_path, wandb_offline):
    class Diverging(Toy):
        def loss(self, model, batch):
            return model(batch["x"]).sum() * float("nan"), {}

    out = tmp_path / "run"
    with pytest.raises(KodalleError, match="non-finite losses in a row"):
        train(Diverging(), config(out, log=("wandb",), max_bad_steps=2))
    train(Toy(), config(tmp_path / "good", log=("wandb",), max_steps=1, eval_every=0,
                        sample_every=0))
    for run, status in ((out, 1), (tmp_path / "good", 0)):
        (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
        exits = [r.exit.exit_code for r in wandb_records(run_file)
                 if r.WhichOneof("record_type") == "exit"]
        assert exits == [status], (run, exits)
