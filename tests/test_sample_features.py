"""`kodalle sample --init-image` (image prompts), `--rank perplexity`, and the memorisation
check of `kodalle score`, on tiny models and tiny runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_model_and_vqgan
from PIL import Image

from kodalle_cli.errors import ConfigError, UsageError
from kodalle_cli.model.sampling import SamplingSettings, generate_codes, row_uniforms


def tiny_dalle(**options):
    from kodalle_cli.model.dalle import DALLE, DALLEConfig

    torch.manual_seed(0)
    cfg = DALLEConfig(num_text_tokens=40, num_image_tokens=24, image_fmap_size=4, dim=32,
                      depth=2, heads=2, dim_head=16, text_seq_len=6, pad_id=1, bos_id=0,
                      **options)
    model = DALLE(cfg).eval()
    with torch.no_grad():  # peaky logits, as in test_sample.py
        for block in model.blocks:
            block.attn_scale.fill_(1.0)
            block.ff_scale.fill_(1.0)
    return model


TEXT = torch.randint(5, 40, (3, 6), generator=torch.Generator().manual_seed(1))
UNIFORMS = torch.stack([row_uniforms(0, 0, i, 16) for i in range(3)])
PROMPT = torch.randint(0, 24, (1, 6), generator=torch.Generator().manual_seed(3))


# ---- the decoding loop with an image prompt --------------------------------------------------
@pytest.mark.parametrize("options", [
    {}, {"shift_tokens": True, "rotary_emb": True, "attn_types": "full,axial_row"},
    {"reversible": True, "attn_types": "axial_col,conv_like"},
])
@pytest.mark.parametrize("settings", [
    dict(temperature=0.0, top_k=None),
    dict(temperature=1.0, top_k=0.8, cond_scale=3.0),
])
def test_kept_codes_stay_and_cached_completion_equals_full_recomputation(options, settings):
    model = tiny_dalle(**options)
    s = SamplingSettings(**settings)
    cached, lp_cached = generate_codes(model, TEXT, UNIFORMS, s, init_codes=PROMPT,
                                       return_logprobs=True)
    full, lp_full = generate_codes(model, TEXT, UNIFORMS, s, init_codes=PROMPT,
                                   use_cache=False, return_logprobs=True)
    assert torch.equal(cached, full)
    torch.testing.assert_close(lp_cached, lp_full, rtol=1e-4, atol=1e-4)
    assert torch.equal(cached[:, :6], PROMPT.expand(3, 6))  # 1.5 rows kept in every output
    # the prompt changes what follows it (else the test would prove nothing)
    assert not torch.equal(cached, generate_codes(model, TEXT, UNIFORMS, s))


def test_mean_logprob_is_the_model_s_own_likelihood_of_its_codes():
    model = tiny_dalle()
    s = SamplingSettings(top_k=0.5, temperature=0.7, cond_scale=2.0)
    codes, mean = generate_codes(model, TEXT, UNIFORMS, s, return_logprobs=True)
    t, n = model.config.num_text_logits, 16
    logits = model(TEXT, codes)[:, 6:6 + n, t:].float()  # position 6 + j predicts code j
    own = logits.log_softmax(-1).gather(-1, codes[..., None]).squeeze(-1).mean(-1)
    torch.testing.assert_close(mean, own, rtol=1e-4, atol=1e-4)
    _, kept_mean = generate_codes(model, TEXT, UNIFORMS, s, init_codes=PROMPT,
                                  return_logprobs=True)
    assert kept_mean.shape == (3,) and (kept_mean < 0).all()


# ---- `sample` with --init-image and --rank perplexity -----------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tiny_klue):
    from transformers import AutoTokenizer

    from kodalle_cli.runs import LoadedRun
    from kodalle_cli.text import CaptionEncoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_klue)
    model, vqgan = tiny_model_and_vqgan(tokenizer, text_seq_len=12)
    encoder = CaptionEncoder(tokenizer, model.config.text_seq_len, model.config.pad_id)
    return LoadedRun(model, encoder, vqgan, source="tiny",
                     config={"model": {"dim": 32}, "train": {"cond_drop": 0.1}})


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (20, 12, 3), dtype=np.uint8)).save(path)
    return path


def _config(tmp_path, **kw):
    from kodalle_cli.sample import SampleConfig

    base = dict(captions=["상의에서 색상은 레드이다."], n=3, out=tmp_path / "out", seed=5,
                device="cpu", progress=False, top_k=0.5)
    base.update(kw)
    return SampleConfig(**base)


def test_init_image_keeps_rows_in_every_output_and_records_the_prompt(tiny_run, photo,
                                                                      tmp_path):
    from kodalle_cli.data.images import fit, to_tensor
    from kodalle_cli.sample import sample

    [res] = sample(_config(tmp_path, init_image=photo, init_rows=2), tiny_run)
    fmap = tiny_run.model.config.image_fmap_size  # 4 rows of 4 codes
    image = fit(Image.open(photo).convert("RGB"), 8, "pad")
    want = tiny_run.vqgan.encode(to_tensor([image]))[0, :2 * fmap]
    assert all(torch.equal(c[:2 * fmap], want) for c in res.codes)
    saved = np.load(res.directory / "codes.npy")
    assert (saved[:, :2 * fmap] == want.numpy()).all()
    meta = json.loads((res.directory / "metadata.json").read_text(encoding="utf-8"))
    init = meta["init_image"]
    assert init["source"] == str(photo) and init["kept_rows"] == 2
    assert init["kept_tokens"] == 8 and init["codes"] == want.tolist()
    prompt = Image.open(res.directory / init["file"])
    assert prompt.size == (8, 8)
    # the grid: the prompt in a column of its own, left of the 2x2 grid of the 3 results
    grid = Image.open(res.directory / "grid.png")
    assert grid.size == ((8 + 2 * 2) + 2 + (2 * 8 + 3 * 2), 2 * 8 + 3 * 2)
    # --init-tokens keeps any number of codes, a row not ended included
    [part] = sample(_config(tmp_path, out=None, init_image=photo, init_tokens=5), tiny_run)
    assert all(torch.equal(c[:5], want[:5]) for c in part.codes)
    assert part.metadata["init_image"]["kept_rows"] == 1.25


def test_init_image_without_caption_uses_the_null_caption_of_cond_drop_runs(tiny_run, photo,
                                                                            tmp_path):
    from kodalle_cli.runs import LoadedRun
    from kodalle_cli.sample import sample

    [res] = sample(_config(tmp_path, captions=[], init_image=photo), tiny_run)
    assert res.caption == "" and res.directory.name == "photo-completed"
    assert res.metadata["init_image"]["kept_rows"] == 2  # default: half the rows
    ids = res.metadata["token_ids"]
    assert ids == []  # no caption tokens: all padding
    untrained = LoadedRun(tiny_run.model, tiny_run.caption_encoder, tiny_run.vqgan, "tiny",
                          {"train": {"cond_drop": 0.0}})
    with pytest.raises(UsageError, match="--cond-drop"):
        sample(_config(tmp_path, captions=[], init_image=photo), untrained)


def test_image_prompt_options_are_checked(tiny_run, photo, tmp_path):
    from kodalle_cli.sample import sample

    with pytest.raises(ConfigError) as info:
        sample(_config(tmp_path, init_image=photo, init_rows=4), tiny_run)
    assert info.value.as_flag().startswith("--init-rows 4: must leave codes to draw")
    with pytest.raises(UsageError, match="--init-rows needs --init-image"):
        _config(tmp_path, init_rows=2).validate()
    with pytest.raises(UsageError, match="not both"):
        _config(tmp_path, init_image=photo, init_rows=1, init_tokens=3).validate()
    with pytest.raises(UsageError, match="no such file"):
        _config(tmp_path, init_image=tmp_path / "missing.jpg").validate()


def test_rank_perplexity_orders_by_the_model_s_mean_logprob(tiny_run, tmp_path):
    from kodalle_cli.sample import sample

    [plain] = sample(_config(tmp_path, out=None, n=4), tiny_run)
    [ranked] = sample(_config(tmp_path, n=4, rank="perplexity", keep=2), tiny_run)
    lp = ranked.metadata["mean_logprobs"]
    assert lp == plain.metadata["mean_logprobs"]  # recorded for every call: it is free
    best = sorted(range(4), key=lambda i: -lp[i])[:2]
    assert [im["image_index"] for im in ranked.metadata["images"]] == best
    assert ranked.metadata["ranked_by"] == "perplexity"
    assert torch.equal(ranked.codes, plain.codes[best])
    assert sorted(p.name for p in ranked.directory.glob("0*.png")) == ["0000.png", "0001.png"]
    with pytest.raises(UsageError, match="--rank"):
        _config(tmp_path, rank="clip").validate()
    with pytest.raises(UsageError, match="give one"):
        _config(tmp_path, rank="perplexity", rerank=tmp_path).validate()


def test_cli_image_prompt_and_rank(tiny_run, photo, tmp_path, monkeypatch, capsys):
    from test_sample import _write_run

    from kodalle_cli.cli import main

    run = _write_run(tmp_path / "runs" / "tiny", tiny_run)
    monkeypatch.chdir(tmp_path)
    main(["sample", "상의에서 색상은 레드이다.", "--init-image", str(photo), "--init-rows", "1",
          "-n", "2", "--rank", "perplexity", "--keep", "1", "--device", "cpu",
          "--checkpoint", str(run), "--seed", "1"])
    [folder] = (tmp_path / "samples").iterdir()
    meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    assert meta["init_image"]["kept_rows"] == 1 and len(meta["images"]) == 1
    assert (folder / "prompt.png").is_file()


# ---- memorisation ----------------------------------------------------------------------------
def test_memorisation_flags_copies_against_the_held_out_threshold():
    from kodalle_cli.memorisation import Pool, check, near_copy_threshold

    g = torch.Generator().manual_seed(0)
    train = Pool(torch.randint(0, 64, (40, 16), generator=g),
                 [f"t{i}" for i in range(40)], ["train-000000.tar"] * 40)
    val = Pool(torch.randint(0, 64, (30, 16), generator=g))
    copies = train.vectors[[3, 7, 11]].clone()
    copies[0, 0] = (copies[0, 0] + 1) % 64  # one code off: still a near-copy
    fresh = torch.randint(0, 64, (5, 16), generator=g)
    result = check(generated=torch.cat([copies, fresh]), train=train, heldout=val,
                   method="vqgan-hamming")
    assert result["near_copies"] == 3 and result["near_copy_share"] == 3 / 8
    assert [r["train_key"] for r in result["nearest"][:3]] == ["t3", "t7", "t11"]
    assert result["nearest"][0]["distance"] == pytest.approx(1 / 16)
    assert result["closest"][0]["distance"] == 0.0 and result["closest"][0]["near_copy"]
    assert result["threshold"] > 0.5  # random codes differ in most positions
    assert "validation images" in result["threshold_rule"]
    assert sum(result["histogram"]["generated"]) == 8
    assert sum(result["histogram"]["heldout"]) == 30
    assert near_copy_threshold([0.5, 0.6, 0.9]) == pytest.approx(0.502)
    # no validation split: the training images against each other (never against themselves)
    alone = check(generated=copies, train=train, heldout=None, method="vqgan-hamming")
    assert alone["threshold"] > 0.5 and alone["near_copies"] == 3
    assert "nearest other training image" in alone["threshold_rule"]
    # embeddings: 1 - cosine
    emb = torch.nn.functional.normalize(torch.randn(10, 8, generator=g), dim=-1)
    by_emb = check(generated=emb[:2], train=Pool(emb, [str(i) for i in range(10)],
                                                 [""] * 10),
                   heldout=None, method="reranker-embedding")
    assert by_emb["near_copies"] == 2 and by_emb["closest"][0]["distance"] < 1e-6


@pytest.fixture(scope="module")
def kfashion_run(tmp_path_factory, tiny_klue, one_thread):
    from test_attributes import build_kfashion_run

    return build_kfashion_run(tmp_path_factory.mktemp("kfashion-memo"), tiny_klue)


def test_score_reports_near_copies_of_training_images(kfashion_run, tmp_path):
    """Images that are training images are all near-copies; validation images (mostly) not."""
    from kodalle_cli.configs import ScoreConfig
    from kodalle_cli.data.shards import iter_image_samples
    from kodalle_cli.score import run_score

    shards = kfashion_run["shards"]
    for split in ("train", "val"):
        folder = tmp_path / split
        folder.mkdir()
        for s in iter_image_samples(shards, split=split):
            s.image.save(folder / f"{s.key}.png")
    common = dict(data=str(shards), fidelity=False, device="cpu", progress=False)
    copied = run_score(ScoreConfig(images=str(tmp_path / "train"), num_samples=8,
                                   out=str(tmp_path / "copied"), **common))
    memo = copied["memorisation"]
    assert memo["method"] == "vqgan-hamming" and memo["near_copy_share"] == 1.0, memo
    assert copied["metrics"]["near_copy_share"] == 1.0
    assert (tmp_path / "copied" / "closest_pairs.png").is_file()
    saved = json.loads((tmp_path / "copied" / "score.json").read_text(encoding="utf-8"))
    assert saved["memorisation"]["closest"] == memo["closest"]
    assert memo["heldout_images"] >= 1 and len(memo["nearest"]) == 8
    held = run_score(ScoreConfig(images=str(tmp_path / "val"), num_samples=8,
                                 out=str(tmp_path / "held"), **common))["memorisation"]
    assert held["near_copy_share"] <= 0.5  # the threshold's own images: ~1% by construction
    # the run itself (its own codes) and --no-copies
    scored = run_score(ScoreConfig(checkpoint=str(kfashion_run["run"]), num_samples=4,
                                   out=str(tmp_path / "run"), **common))
    assert scored["memorisation"]["generated_images"] == 4
    off = run_score(ScoreConfig(images=str(tmp_path / "train"), num_samples=2, copies=False,
                                out=str(tmp_path / "off"), **common))
    assert "memorisation" not in off and "near_copy_share" not in off["metrics"]


def test_score_memorisation_by_reranker_embedding(kfashion_run, tiny_reranker, tmp_path):
    from kodalle_cli.configs import ScoreConfig
    from kodalle_cli.data.shards import iter_image_samples
    from kodalle_cli.score import run_score

    folder = tmp_path / "copies"
    folder.mkdir()
    for s in list(iter_image_samples(kfashion_run["shards"], split="train"))[:3]:
        s.image.save(folder / f"{s.key}.png")
    shutil.copy(folder / sorted(p.name for p in folder.iterdir())[0], folder / "again.png")
    memo = run_score(ScoreConfig(images=str(folder), data=str(kfashion_run["shards"]),
                                 reranker=str(tiny_reranker), fidelity=False,
                                 num_samples=4, out=str(tmp_path / "out"), device="cpu",
                                 progress=False))["memorisation"]
    assert memo["method"] == "reranker-embedding"
    assert memo["generated_distances"]["max"] < 1e-4  # the training images themselves
