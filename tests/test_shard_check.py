"""The check of the token shards before training, cached in the run directory (issue 27
items 2 and 3): keyed by each shard's path, size and mtime, a restart reads only new or
changed shards; ``--check-shards full|new|off``; samples with codes outside the codebook
counted per shard in the cache and in metrics.csv."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_robustness_train import TINY, npy, rewrite_tar

from kodalle_cli.data import tokens as token_shards
from kodalle_cli.errors import ConfigError

VOCAB = 4000


@pytest.fixture
def damaged(tiny_dalle_data, tmp_path):
    """Three token shards of 24 / 24 / 12 samples: s00003 with a code outside the 64-entry
    codebook and s00005 with ids of the wrong length, both in train-000000.tar."""
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
    return backbone, tokens


def check(tokens, cache, mode="new", vocab=VOCAB):
    return token_shards.check_shards(tokens, num_text_tokens=vocab, max_bad_fraction=0.5,
                                     report=lambda message: None, mode=mode, cache=cache)


def summary(checks):
    return {split: (c.counts, [(b.shard, b.key, b.reason) for b in c.bad], c.out_of_range)
            for split, c in checks.items()}


def test_a_restart_reads_only_new_or_changed_shards(damaged, tmp_path):
    _, tokens = damaged
    cache = tmp_path / "run" / token_shards.CHECK_CACHE
    cold = check(tokens, cache)
    assert (cold["train"].read, cold["train"].reused) == (2, 0) and cold["val"].read == 1
    assert cold["train"].out_of_range == {"train-000000.tar": 1, "train-000001.tar": 0}
    saved = json.loads(cache.read_text(encoding="utf-8"))
    first = saved["shards"][str((tokens / "train-000000.tar").resolve())]
    assert first["out_of_range"] == 1 and first["bad_count"] == 2
    assert {b["key"] for b in first["bad"]} == {"s00003", "s00005"}
    assert first["good"] + 2 == first["expected"] == 24

    warm = check(tokens, cache)
    assert (warm["train"].read, warm["train"].reused, warm["val"].reused) == (0, 2, 1)
    assert summary(warm) == summary(cold)

    # one shard changed (its mtime): only it is read again
    shard = tokens / "val-000000.tar"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = check(tokens, cache)
    assert (again["train"].read, again["val"].read) == (0, 1)
    assert summary(again) == summary(cold)

    # full reads everything; a new vocabulary (another context) invalidates the cache
    assert check(tokens, cache, mode="full")["train"].read == 2
    assert check(tokens, cache, vocab=VOCAB + 1)["train"].read == 2


def test_a_cached_result_is_not_trusted_for_a_shard_whose_size_changed(damaged,
                                                                       tmp_path):
    _, tokens = damaged
    cache = tmp_path / token_shards.CHECK_CACHE
    check(tokens, cache)
    shard = tokens / "val-000000.tar"
    stat = shard.stat()
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # cut, and its mtime put back
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = check(tokens, cache)
    assert after["val"].read == 1 and after["val"].bad


def test_off_reads_nothing_and_a_bad_mode_names_the_flag(damaged, tmp_path):
    _, tokens = damaged
    cache = tmp_path / token_shards.CHECK_CACHE
    off = check(tokens, cache, mode="off")
    assert off["train"].read == off["train"].reused == 0 and not off["train"].bad
    assert off["train"].counts == {"train-000000.tar": 24, "train-000001.tar": 24}
    assert not cache.exists()
    with pytest.raises(ConfigError) as err:
        check(tokens, cache, mode="sometimes")
    assert err.value.as_flag().startswith("--check-shards sometimes: must be one of full")


def test_train_caches_the_check_in_the_run_and_counts_out_of_range_codes(
        damaged, tmp_path, capsys, one_thread, monkeypatch):
    from kodalle_cli.configs import DalleTrainConfig
    from kodalle_cli.train.dalle import run_train
    from kodalle_cli.train.metrics import read_metrics

    backbone, tokens = damaged
    cfg = dict(backbone=str(backbone), data=tokens, workers=0, max_bad_fraction=0.5,
               out=tmp_path / "run", **TINY)
    run_train(DalleTrainConfig(max_steps=1, **cfg))
    cache = tmp_path / "run" / token_shards.CHECK_CACHE
    assert len(json.loads(cache.read_text(encoding="utf-8"))["shards"]) == 3
    data = {r["metric"]: float(r["value"]) for r in read_metrics(tmp_path / "run/metrics.csv")
            if r["split"] == "data"}
    assert data["train_out_of_range"] == 1 and data["val_out_of_range"] == 0
    assert data["train_out_of_range/train-000000.tar"] == 1
    assert "train_out_of_range/train-000001.tar" not in data

    # the resume checks no shard again: the check reads none
    read = []
    real = token_shards.good_samples
    monkeypatch.setattr(token_shards, "check_shards", _spy(token_shards.check_shards, read))
    run_train(DalleTrainConfig(max_steps=2, resume=True, **cfg))
    assert read == [(0, 2), (0, 1)]
    assert token_shards.good_samples is real


def _spy(fn, seen):
    def spy(*args, **kwargs):
        result = fn(*args, **kwargs)
        seen.extend((c.read, c.reused) for c in result.values())
        return result

    return spy
