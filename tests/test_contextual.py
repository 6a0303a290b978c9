"""``--text-encoder contextual`` (a frozen language model's states as the text) and
``--text-loss-weight 0`` (no text head): training, the run directory, resume, sampling."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kodalle_cli import runs
from kodalle_cli.configs import DalleTrainConfig
from kodalle_cli.errors import ConfigError, UsageError
from kodalle_cli.experiments.tiny_backbone import SAMPLE_CAPTIONS
from kodalle_cli.model import DALLE, DALLEConfig
from kodalle_cli.model.contextual import ContextualText

TINY = dict(dim=32, depth=2, heads=2, dim_head=16, device="cpu", progress=False, lr=1e-3,
            warmup_steps=1, schedule="constant", batch_size=4, save_every=3, eval_every=3,
            eval_batches=2, sample_every=0, cond_drop=0.3, keep_last=0, workers=0)


def train(backbone, tokens, out, **kw):
    from kodalle_cli.train.dalle import run_train

    return run_train(DalleTrainConfig(backbone=str(backbone), data=tokens, out=out,
                                      **{**TINY, **kw}))


@pytest.fixture(scope="module")
def contextual_run(tiny_dalle_data, tmp_path_factory, one_thread):
    backbone, tokens, _ = tiny_dalle_data
    out = tmp_path_factory.mktemp("contextual") / "run"
    train(backbone, tokens, out, text_encoder="contextual", max_steps=6)
    return backbone, tokens, out


def test_the_run_holds_the_frozen_language_model_not_in_its_checkpoints(contextual_run):
    from kodalle_cli.backbone import load_language_model

    backbone, _, out = contextual_run
    config = runs.read_config(out)
    assert config["model"]["text_encoder"] == "contextual"
    saved = load_file(out / "checkpoints/step-0000006/model.safetensors")
    assert "text_bos" in saved and "text_proj.weight" in saved
    assert not any(k.startswith(("text_emb", "text_pos_emb")) for k in saved)
    assert not any("layer." in k or "embeddings." in k for k in saved)  # no LM weights
    # no text head: the output layer has the image codes' rows only
    assert saved["to_logits.weight"].shape[0] == config["model"]["num_image_tokens"]
    # the language model in the run is the backbone's, untouched by training
    ours = load_language_model(str(out / runs.TEXT_ENCODER_DIR)).state_dict()
    theirs = load_language_model(str(backbone)).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].equal(theirs[k]) for k in theirs)
    metrics = (out / "metrics.csv").read_text(encoding="utf-8")
    assert ",image_loss," in metrics and ",text_loss," not in metrics


def test_contextual_resume_is_bitwise(contextual_run, tmp_path, one_thread):
    """Stopped at step 3 and resumed (an empty caption cache, other batches): the weights of
    step 6 equal the uninterrupted run's."""
    backbone, tokens, straight = contextual_run
    out = tmp_path / "resumed"
    train(backbone, tokens, out, text_encoder="contextual", max_steps=3)
    train(backbone, tokens, out, text_encoder="contextual", max_steps=6)
    want = load_file(straight / "checkpoints/step-0000006/model.safetensors")
    got = load_file(out / "checkpoints/step-0000006/model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].equal(want[k]), k


def test_a_contextual_run_samples_with_guidance(contextual_run, tmp_path):
    from kodalle_cli.sample import SampleConfig, sample

    _, _, out = contextual_run
    loaded = runs.load_run(out)
    assert isinstance(loaded.model.text_encoder, ContextualText)
    captions = list(SAMPLE_CAPTIONS[:2])
    results = sample(SampleConfig(captions=captions, n=2, checkpoint=out,
                                  out=tmp_path / "samples", cond_scale=3.0, seed=1,
                                  progress=False), loaded)
    assert [[im.size for im in r.images] for r in results] == [[(16, 16)] * 2] * 2
    again = sample(SampleConfig(captions=captions[:1], n=2, checkpoint=out, out=None,
                                cond_scale=3.0, seed=1, progress=False), runs.load_run(out))
    assert again[0].codes.equal(results[0].codes)  # the same seed: the same codes
    meta = json.loads((results[0].directory / "metadata.json").read_text(encoding="utf-8"))
    assert meta["caption"] == captions[0]


def test_a_learned_null_caption_is_trained_and_used_for_guidance(tiny_dalle_data, tmp_path,
                                                                  one_thread):
    """--null-caption learned: dropped captions (and guidance's unconditional rows) read a
    trained table instead of the LM's lone-pad states; other captions are unchanged."""
    from kodalle_cli.data.tokens import iter_split
    from kodalle_cli.sample import SampleConfig, sample

    backbone, tokens, _ = tiny_dalle_data
    out = tmp_path / "learned"
    train(backbone, tokens, out, text_encoder="contextual", null_caption="learned",
          max_steps=3)
    saved = load_file(out / "checkpoints/step-0000003/model.safetensors")
    assert saved["text_null"].shape == (16, 64)  # [text_seq_len, the LM's width]
    loaded = runs.load_run(out)
    model = loaded.model
    assert model.config.null_caption == "learned"
    assert not model.text_null.detach().equal(torch.zeros_like(model.text_null))
    null = model.null_text(1)
    caption = torch.from_numpy(next(iter_split(tokens, "train", 1))["ids"])[None]
    with torch.no_grad():
        want_null = model.text_proj(torch.cat((model.text_bos[None, None],
                                               model.text_null[None]), dim=1))
        assert torch.allclose(model.embed_text(null), want_null)
        lm_states = model.text_encoder(caption)
        want = model.text_proj(torch.cat((model.text_bos[None, None], lm_states), dim=1))
        assert torch.allclose(model.embed_text(caption), want)
    # trained: the dropped captions' gradient moved the table from its initial values (the
    # run built its model right after torch.manual_seed(seed 0), as here)
    torch.manual_seed(0)
    fresh = DALLE(DALLEConfig.from_dict(model.config.to_dict()))
    assert not fresh.text_null.detach().equal(model.text_null.detach())
    results = sample(SampleConfig(captions=[SAMPLE_CAPTIONS[0]], n=2, checkpoint=out, out=None,
                                  cond_scale=3.0, seed=1, progress=False), loaded)
    assert results[0].codes.shape[0] == 2
    # only for contextual text
    with pytest.raises(ConfigError, match="null_caption=learned: .*contextual"):
        train(backbone, tokens, tmp_path / "tables", null_caption="learned", max_steps=1)


def test_the_encoder_caches_each_caption_and_ignores_its_batch(tiny_klue):
    from transformers import AutoModel

    lm = AutoModel.from_pretrained(tiny_klue)
    encoder = ContextualText(lm, pad_id=1)
    ids = torch.tensor([[0, 7, 8, 2, 1, 1], [0, 9, 2, 1, 1, 1], [0, 7, 8, 2, 1, 1]])
    batched = encoder(ids)
    assert (encoder.misses, encoder.hits) == (2, 1)
    assert batched[0].equal(batched[2])
    alone = ContextualText(lm, pad_id=1)(ids[1:2])
    assert alone[0].equal(batched[1])
    # the null caption (all padding) is a lone pad token: finite, and not a real caption's
    null = encoder(torch.ones(1, 6, dtype=torch.long))
    assert torch.isfinite(null).all() and not null[0].equal(batched[1])
    # which layer: 0 is the embeddings, -1 (the default) the last
    first = ContextualText(lm, pad_id=1, layer=0)(ids[:1])
    assert not first.equal(batched[:1])


def test_no_text_head_trains_on_the_image_loss_alone(tiny_dalle_data, tmp_path, one_thread):
    backbone, tokens, _ = tiny_dalle_data
    out = tmp_path / "no-text-head"
    train(backbone, tokens, out, text_loss_weight=0.0, max_steps=3)
    config = runs.read_config(out)
    model = DALLE(DALLEConfig.from_dict(config["model"]))
    assert model.to_logits.weight.shape[0] == config["model"]["num_image_tokens"]
    text = torch.ones(2, model.text_seq_len, dtype=torch.long)
    image = torch.randint(0, model.config.num_image_tokens, (2, model.image_seq_len))
    loss, parts = model.loss(text, image)
    assert set(parts) == {"image_loss"} and loss.equal(parts["image_loss"])
    # with a text head, the weight mixes the two losses as documented
    cfg = DALLEConfig.from_dict({**config["model"], "text_loss_weight": 2.0})
    torch.manual_seed(0)
    loss, parts = DALLE(cfg).loss(text, image)
    want = (2.0 * parts["text_loss"] + cfg.loss_img_weight * parts["image_loss"]) / (
        2.0 + cfg.loss_img_weight)
    torch.testing.assert_close(loss.detach(), want)


def test_a_backbone_plugin_may_refuse_contextual(tiny_dalle_data, tmp_path):
    _, tokens, _ = tiny_dalle_data
    with pytest.raises(UsageError, match="kakaobrain-kogpt cannot run as one .*12 GiB"):
        train("kakaobrain-kogpt", tokens, tmp_path / "kogpt", text_encoder="contextual",
              max_steps=1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_contextual_under_two_gloo_ranks_trains_like_one_process(tiny_klue, tmp_path, strategy):
    """Each rank holds its own frozen language model (replicated, not sharded): 2 ranks x
    batch 4 give one process's batch-8 losses."""
    from conftest import assert_two_ranks_train_like_one, write_tiny_tokens

    tokens = write_tiny_tokens(tmp_path / "tokens", tiny_klue, train=48, val=0, shard_size=100)
    args = ["train", "--backbone", str(tiny_klue), "--data", str(tokens), "--text-encoder",
            "contextual", "--strategy", strategy, "--dim", "32", "--depth", "2", "--heads", "2",
            "--dim-head", "16", "--device", "cpu", "--workers", "0", "--no-progress", "--lr",
            "1e-3", "--warmup-steps", "1", "--schedule", "constant", "--eval-every", "0",
            "--log-every", "1", "--max-steps", "3", "--save-every", "3", "--sample-every", "0",
            "--cond-drop", "0"]
    assert_two_ranks_train_like_one(args, tmp_path, steps=3)
    assert (tmp_path / "two" / runs.TEXT_ENCODER_DIR / "config.json").is_file()
