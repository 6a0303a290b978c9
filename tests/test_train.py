"""`kodalle train`: the run directory, learning, the shared trainer's guards, token shards."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from kodalle_cli.cli import main
from kodalle_cli.data.tokens import TokenBatches, TokenShardsWriter, read_manifest
from kodalle_cli.errors import KodalleError
from kodalle_cli.runs import load_run
from kodalle_cli.train.metrics import read_metrics
from kodalle_cli.train.trainer import Task, TrainerConfig, train

TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16", "--device", "cpu",
        "--workers", "0", "--no-progress"]


def val_losses(run):
    return {r["step"]: r["value"] for r in read_metrics(run / "metrics.csv")
            if r["split"] == "val" and r["metric"] == "loss"}


@pytest.mark.slow
def test_cli_train_writes_a_self_contained_run_that_learns(tiny_dalle_data, tmp_path):
    backbone, tokens, _vqgan = tiny_dalle_data
    run = tmp_path / "run"
    main(["train", "--backbone", str(backbone), "--data", str(tokens), "--out", str(run),
          *TINY, "--lr", "3e-3", "--warmup-steps", "5", "--batch-size", "8",
          "--max-steps", "60", "--save-every", "30", "--eval-every", "30",
          "--sample-every", "60", "--keep-last", "1"])
    # self-contained: config, tokenizer, VQGAN, checkpoints, latest, metrics, samples
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["text_seq_len"] == 16 and config["model"]["pad_id"] == 1
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    # checked on the run's captions: sampling reads tokenizer.json without transformers
    assert (run / "tokenizer" / "kodalle-raw-tokenizer.json").is_file()
    assert (run / "vqgan" / "model.safetensors").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-0000060"]  # --keep-last 1
    assert (run / "latest").read_text().strip() == "checkpoints/step-0000060"
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json", "rng.pt"):
        assert (run / "checkpoints" / "step-0000060" / name).is_file()
    assert (run / "samples" / "step-0000060.png").is_file()
    # learning: the validation loss clearly drops from step 0
    losses = val_losses(run)
    assert losses[60] < 0.75 * losses[0], losses
    # the run loads from its directory and from its checkpoint directory
    loaded = load_run(run)
    model = loaded.model
    assert loaded.tokenizer is not None and loaded.vqgan is not None
    assert model.config.dim == 32
    again = load_run(run / "checkpoints" / "step-0000060", with_vqgan=False).model
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_train_refuses_tokens_of_another_tokenizer(tiny_dalle_data, tiny_gpt2, tmp_path,
                                                   capsys):
    _backbone, tokens, _vqgan = tiny_dalle_data
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--backbone", str(tiny_gpt2), "--data", str(tokens), "--out",
              str(tmp_path / "run"), *TINY, "--max-steps", "2"])
    assert exit_info.value.code == 1
    assert "another tokenizer" in capsys.readouterr().err


class Regression(Task):
    """A toy task: the trainer is shared, so it is tested on something that is not a DALLE."""

    def __init__(self, poison_from: int | None = None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.poison_from = poison_from

    def train_batches(self, start, rank, world_size):
        i = start
        while True:
            g = torch.Generator().manual_seed(i)
            x = torch.randn(8, 4, generator=g)
            bad = self.poison_from is not None and i >= self.poison_from
            yield {"x": x, "y": x.sum(1, keepdim=True) * (float("nan") if bad else 1.0)}
            i += 1

    def loss(self, model, batch):
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        return loss, {}

    def batch_size(self, batch):
        return batch["x"].shape[0]


def test_the_trainer_takes_train_settings_by_name_with_trains_defaults(tmp_path):
    """TrainerConfig.from_options copies every setting DalleTrainConfig shares with the loop,
    and a TrainerConfig given none has `kodalle train`'s defaults (declared once, there)."""
    from kodalle_cli.configs import DalleTrainConfig

    shared = ({f.name for f in dataclasses.fields(TrainerConfig)}
              & {f.name for f in dataclasses.fields(DalleTrainConfig)}) - {"out"}
    assert {"lr", "batch_size", "grad_accum", "strategy", "max_bad_steps", "log"} <= shared
    changed = DalleTrainConfig(backbone="b", lr=0.5, grad_accum=3, strategy="fsdp",
                               keep_last=7, log=["csv", "tensorboard"])
    trainer = TrainerConfig.from_options(changed, out=tmp_path, keep_last=1)
    assert (trainer.out, trainer.keep_last, trainer.log) == (tmp_path, 1,
                                                             ("csv", "tensorboard"))
    for name in shared - {"keep_last", "log"}:
        assert getattr(trainer, name) == getattr(changed, name), name
    bare, default = TrainerConfig(out=tmp_path), DalleTrainConfig(backbone="b")
    for name in shared - {"log"}:
        assert getattr(bare, name) == getattr(default, name), name


def test_non_finite_losses_are_skipped_then_stop_with_the_good_checkpoint(tmp_path):
    cfg = TrainerConfig(out=tmp_path, lr=0.05, max_steps=20, warmup_steps=0, save_every=5,
                        eval_every=0, sample_every=0, max_bad_steps=3, device="cpu",
                        progress=False, log_every=1)
    with pytest.raises(KodalleError, match="3 non-finite losses in a row.*step-0000005"):
        train(Regression(poison_from=7), cfg)
    # the good checkpoint is intact and loadable; nothing after it was saved
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000005"]
    result = train(Regression(), dataclasses.replace(cfg, max_steps=8))
    assert result.step == 8 and np.isfinite(result.last_loss)


def test_grad_accum_equals_the_big_batch(tmp_path):
    def run(out, batch, accum):
        class Task2(Regression):
            def train_batches(self, start, rank, world_size):
                data = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
                i = start * batch
                while True:
                    x = data[torch.arange(i, i + batch) % 64]
                    yield {"x": x, "y": x.sum(1, keepdim=True)}
                    i += batch

        cfg = TrainerConfig(out=out, lr=0.05, max_steps=5, warmup_steps=2, batch_size=batch,
                            grad_accum=accum, save_every=100, eval_every=0, sample_every=0,
                            device="cpu", progress=False, log_every=1)
        return train(Task2(), cfg)

    big, small = run(tmp_path / "a", 8, 1), run(tmp_path / "b", 4, 2)
    for a, b in zip(big.history, small.history, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6


def write_counting_shards(root, n=23, shard_size=5):
    with TokenShardsWriter(root, text_seq_len=4, num_image_tokens=300, image_fmap_size=2,
                           pad_id=1, tokenizer_hash="t", vqgan={"hash": "v"},
                           shard_size=shard_size) as w:
        for i in range(n):
            w.write("train", f"s{i:03d}", np.array([i, 5, 1, 1]), np.full(4, i), f"cap {i}")
    return root


def take(ds, n, workers=0):
    it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
    return [next(it)["ids"][:, 0].tolist() for _ in range(n)]


def test_token_shards_format_and_manifest(tmp_path):
    root = write_counting_shards(tmp_path / "tokens")
    manifest = read_manifest(root)
    assert manifest["splits"]["train"]["count"] == 23 and manifest["codes_dtype"] == "int16"
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [5, 5, 5, 5, 3]
    assert not list(root.glob("*.tmp"))
    from kodalle_cli.data.tokens import read_shard

    first = read_shard(root / "train-000000.tar")[0]
    assert first["ids"].tolist() == [0, 5, 1, 1] and first["txt"] == "cap 0"


@pytest.mark.parametrize("workers", [0, 2])
def test_token_batches_resume_at_any_batch(tmp_path, workers):
    root = write_counting_shards(tmp_path / "tokens")
    full = take(TokenBatches(root, batch_size=3, seed=1), 12, workers)
    seen = sorted(x for b in full[:7] for x in b[:])  # an epoch and a bit: every sample
    assert set(seen) >= set(range(21)) or len(set(seen)) >= 20
    for start in (1, 4, 9):
        assert take(TokenBatches(root, batch_size=3, seed=1, start_batch=start), 12 - start,
                    workers) == full[start:]


@pytest.mark.parametrize("n,shard_size", [(24, 24), (24, 4)])  # by sample / by shard
def test_token_batches_split_between_ranks(tmp_path, n, shard_size):
    root = write_counting_shards(tmp_path / "tokens", n=n, shard_size=shard_size)
    ranks = [take(TokenBatches(root, batch_size=2, seed=3, rank=r, world_size=2), 6)
             for r in range(2)]
    epoch = [x for r in ranks for b in r for x in b]
    assert sorted(epoch) == list(range(24))  # disjoint, and together one whole epoch
    if shard_size == n:  # one shard: the same global batches as one process
        one = take(TokenBatches(root, batch_size=4, seed=3), 6)
        for step in range(6):
            assert sorted(one[step]) == sorted(ranks[0][step] + ranks[1][step])
