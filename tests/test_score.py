"""Scores: torch-fidelity's FID/KID/IS on two PNG folders (with an Inception built locally from
torch-fidelity's own extractor class and random weights), CLIP-score and R-precision."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_model_and_vqgan, write_image_shard
from PIL import Image

from kodalle_cli.data.synthetic import COLOURS, random_garment, render
from kodalle_cli.errors import KodalleError
from kodalle_cli.score import (
    ScoreConfig,
    fidelity_metrics,
    fidelity_settings,
    inception_weights,
    reranker_metrics,
    run_score,
    write_pngs,
    write_random_inception_weights,
)

N = 8  # Inception runs at 299 px on the CPU: keep the sets small
SIZE = 32
CATEGORIES = ("티셔츠", "스커트", "코트")


def garments(n: int, seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour, category = rng.choice(list(COLOURS)), rng.choice(CATEGORIES)
        image, _ = render(random_garment(rng, colour, category), SIZE)
        out.append((image, f"색상은 {colour}이다. 카테고리는 {category}이다."))
    return out


def shifted(image: Image.Image) -> Image.Image:
    """The same picture, darker and tinted: a different distribution."""
    arr = np.asarray(image).astype(np.int16)
    return Image.fromarray(np.clip(arr * 0.5 + np.array([60, 0, 30]), 0, 255).astype(np.uint8))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inc.pth")


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("score-shards")
    pairs = enumerate(garments(40, seed=11))
    write_image_shard(root / "val-000000.tar",
                      [(f"{i:06d}", image, caption) for i, (image, caption) in pairs])
    return root


@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero_and_a_shifted_set_is_farther(weights, tmp_path):
    images = [g[0] for g in garments(N, seed=1)]
    a = write_pngs(images, tmp_path / "a", SIZE)
    b = write_pngs([shifted(im) for im in images], tmp_path / "b", SIZE)
    settings = fidelity_settings(N, N)
    same = fidelity_metrics(a, a, weights, torch.device("cpu"), settings)
    other = fidelity_metrics(a, b, weights, torch.device("cpu"), settings)
    assert abs(same["fid"]) < 1e-3
    assert abs(same["kid_mean"]) < 1e-3
    assert other["fid"] > 1.0 and other["fid"] > 1000 * abs(same["fid"])
    assert other["kid_mean"] > same["kid_mean"]
    assert same["is_mean"] >= 1.0


@pytest.mark.slow
def test_score_images_made_elsewhere_writes_score_json(
        weights, val_shards, tmp_path, capsys):
    from kodalle_cli.cli import main

    folder = tmp_path / "made-elsewhere"
    folder.mkdir()
    for i, (image, caption) in enumerate(garments(N, seed=5)):
        image.resize((48, 48)).save(folder / f"{i}.jpg")  # another size and format
        (folder / f"{i}.txt").write_text(caption, encoding="utf-8")
    reranker_dir = tiny_reranker(tmp_path / "reranker")
    out = tmp_path / "score"
    main(["score", "--images", str(folder), "--data", str(val_shards), "--num-samples", str(N),
          "--inception-weights", str(weights), "--reranker", str(reranker_dir),
          "--out", str(out), "--image-size", str(SIZE), "--device", "cpu", "--json"])
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "score.json").read_text())
    assert printed == saved
    assert saved["num_samples"] == N and saved["reference_samples"] == N
    assert saved["tool"]["name"] == "torch-fidelity" and saved["tool"]["version"]
    assert saved["image_size"] == SIZE and saved["image_format"] == "png"
    for name in ("fid", "kid_mean", "kid_std", "is_mean", "is_std", "clip_score", "r_precision"):
        assert np.isfinite(saved["metrics"][name]), name
    assert 0.0 <= saved["metrics"]["r_precision"] <= 1.0
    assert saved["metrics"]["reranker_samples"] == N
    pngs = sorted((out / "generated").glob("*.png"))
    assert len(pngs) == N and Image.open(pngs[0]).size == (SIZE, SIZE)
    assert len(list((out / "reference").glob("*.png"))) == N


def tiny_run(run, tokenizer_dir):
    """A DALLE run directory (config, tokenizer, VQGAN, one checkpoint) with random weights."""
    from transformers import AutoTokenizer

    from kodalle_cli.runs import save_run

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model, vqgan = tiny_model_and_vqgan(tokenizer, text_seq_len=24)
    save_run(run, model, tokenizer, vqgan, step=1)
    return run


@pytest.mark.slow
def test_score_a_run_end_to_end_and_fid_equals_torch_fidelity_cli(
        weights, val_shards, tiny_klue, tmp_path, capsys):
    from kodalle_cli.cli import main

    run = tiny_run(tmp_path / "runs" / "tiny", tiny_klue)
    main(["score", "--checkpoint", str(run), "--data", str(val_shards), "--num-samples", str(N),
          "--inception-weights", str(weights), "--device", "cpu", "--json"])
    result = json.loads(capsys.readouterr().out)
    out = run / "score"
    assert json.loads((out / "score.json").read_text()) == result
    assert result["checkpoint"] == str(run) and result["num_samples"] == N
    assert result["image_size"] == 8  # the tiny VQGAN's images; the reference is resized to it
    assert {Image.open(p).size for p in (out / "reference").glob("*.png")} == {(8, 8)}

    # torch-fidelity's own command line on the same two folders gives the same FID
    cmd = [sys.executable, "-m", "torch_fidelity.fidelity", "--cpu", "--silent", "--json",
           "--fid", "--no-cache", "--save-cpu-ram", "--input1", str(out / "generated"),
           "--input2", str(out / "reference"), "--feature-extractor-weights-path", str(weights)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600, env=env)
    theirs = json.loads(proc.stdout)["frechet_inception_distance"]
    assert result["metrics"]["fid"] == pytest.approx(theirs, rel=1e-6, abs=1e-9)


def tiny_reranker(out):
    from kodalle_cli.backbone import get_backbone
    from kodalle_cli.experiments.tiny_backbone import build_klue_like
    from kodalle_cli.rerank.model import build_reranker, save_reranker

    captions = [g[1] for g in garments(40, seed=11)]
    backbone = build_klue_like(out.parent / "klue", texts=captions, vocab_size=96, hidden=16,
                               layers=1)
    torch.manual_seed(0)
    return save_reranker(build_reranker(get_backbone(str(backbone)), image_size=32,
                                        embed_dim=8), out)


class OracleReranker:
    """Embeds an image as one-hot of its caption's index: a perfect reranker (or its opposite)."""

    def __init__(self, texts, truth, flip=False):
        self.index = {t: i for i, t in enumerate(texts)}
        self.truth, self.flip = truth, flip

    def embed_images(self, images):
        hot = torch.nn.functional.one_hot(torch.tensor([self.index[self.truth[id(im)]]
                                                        for im in images]), len(self.index))
        return (1 - hot if self.flip else hot).float()

    def embed_captions(self, captions):
        return torch.nn.functional.one_hot(torch.tensor([self.index[c] for c in captions]),
                                           len(self.index)).float()


def test_r_precision_and_clip_score_follow_the_reranker():
    pool = [f"caption {i}" for i in range(150)]
    images = [object() for _ in range(20)]
    captions = pool[:20]
    truth = {id(im): c for im, c in zip(images, captions, strict=True)}
    good = reranker_metrics(OracleReranker(pool, truth), images, captions, pool)
    assert good == {"clip_score": 1.0, "r_precision": 1.0, "r_precision_candidates": 100}
    bad = reranker_metrics(OracleReranker(pool, truth, flip=True), images, captions, pool)
    assert bad["clip_score"] == 0.0 and bad["r_precision"] == 0.0
    # a small pool: every other distinct caption is a candidate, and the count is recorded
    few = reranker_metrics(OracleReranker(pool, truth), images, captions, pool[:30])
    assert few["r_precision_candidates"] == 30


def test_offline_without_inception_weights_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KodalleError, match="--inception-weights PATH"):
        inception_weights(None)
    with pytest.raises(KodalleError, match="does not exist"):
        inception_weights(tmp_path / "missing.pth")


def test_pickled_inception_files_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "obj": object.__new__(ScoreConfig)}, path)
    with pytest.raises(KodalleError, match="plain-tensor"):
        inception_weights(path)


def test_score_needs_exactly_one_source():
    with pytest.raises(KodalleError, match="exactly one"):
        run_score(ScoreConfig())
