"""kodalle sample: filters, seeded draws, cached decoding vs full recomputation, outputs, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_and_vqgan

from kodalle_cli.errors import UsageError
from kodalle_cli.model.sampling import (
    SamplingSettings,
    draw,
    filter_logits,
    row_uniforms,
    top_k_count,
)
from kodalle_cli.output import (
    CaptionResult,
    make_grid,
    slugify,
    to_pil,
    unique_slugs,
    write_caption_dir,
)
from kodalle_cli.sample import read_captions
from kodalle_cli.vqgan import save_vqgan


# ---- filters ---------------------------------------------------------------------------------
def test_top_k_fraction_matches_dalle_pytorch_filter_thres():
    from dalle_pytorch.dalle_pytorch import top_k as dp_top_k

    torch.manual_seed(0)
    logits = torch.randn(3, 200)
    for thres in (0.0, 0.5, 0.9, 0.99, 0.999):
        ours = filter_logits(logits, SamplingSettings(top_k=thres, temperature=1.0))
        theirs = dp_top_k(logits, thres=thres)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), thres
        kept = ~torch.isinf(ours)
        assert torch.equal(ours[kept], theirs[kept])


def test_top_k_count_and_fraction_base():
    assert top_k_count(5, 100) == 5
    assert top_k_count(500, 100) == 100
    assert top_k_count(0.75, 100) == 25
    assert top_k_count(0.75, 1000) == 250  # the fraction refers to the base given
    assert top_k_count(0.9, 100) == 9  # int((1 - 0.9) * 100): dalle-pytorch's arithmetic
    assert top_k_count(0.9999, 100) == 1
    assert top_k_count(None, 100) is None
    logits = torch.randn(2, 100)
    out = filter_logits(logits, SamplingSettings(top_k=0.75), fraction_base=200)
    assert (~torch.isinf(out)).sum(-1).tolist() == [50, 50]
    out = filter_logits(logits, SamplingSettings(top_k=7))
    assert (~torch.isinf(out)).sum(-1).tolist() == [7, 7]
    assert torch.equal(out.argmax(-1), logits.argmax(-1))


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: (~torch.isinf(filter_logits(logits, SamplingSettings(top_k=None, top_p=p))))  # noqa: E731
    assert kept(0.5).tolist() == [[True, False, False, False]]
    assert kept(0.6).tolist() == [[True, True, False, False]]
    assert kept(1.0).tolist() == [[True, True, True, True]]
    assert kept(0.9).tolist() == [[True, True, True, False]]
    # order in the vocabulary does not matter
    perm = torch.tensor([2, 0, 3, 1])
    assert kept(0.6)[:, perm].tolist() == (
        ~torch.isinf(filter_logits(logits[:, perm], SamplingSettings(top_k=None, top_p=0.6)))
    ).tolist()


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    out = filter_logits(logits, SamplingSettings(top_k=None, temperature=2.0))
    assert torch.allclose(out, logits / 2)


@pytest.mark.parametrize("bad", [
    dict(top_k=-1), dict(top_k=2.5), dict(top_p=0), dict(top_p=1.5), dict(temperature=-1),
    dict(cond_scale=-2),
])
def test_bad_settings_are_config_errors_naming_the_setting(bad):
    from kodalle_cli.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        SamplingSettings(**bad).validate()
    assert info.value.name == next(iter(bad))


def test_draw_follows_the_distribution_and_never_picks_filtered_tokens():
    logits = torch.tensor([[0.0, 1.0, -float("inf"), 2.0]]).repeat(20000, 1)
    u = torch.rand(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids = draw(logits, u)
    counts = torch.bincount(ids, minlength=4).float() / len(ids)
    expected = torch.tensor([0.0, 1.0, -float("inf"), 2.0]).softmax(-1)
    assert counts[2] == 0
    assert torch.allclose(counts, expected, atol=0.015)
    # u at the extremes stays inside the allowed tokens
    edge = draw(logits[:2], torch.tensor([0.0, 1.0 - 1e-12], dtype=torch.float64))
    assert edge.tolist() == [0, 3]
    assert draw(logits[:1], u[:1], greedy=True).item() == 3


def test_row_uniforms_depend_only_on_the_row():
    a = row_uniforms(7, 0, 3, 16)
    assert torch.equal(a, row_uniforms(7, 0, 3, 16))
    assert not torch.equal(a, row_uniforms(7, 0, 4, 16))
    assert not torch.equal(a, row_uniforms(7, 1, 3, 16))
    assert not torch.equal(a, row_uniforms(8, 0, 3, 16))
    assert ((a >= 0) & (a < 1)).all()


# ---- captions and files ----------------------------------------------------------------------
def test_slugs_keep_hangul_strip_unsafe_characters_and_are_unique(tmp_path):
    assert slugify("하의에서 색상은 블루이다. 카테고리는 스커트이다.") == (
        "하의에서-색상은-블루이다-카테고리는-스커트이다"
    )
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("a/b\\c:d*e?f\"g<h>i|j") == "a-b-c-d-e-f-g-h-i-j"
    assert slugify("...") == "caption"
    assert len(slugify("가" * 500)) == 60
    (tmp_path / "red").mkdir()
    (tmp_path / "red" / "0000.png").write_bytes(b"x")
    (tmp_path / "blue").mkdir()  # empty: may be reused
    assert unique_slugs(["red", "Red!", "blue", "blue"], tmp_path) == [
        "red-2", "red-3", "blue", "blue-2"]


def test_read_captions_joins_arguments_and_file(tmp_path):
    f = tmp_path / "caps.txt"
    f.write_text("상의에서 색상은 레드이다.\n\n  하의 \n", encoding="utf-8")
    assert read_captions(["a"], f) == ["a", "상의에서 색상은 레드이다.", "하의"]
    with pytest.raises(UsageError):
        read_captions([], None)


def test_caption_dir_is_written_completely(tmp_path):
    images = to_pil(torch.rand(3, 3, 8, 8))
    meta = {"caption": "x", "images": [{"file": f"{i:04d}.png"} for i in range(3)]}
    d = write_caption_dir(tmp_path / "x", CaptionResult("x", images, meta, None,
                                                         torch.zeros(3, 4, dtype=torch.long)))
    assert sorted(p.name for p in d.iterdir()) == [
        "0000.png", "0001.png", "0002.png", "codes.npy", "grid.png", "metadata.json"]
    assert json.loads((d / "metadata.json").read_text(encoding="utf-8"))["caption"] == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temporary left behind
    grid = make_grid(images)
    assert grid.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)


# ---- the decoding loop on a tiny model -------------------------------------------------------
def tiny_dalle(seed: int = 0):
    from kodalle_cli.model.dalle import DALLE, DALLEConfig

    torch.manual_seed(seed)
    cfg = DALLEConfig(num_text_tokens=40, num_image_tokens=24, image_fmap_size=4, dim=32,
                      depth=2, heads=2, dim_head=16, text_seq_len=6, pad_id=1, bos_id=0)
    model = DALLE(cfg).eval()
    with torch.no_grad():  # larger residual branches than the LayerScale start: peaky logits
        for block in model.blocks:
            block.attn_scale.fill_(1.0)
            block.ff_scale.fill_(1.0)
    return model


def tiny_text(batch: int = 3) -> torch.Tensor:
    text = torch.randint(5, 40, (batch, 6), generator=torch.Generator().manual_seed(1))
    text[0, 4:] = 1  # padding
    return text


def uniforms_for(rows: int, steps: int, seed: int = 0) -> torch.Tensor:
    return torch.stack([row_uniforms(seed, 0, i, steps) for i in range(rows)])


def test_cache_logits_equal_full_recomputation_at_every_step():
    model = tiny_dalle()
    text = tiny_text()
    codes = torch.randint(0, 24, (3, 16), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(3)
    logits = model.prefill(text, cache)
    t = model.config.num_text_logits
    for i in range(16):
        full = model(text, codes[:, :i])[:, -1, t:]
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
        if i + 1 < 16:
            logits = model.step(codes[:, i], cache)


@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
@pytest.mark.parametrize("settings", [
    dict(temperature=0.0, top_k=None),  # greedy
    dict(temperature=1.0, top_k=0.8),  # seeded sampling, filter_thres-style: k = 14
    dict(temperature=0.8, top_k=8, top_p=0.9),
])
def test_cached_decoding_yields_the_tokens_of_full_recomputation(settings, cond_scale):
    from kodalle_cli.model.sampling import generate_codes

    model = tiny_dalle()
    text = tiny_text()
    s = SamplingSettings(cond_scale=cond_scale, **settings)
    u = uniforms_for(3, 16)
    cached = generate_codes(model, text, u, s)
    full = generate_codes(model, text, u, s, use_cache=False)
    assert cached.shape == (3, 16)
    assert torch.equal(cached, full)


def test_cond_scale_one_is_plain_decoding_and_guidance_changes_the_output():
    from kodalle_cli.model.sampling import generate_codes

    model = tiny_dalle()
    text = tiny_text()
    u = uniforms_for(3, 16)
    plain = generate_codes(model, text, u, SamplingSettings(top_k=None))
    # the same, through the guided batch (conditional + unconditional rows in one forward)
    almost_one = generate_codes(model, text, u, SamplingSettings(top_k=None, cond_scale=1 + 1e-7))
    assert torch.equal(plain, almost_one)
    guided = generate_codes(model, text, u, SamplingSettings(top_k=None, cond_scale=3.0))
    assert not torch.equal(plain, guided)
    # rows decode independently: the first row alone gives the same codes
    alone = generate_codes(model, text[:1], u[:1], SamplingSettings(top_k=None, cond_scale=3.0))
    assert torch.equal(alone[0], guided[0])


def test_guided_logits_follow_classifier_free_guidance():
    model = tiny_dalle()
    text = tiny_text()
    t = model.config.num_text_logits
    cond = model(text)[:, -1, t:]
    null = model(model.null_text(3))[:, -1, t:]
    cache = model.new_cache(6)
    both = model.prefill(torch.cat((text, model.null_text(3))), cache)
    from kodalle_cli.model.sampling import _guided

    torch.testing.assert_close(_guided(both, 3, 2.5), null + (cond - null) * 2.5,
                               rtol=1e-5, atol=1e-5)


# ---- the library function (Python API) on a tiny run -----------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tiny_klue):
    from transformers import AutoTokenizer

    from kodalle_cli.runs import LoadedRun
    from kodalle_cli.text import CaptionEncoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_klue)
    model, vqgan = tiny_model_and_vqgan(tokenizer, text_seq_len=12)
    encoder = CaptionEncoder(tokenizer, model.config.text_seq_len, model.config.pad_id)
    return LoadedRun(model, encoder, vqgan, source="tiny", config={"model": {"dim": 32}})


def _config(tmp_path, **kw):
    from kodalle_cli.sample import SampleConfig

    base = dict(captions=["상의에서 색상은 레드이다.", "하의에서 색상은 블루이다."], n=3,
                out=tmp_path / "out", seed=5, device="cpu", progress=False, top_k=0.5)
    base.update(kw)
    return SampleConfig(**base)


def test_sample_writes_images_grid_and_metadata(tiny_run, tmp_path):
    from kodalle_cli.sample import sample

    results = sample(_config(tmp_path, cond_scale=2.0), tiny_run)
    assert [r.caption for r in results] == ["상의에서 색상은 레드이다.", "하의에서 색상은 블루이다."]
    d = results[0].directory
    assert d == tmp_path / "out" / "상의에서-색상은-레드이다"
    assert sorted(p.name for p in d.iterdir()) == [
        "0000.png", "0001.png", "0002.png", "codes.npy", "grid.png", "metadata.json"]
    meta = json.loads((d / "metadata.json").read_text(encoding="utf-8"))
    assert meta["caption"] == "상의에서 색상은 레드이다." and meta["seed"] == 5
    assert meta["settings"]["cond_scale"] == 2.0 and meta["settings"]["top_k"] == 0.5
    assert meta["token_ids"][0] == 0 and meta["truncated_tokens"] == 0
    assert meta["checkpoint"] == "tiny"
    assert results[0].images[0].size == (8, 8)
    assert results[0].codes.shape == (3, 16)
    # a second call does not overwrite the first one's directory
    again = sample(_config(tmp_path, captions=["상의에서 색상은 레드이다."]), tiny_run)
    assert again[0].directory.name == "상의에서-색상은-레드이다-2"


def test_same_seed_different_batch_size_same_images(tiny_run, tmp_path):
    from kodalle_cli.sample import sample

    def run(batch_size, seed=5):
        res = sample(_config(tmp_path, out=None, batch_size=batch_size, seed=seed), tiny_run)
        return torch.cat([r.codes for r in res]), [r.images for r in res]

    codes1, images1 = run(1)
    codes4, images4 = run(4)
    codes6, _ = run(6)
    assert torch.equal(codes1, codes4) and torch.equal(codes1, codes6)
    assert [list(i.getdata()) for i in images1[1]] == [list(i.getdata()) for i in images4[1]]
    other, _ = run(4, seed=6)
    assert not torch.equal(codes1, other)


def test_truncation_and_unknown_token_warnings(tiny_run, tmp_path):
    from kodalle_cli.sample import sample

    said = []
    long_caption = "상의에서 색상은 레드이다. " * 6
    res = sample(_config(tmp_path, captions=[long_caption, "qqq zzz xxx"], n=1, out=None),
                 tiny_run, warn=said.append)
    assert len(said) == 2
    assert "longer than text_seq_len 12" in said[0] and "tokens" in said[0]
    assert res[0].metadata["truncated_tokens"] > 0
    assert len(res[0].metadata["token_ids"]) == 12
    assert "unknown to the tokenizer" in said[1]


def test_bad_options_are_clear_errors(tiny_run, tmp_path):
    from kodalle_cli.errors import ConfigError, KodalleError
    from kodalle_cli.sample import sample

    with pytest.raises(UsageError, match="--keep needs --rerank"):
        sample(_config(tmp_path, keep=2), tiny_run)
    with pytest.raises(ConfigError, match="top_k=3.5"):
        sample(_config(tmp_path, top_k=3.5), tiny_run)
    with pytest.raises(KodalleError, match="no trained DALLE run"):
        sample(_config(tmp_path, runs_dir=tmp_path / "nothing"))


def test_cli_keep_without_rerank_is_a_usage_error(tmp_path, capsys, monkeypatch):
    from kodalle_cli.cli import main

    monkeypatch.chdir(tmp_path)  # checked before any run is looked for
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "상의에서 색상은 레드이다.", "--keep", "2"])
    assert exit_info.value.code == 2
    assert "--keep needs --rerank" in capsys.readouterr().err


def test_a_decomposed_caption_is_the_composed_one(tiny_run, tmp_path):
    import unicodedata

    from kodalle_cli.sample import sample

    composed = "상의에서 색상은 레드이다."
    nfd = unicodedata.normalize("NFD", composed)
    assert nfd != composed
    a = sample(_config(tmp_path, captions=[composed], n=1, out=None), tiny_run)[0]
    b = sample(_config(tmp_path, captions=[nfd], n=1, out=tmp_path / "nfd"), tiny_run)[0]
    assert b.caption == composed and b.metadata["caption"] == composed
    assert b.metadata["token_ids"] == a.metadata["token_ids"]
    assert b.directory.name == "상의에서-색상은-레드이다"
    assert torch.equal(a.codes, b.codes)


# ---- runs, .pt checkpoints and the command line ----------------------------------------------
def _write_run(run, loaded, step: int = 1):
    from safetensors.torch import save_file

    from kodalle_cli.runs import write_config

    write_config(run, {"kind": "dalle", "model": loaded.model.config.to_dict()})
    loaded.tokenizer.save_pretrained(run / "tokenizer")
    save_vqgan(loaded.vqgan, run / "vqgan")
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()},
              str(ckpt / "model.safetensors"))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run / "latest").write_text(f"checkpoints/step-{step:07d}")
    return run


def test_cli_samples_from_the_newest_run_by_default(tiny_run, tmp_path, monkeypatch):
    import os
    import time

    from kodalle_cli.cli import main

    runs = tmp_path / "runs"
    _write_run(runs / "old", tiny_run)
    (runs / "vqgan").mkdir(parents=True)  # other runs live there too
    (runs / "vqgan" / "config.json").write_text('{"kind": "vqgan"}')
    time.sleep(0.05)
    _write_run(runs / "new", tiny_run, step=7)
    old = runs / "old" / "checkpoints" / "step-0000001"
    os.utime(old, (time.time() - 100, time.time() - 100))
    monkeypatch.chdir(tmp_path)
    main(["sample", "상의에서 색상은 레드이다.", "-n", "2", "--seed", "3", "--device", "cpu",
          "--out", "outs"])
    meta = json.loads((tmp_path / "outs" / "상의에서-색상은-레드이다" / "metadata.json")
                      .read_text(encoding="utf-8"))
    assert meta["checkpoint"] == str(Path("runs") / "new")
    assert meta["run"]["checkpoint_path"].endswith("step-0000007")
    # the same call through the Python API, from the checkpoint directory, gives the same codes
    from kodalle_cli.sample import SampleConfig, sample

    res = sample(SampleConfig(["상의에서 색상은 레드이다."], n=2, seed=3, device="cpu", out=None,
                              checkpoint=runs / "new" / "checkpoints" / "step-0000007",
                              progress=False))
    import numpy as np

    saved = np.load(tmp_path / "outs" / "상의에서-색상은-레드이다" / "codes.npy")
    assert np.array_equal(saved, res[0].codes.numpy())


def test_sample_from_a_dalle_pytorch_pt(tiny_run, tiny_klue, tmp_path):
    from kodalle_cli.model.convert import save_dalle_pytorch_checkpoint
    from kodalle_cli.sample import SampleConfig, sample

    pt = tmp_path / "kodalle.pt"
    save_dalle_pytorch_checkpoint(tiny_run.model, pt)
    save_vqgan(tiny_run.vqgan, tmp_path / "vq")
    cfg = dict(captions=["상의에서 색상은 레드이다."], n=2, seed=3, device="cpu", out=None,
               progress=False)
    with pytest.raises(Exception, match="--backbone|--vqgan"):
        sample(SampleConfig(checkpoint=pt, **cfg))
    from_pt = sample(SampleConfig(checkpoint=pt, backbone=str(tiny_klue),
                                  vqgan=str(tmp_path / "vq"), **cfg))
    direct = sample(SampleConfig(**cfg), tiny_run)
    assert torch.equal(from_pt[0].codes, direct[0].codes)


def test_rerank_keeps_the_best_and_records_every_score(tiny_run, tiny_reranker, tmp_path):
    from kodalle_cli.sample import sample

    res = sample(_config(tmp_path, n=4, captions=["상의에서 색상은 레드이다."],
                         rerank=tiny_reranker, keep=2), tiny_run)
    meta = res[0].metadata
    scores = meta["rerank_scores"]
    assert len(scores) == 4 and len(res[0].images) == 2
    kept = [img["image_index"] for img in meta["images"]]
    assert kept == sorted(range(4), key=lambda i: -scores[i])[:2]
    assert [img["rerank_score"] for img in meta["images"]] == [scores[i] for i in kept]
    files = sorted(p.name for p in res[0].directory.glob("0*.png"))
    assert files == ["0000.png", "0001.png"]
    # the kept images are the ones generated for those indices
    unranked = sample(_config(tmp_path, n=4, captions=["상의에서 색상은 레드이다."], out=None),
                      tiny_run)
    assert torch.equal(res[0].codes, unranked[0].codes[kept])
