"""The reranker: a tiny one trained on synthetic garments ranks the matching caption first,
its directory reloads to the same scores, and `kodalle rerank` prints images best first."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import write_image_shard

from kodalle_cli.backbone import get_backbone
from kodalle_cli.data.synthetic import random_garment, render
from kodalle_cli.experiments.tiny_backbone import build_klue_like
from kodalle_cli.rerank.model import (
    build_image_tower,
    build_reranker,
    contrastive_loss,
    find_image_weights,
    load_reranker,
    preprocess_images,
    save_reranker,
)

COLOURS = ("레드", "블루", "그린", "옐로우")
CATEGORIES = {"티셔츠": "상의", "스커트": "하의"}
CAPTIONS = [f"{part}에서 색상은 {c}이다. 카테고리는 {k}이다."
            for k, part in CATEGORIES.items() for c in COLOURS]
SIZE = 48


def synthetic_pairs(n: int, seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour, category = rng.choice(COLOURS), rng.choice(list(CATEGORIES))
        image, _ = render(random_garment(rng, colour, category), SIZE)
        out.append((image, f"{CATEGORIES[category]}에서 색상은 {colour}이다. "
                           f"카테고리는 {category}이다."))
    return out


def write_shard(path, pairs):
    write_image_shard(path, ((f"{i:06d}", image, caption, {"size": list(image.size)})
                             for i, (image, caption) in enumerate(pairs)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank-shards")
    write_shard(root / "train-000000.tar", synthetic_pairs(320, seed=1))
    write_shard(root / "val-000000.tar", synthetic_pairs(40, seed=2))
    return root


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    return build_klue_like(tmp_path_factory.mktemp("rr-backbone") / "klue", texts=CAPTIONS * 4,
                           vocab_size=128, hidden=32, layers=1)


@pytest.fixture(scope="module")
def trained(shards, backbone_dir, tmp_path_factory):
    from kodalle_cli.rerank.train import RerankerTrainConfig, train_reranker

    out = tmp_path_factory.mktemp("rr-run") / "reranker"
    cfg = RerankerTrainConfig(
        backbone=str(backbone_dir), data=str(shards), out=str(out), image_size=SIZE,
        embed_dim=32, text_seq_len=32, max_steps=100, batch_size=16, lr=2e-3,
        weight_decay=0.0, warmup_steps=10, eval_every=50, eval_samples=40, save_every=50,
        shuffle_buffer=64, device="cpu", precision="fp32",
    )
    return out, train_reranker(cfg, progress=False)


@pytest.mark.slow
def test_trained_reranker_ranks_the_matching_caption_first(trained):
    out, result = trained
    reranker = load_reranker(out)
    val = synthetic_pairs(48, seed=3)
    sims = reranker.score([p[0] for p in val], CAPTIONS)
    hits = sum(CAPTIONS[j] == cap for j, (_, cap) in zip(sims.argmax(1).tolist(), val,
                                                           strict=True))
    chance = 1 / len(CAPTIONS)
    assert hits / len(val) >= chance + 0.4, (hits, len(val))
    # the trainer's validation retrieval accuracy was recorded and beats chance as well
    assert result["val_image_to_text"] > result["val_chance"] + 0.3
    metrics = (out / "metrics.csv").read_text()
    assert "val_image_to_text" in metrics and "val_text_to_image" in metrics


@pytest.mark.slow
def test_reranker_directory_is_self_contained(trained, backbone_dir):
    out, _ = trained
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == SIZE and config["embed_dim"] == 32
    assert config["backbone_source"] == str(backbone_dir)
    assert (out / "text" / "config.json").is_file()
    assert (out / "text" / "model.safetensors").is_file()
    assert (out / "text" / "tokenizer.json").is_file()
    assert (out / "checkpoints").is_dir() and (out / "latest").is_file()
    # the trained text tower differs from the backbone it started from
    from safetensors.torch import load_file

    before = load_file(str(backbone_dir / "model.safetensors"))
    after = load_file(str(out / "text" / "model.safetensors"))
    key = next(k for k in after if k.endswith("word_embeddings.weight"))
    assert not torch.equal(before[next(k for k in before if k.endswith(
        "word_embeddings.weight"))], after[key])


def test_save_and_load_give_the_same_scores(backbone_dir, tmp_path):
    torch.manual_seed(0)
    model = build_reranker(get_backbone(str(backbone_dir)), image_size=SIZE, embed_dim=16)
    pairs = synthetic_pairs(4, seed=5)
    images = [p[0] for p in pairs]
    want = model.score(images, CAPTIONS)
    save_reranker(model, tmp_path / "r")
    got = load_reranker(tmp_path / "r").score(images, CAPTIONS)
    assert got.shape == (4, len(CAPTIONS))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ranked = load_reranker(tmp_path / "r").rank(images, CAPTIONS[0])
    assert [s for _, s in ranked] == pytest.approx(
        sorted((float(x) for x in want[:, 0]), reverse=True), abs=1e-5)


def test_image_weights_come_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = build_image_tower(None)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "effnet.safetensors"))
    loaded = build_image_tower(find_image_weights(tmp_path / "effnet.safetensors"))
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_preprocessing_resizes_and_normalises_any_image():
    from PIL import Image

    white = Image.new("RGB", (80, 40), (255, 255, 255))
    pixels = preprocess_images([white, Image.new("L", (10, 10), 0)], SIZE)
    assert pixels.shape == (2, 3, SIZE, SIZE)
    # white -> (1 - mean) / std per channel; black -> -mean / std
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([2.2489, 2.4286, 2.64]),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(pixels[1, :, 5, 5], torch.tensor([-2.1179, -2.0357, -1.8044]),
                               atol=1e-3, rtol=0)


def test_equal_captions_are_not_pushed_apart():
    # images 0 and 1 share one caption: rating both of its pairs equally is the optimum
    logits = torch.tensor([[5.0, 5.0, -5.0], [5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]],
                          requires_grad=True)
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    (soft_grad,) = torch.autograd.grad(contrastive_loss(logits, same), logits)
    (plain_grad,) = torch.autograd.grad(contrastive_loss(logits), logits)
    assert soft_grad.abs().max() < 1e-3  # nothing left to learn
    assert plain_grad[0, 1] > 0.1  # plain CLIP would push the twin caption away
    # with all captions distinct it is exactly CLIP's loss
    eye = torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(contrastive_loss(logits, eye), contrastive_loss(logits))


@pytest.mark.slow
def test_rerank_command_prints_images_best_first(trained, tmp_path, capsys):
    from kodalle_cli.cli import main

    out, _ = trained
    pairs = synthetic_pairs(6, seed=7)
    paths = []
    for i, (image, _) in enumerate(pairs):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    caption = pairs[2][1]
    main(["rerank", *map(str, paths), "--caption", caption, "--reranker", str(out),
          "--top", "3", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    scores = load_reranker(out).score([p[0] for p in pairs], [caption])[:, 0]
    best = torch.argsort(scores, descending=True)[:3].tolist()
    assert [r["image"] for r in rows] == [str(paths[i]) for i in best]
    assert [r["rank"] for r in rows] == [1, 2, 3]


def test_rerank_command_refuses_a_missing_reranker(tmp_path, capsys):
    from kodalle_cli.cli import main

    image = tmp_path / "a.png"
    synthetic_pairs(1, seed=0)[0][0].save(image)
    with pytest.raises(SystemExit) as exit_info:
        main(["rerank", str(image), "--caption", "x", "--reranker", str(tmp_path / "none")])
    assert exit_info.value.code == 1
    assert "not a reranker directory" in capsys.readouterr().err


def test_train_reranker_command_resumes_its_run(shards, backbone_dir, tmp_path):
    from kodalle_cli.cli import main
    from kodalle_cli.train.metrics import read_metrics

    out = tmp_path / "run"
    args = ["train", "reranker", "--backbone", str(backbone_dir), "--data", str(shards),
            "--out", str(out), "--image-size", "32", "--embed-dim", "8", "--batch-size", "4",
            "--eval-every", "2", "--eval-samples", "8", "--save-every", "2", "--warmup-steps",
            "1", "--device", "cpu", "--precision", "fp32"]
    main([*args, "--max-steps", "2"])
    assert (out / "checkpoints" / "step-0000002").is_dir()
    first = load_reranker(out).state_dict()
    main([*args, "--max-steps", "4", "--resume"])
    rows = read_metrics(out / "metrics.csv")
    val_steps = {r["step"] for r in rows if r["split"] == "val"}
    assert {2, 4} <= val_steps <= {0, 2, 4}  # (the trainer may also measure step 0)
    assert json.loads((out / "config.json").read_text())["image_size"] == 32
    after = load_reranker(out).state_dict()
    assert not torch.equal(first["image_proj.weight"], after["image_proj.weight"])


def test_train_reranker_resume_refuses_changed_settings_listing_them(shards, backbone_dir,
                                                                      tmp_path, capsys):
    from kodalle_cli.cli import main

    out = tmp_path / "run"
    args = ["train", "reranker", "--backbone", str(backbone_dir), "--data", str(shards),
            "--out", str(out), "--image-size", "32", "--embed-dim", "8", "--batch-size", "4",
            "--eval-every", "0", "--save-every", "1", "--warmup-steps", "1", "--device", "cpu",
            "--precision", "fp32"]
    main([*args, "--max-steps", "1"])
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 1e-4 and saved["embed_dim"] == 8
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--max-steps", "2", "--resume", "--lr", "0.001", "--seed", "3"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "holds a run with other settings" in lines[0], err
    assert "--lr" in lines[0] and "--seed" in lines[0] and "--embed-dim" not in lines[0].split(
        "Resuming")[0]
    assert "may change only --max-steps" in lines[0]
    assert not (out / "checkpoints" / "step-0000002").exists()
    assert json.loads((out / "train_config.json").read_text()) == saved  # kept as it was
    # what may change does not stop it
    main([*args, "--max-steps", "2", "--resume", "--eval-samples", "4"])
    assert (out / "checkpoints" / "step-0000002").is_dir()
