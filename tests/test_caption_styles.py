"""`train --caption-style`: token shards of K-Fashion samples hold the caption in every style
`prepare` can build, and training reads one style, or a style drawn per sample and epoch
(`mixed`), seeded so that a resumed or multi-rank run reads what one uninterrupted process
would."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from kodalle_cli.data import tokens as token_shards
from kodalle_cli.data.captions import CAPTION_STYLES, style_captions
from kodalle_cli.data.kfashion import wrap_labeling
from kodalle_cli.errors import KodalleError


@pytest.fixture(scope="module")
def kfashion_tokens(tmp_path_factory, tiny_klue):
    """Synthetic K-Fashion -> prepare (16 px, per-part captions) -> tokenize (tiny VQGAN)."""
    from conftest import save_tiny_vqgan

    from kodalle_cli.configs import PrepareConfig, TokenizeConfig
    from kodalle_cli.data.prepare import prepare
    from kodalle_cli.data.synthetic import generate
    from kodalle_cli.tokenize_shards import tokenize

    root = tmp_path_factory.mktemp("caption-styles")
    generate(root / "kfashion", 40, size=32, seed=0, split_dirs=True)
    shards = root / "shards"
    prepare(PrepareConfig(source=root / "kfashion", out=shards, image_size=16,
                          val_fraction=0.2, shard_size=12, workers=1, progress=False))
    vqgan = save_tiny_vqgan(root / "vqgan")
    tokenize(TokenizeConfig(shards=shards, vqgan=str(vqgan), backbone=str(tiny_klue),
                            text_seq_len=96, device="cpu", progress=False))
    return {"root": root, "shards": shards, "tokens": shards / "tokens", "vqgan": vqgan,
            "backbone": tiny_klue}


def _samples(tokens: Path) -> list[dict]:
    manifest = token_shards.read_manifest(tokens)
    return [s for split in ("train", "val") for shard in manifest["splits"][split]["shards"]
            for s in token_shards.read_shard(tokens / shard["name"])]


def test_tokenize_writes_every_style_of_each_label(kfashion_tokens):
    from kodalle_cli.backbone import get_backbone
    from kodalle_cli.data.shards import iter_image_samples
    from kodalle_cli.text import CaptionEncoder

    tokens = kfashion_tokens["tokens"]
    manifest = token_shards.read_manifest(tokens)
    assert manifest["caption_styles"] == list(CAPTION_STYLES)
    text = CaptionEncoder.for_backbone(get_backbone(str(kfashion_tokens["backbone"])), 96)
    labels = {s.key: s.meta["labels"] for s in iter_image_samples(kfashion_tokens["shards"],
                                                                  split=None, decode=False)}
    samples = _samples(tokens)
    assert len(samples) == 40
    for s in samples:
        captions = style_captions(wrap_labeling(labels[s["key"]]))
        assert len(set(captions)) == 3, captions  # three different sentences
        want, _ = text.encode_batch(captions)
        assert s["styles"].shape == (3, 96)
        assert np.array_equal(s["styles"], want)
        assert np.array_equal(s["ids"], s["styles"][CAPTION_STYLES.index("per-part")])
    stats = json.loads((tokens / "train-000000_stats.json").read_text(encoding="utf-8"))
    assert stats["caption_styles"] == list(CAPTION_STYLES) and stats["truncated_styles"] == 0


def _stream(tokens, n_batches, **kw):
    batches = token_shards.TokenBatches(tokens, "train", batch_size=4, seed=3, **kw)
    it = iter(batches)
    return [next(it)["ids"].numpy() for _ in range(n_batches)]


def _style_of(ids: np.ndarray, samples: list[dict]) -> str:
    for s in samples:
        for k, row in enumerate(s["styles"]):
            if np.array_equal(row, ids):
                return CAPTION_STYLES[k]
    raise AssertionError("ids of no sample's styles")


def test_mixed_draws_every_style_per_epoch_and_resumes_exactly(kfashion_tokens):
    tokens = kfashion_tokens["tokens"]
    samples = _samples(tokens)
    per_epoch = len(token_shards.TokenBatches(tokens, "train", batch_size=4)) // 4
    straight = _stream(tokens, 3 * per_epoch, caption_style="mixed")
    drawn = Counter(_style_of(row, samples) for b in straight for row in b)
    assert set(drawn) == set(CAPTION_STYLES) and min(drawn.values()) > 0.15 * sum(
        drawn.values()), drawn
    first = _stream(tokens, per_epoch, caption_style="mixed")
    assert np.array_equal(np.concatenate(first), np.concatenate(straight[:per_epoch]))
    # resuming at any batch reads what the uninterrupted stream read
    for start in (1, per_epoch - 1, per_epoch + 2):
        resumed = _stream(tokens, 4, caption_style="mixed", start_batch=start)
        for a, b in zip(resumed, straight[start:start + 4], strict=True):
            assert np.array_equal(a, b)
    # ranks split an epoch's samples, and each sample reads the style one process gives it
    batches = token_shards.TokenBatches(tokens, "train", batch_size=4, seed=3,
                                        caption_style="mixed")

    def epoch0(slot, slots):
        n = sum(len(p) for _, p in batches._plan(0, slot, slots))
        stream = batches._samples(slot, slots, 0)
        return {s["key"]: tuple(s["ids"]) for s in (next(stream) for _ in range(n))}

    one = epoch0(0, 1)
    two = [epoch0(r, 2) for r in (0, 1)]
    assert not two[0].keys() & two[1].keys() and {**two[0], **two[1]} == one
    # a sample reads other styles in other epochs
    stream = batches._samples(0, 1, 0)
    seen: dict[str, set] = {}
    for s in (next(stream) for _ in range(3 * len(one))):
        seen.setdefault(s["key"], set()).add(tuple(s["ids"]))
    assert sum(len(v) > 1 for v in seen.values()) > len(seen) / 2
    # one style: every caption is that style's
    compact = _stream(tokens, per_epoch, caption_style="compact")
    assert {_style_of(row, samples) for b in compact for row in b} == {"compact"}
    # as-prepared reads the shards' ids
    plain = _stream(tokens, per_epoch)
    assert {_style_of(row, samples) for b in plain for row in b} == {"per-part"}


def test_styles_need_kfashion_shards_one_line(tiny_dalle_data):
    _, tokens, _ = tiny_dalle_data
    with pytest.raises(KodalleError) as info:
        token_shards.TokenBatches(tokens, "train", batch_size=4, caption_style="mixed")
    assert "one caption per sample" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(KodalleError, match="must be one of as-prepared, mixed, per-part"):
        token_shards.TokenBatches(tokens, "train", batch_size=4, caption_style="loud")
    # shards without styles still train as they are
    assert len(_stream(tokens, 2)) == 2


def test_bad_styles_are_bad_samples(kfashion_tokens, tmp_path):
    manifest = token_shards.read_manifest(kfashion_tokens["tokens"])
    raw = {"__key__": "k", "ids.npy": token_shards._npy_bytes(np.zeros(96, np.int32)),
           "codes.npy": token_shards._npy_bytes(np.zeros(16, np.int16)), "txt": b"c"}
    assert token_shards._parse(raw, manifest, 100)[1].startswith("no styles.npy")
    raw["styles.npy"] = token_shards._npy_bytes(np.zeros((2, 96), np.int32))
    assert "styles.npy has shape (2, 96)" in token_shards._parse(raw, manifest, 100)[1]
    raw["styles.npy"] = token_shards._npy_bytes(np.full((3, 96), 100, np.int32))
    assert "outside the vocabulary" in token_shards._parse(raw, manifest, 100)[1]
    raw["styles.npy"] = token_shards._npy_bytes(np.ones((3, 96), np.int32))
    sample, why = token_shards._parse(raw, manifest, 100)
    assert why == "" and sample["styles"].shape == (3, 96)


def test_token_shards_of_an_older_tokenize_are_redone_with_styles(kfashion_tokens, tmp_path):
    import shutil

    from kodalle_cli.configs import TokenizeConfig
    from kodalle_cli.tokenize_shards import tokenize

    out = tmp_path / "tokens"
    shutil.copytree(kfashion_tokens["tokens"], out)
    stats = out / "train-000000_stats.json"
    old = json.loads(stats.read_text(encoding="utf-8"))
    del old["caption_styles"]
    stats.write_text(json.dumps(old), encoding="utf-8")
    summary = tokenize(TokenizeConfig(
        shards=kfashion_tokens["shards"], out=out, vqgan=str(kfashion_tokens["vqgan"]),
        backbone=str(kfashion_tokens["backbone"]), text_seq_len=96, device="cpu",
        progress=False))
    assert summary.shards_written == 1 and summary.shards_skipped >= 2
    assert token_shards.read_manifest(out)["caption_styles"] == list(CAPTION_STYLES)


TINY = dict(dim=32, depth=1, heads=2, dim_head=16, device="cpu", progress=False, lr=1e-3,
            warmup_steps=1, batch_size=4, save_every=3, eval_every=100, sample_every=0,
            workers=0, keep_last=0)


def test_train_mixed_resumes_bitwise_and_refuses_another_style(kfashion_tokens, tmp_path,
                                                              one_thread):
    from kodalle_cli.configs import DalleTrainConfig
    from kodalle_cli.train.dalle import run_train

    base = dict(backbone=str(kfashion_tokens["backbone"]), data=kfashion_tokens["tokens"],
                caption_style="mixed", **TINY)
    import shutil

    run_train(DalleTrainConfig(**base, out=tmp_path / "straight", max_steps=12))
    # the run as a kill after step 6's checkpoint leaves it, then resumed
    shutil.copytree(tmp_path / "straight", tmp_path / "cut")
    for later in ("step-0000009", "step-0000012"):
        shutil.rmtree(tmp_path / "cut/checkpoints" / later)
    (tmp_path / "cut/latest").write_text("checkpoints/step-0000006\n", encoding="utf-8")
    run_train(DalleTrainConfig(**base, out=tmp_path / "cut", max_steps=12))
    want = load_file(tmp_path / "straight/checkpoints/step-0000012/model.safetensors")
    got = load_file(tmp_path / "cut/checkpoints/step-0000012/model.safetensors")
    assert all(got[k].equal(want[k]) for k in want)
    config = json.loads((tmp_path / "straight/config.json").read_text(encoding="utf-8"))
    assert config["train"]["caption_style"] == "mixed"
    # another style on resume is refused (the data order would change)
    with pytest.raises(KodalleError, match="--caption-style mixed \\(now compact\\)"):
        run_train(DalleTrainConfig(**{**base, "caption_style": "compact"},
                                   out=tmp_path / "cut", max_steps=13))
    # mixed reads other captions than as-prepared: the weights differ
    run_train(DalleTrainConfig(**{**base, "caption_style": "as-prepared"},
                               out=tmp_path / "plain", max_steps=12))
    plain = load_file(tmp_path / "plain/checkpoints/step-0000012/model.safetensors")
    assert not all(plain[k].equal(want[k]) for k in want)
