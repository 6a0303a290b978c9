"""Backbone loading: the tables read from safetensors are exactly the model's own."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, RobertaConfig, RobertaForMaskedLM

from kodalle_cli import backbone as bb
from kodalle_cli.errors import KodalleError, UsageError
from kodalle_cli.experiments.tiny_backbone import build_gpt2_like, build_gptj_like, build_klue_like


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {
        "klue": build_klue_like(root / "klue"),
        "gpt2": build_gpt2_like(root / "gpt2"),
        "gptj": build_gptj_like(root / "gptj"),
    }


def reference_tables(path):
    model = AutoModel.from_pretrained(path)
    position = bb._position_module(model)
    return model.get_input_embeddings().weight, None if position is None else position.weight


@pytest.mark.parametrize("kind", ["klue", "gpt2", "gptj"])
def test_tables_equal_the_model_and_no_model_is_built(dirs, kind, monkeypatch):
    want_token, want_position = reference_tables(dirs[kind])

    def no_full_load(*args, **kwargs):
        raise AssertionError("the safetensors path must not load the language model")

    monkeypatch.setattr(AutoModel, "from_pretrained", no_full_load)
    emb = bb.get_backbone(str(dirs[kind])).load_embeddings()
    assert torch.equal(emb.token, want_token)
    if want_position is None:
        assert emb.position is None and emb.max_positions is None
    else:
        assert torch.equal(emb.position, want_position)


def test_klue_layout_offsets_and_special_ids(dirs):
    emb = bb.get_backbone("hf", str(dirs["klue"])).load_embeddings()
    # RoBERTa counts positions from padding_idx + 1; klue's ids: [CLS]=0 [PAD]=1 [SEP]=2
    assert (emb.position_offset, emb.pad_id, emb.bos_id, emb.eos_id) == (2, 1, 0, 2)
    assert emb.max_positions == emb.position.shape[0] - 2
    tok = bb.get_backbone("hf", str(dirs["klue"])).load_tokenizer()
    ids = tok("상의에서 색상은 레드이다.").input_ids
    assert ids[0] == 0 and ids[-1] == 2 and tok.pad_token_id == 1 and tok.unk_token_id == 3


def test_gpt_layouts(dirs):
    gpt2 = bb.get_backbone(str(dirs["gpt2"])).load_embeddings()
    assert gpt2.position_offset == 0 and gpt2.position.shape == (256, gpt2.dim)
    gptj = bb.get_backbone(str(dirs["gptj"])).load_embeddings()
    assert gptj.position is None


def test_sharded_safetensors_and_prefixed_keys(tmp_path, dirs):
    torch.manual_seed(1)
    config = RobertaConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=40, pad_token_id=1,
    )
    model = RobertaForMaskedLM(config)  # keys are stored as roberta.embeddings.*
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / bb.SAFETENSORS_INDEX).exists()
    emb = bb.get_backbone(str(tmp_path)).load_embeddings()
    assert torch.equal(emb.token, model.roberta.embeddings.word_embeddings.weight)
    assert torch.equal(emb.position, model.roberta.embeddings.position_embeddings.weight)


@pytest.mark.parametrize("layout", ["zip", "legacy", "sharded"])
def test_bin_weights_give_the_tables_without_building_the_model(tmp_path, dirs, monkeypatch,
                                                                 layout):
    src = dirs["klue"]
    model = AutoModel.from_pretrained(src)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    if layout == "sharded":  # what save_pretrained wrote before safetensors: shards + index
        state = model.state_dict()
        keys = list(state)  # the token table alone in the first shard, positions in the second
        assert keys[0] == "embeddings.word_embeddings.weight"
        shards = {"pytorch_model-00001-of-00002.bin": keys[:1],
                  "pytorch_model-00002-of-00002.bin": keys[1:]}
        for file, names in shards.items():
            torch.save({k: state[k] for k in names}, tmp_path / file)
        weight_map = {k: file for file, names in shards.items() for k in names}
        (tmp_path / bb.BIN_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin",
                   _use_new_zipfile_serialization=layout == "zip")

    def no_model(*args, **kwargs):
        raise AssertionError("the whole model was built")

    monkeypatch.setattr("transformers.AutoModel.from_pretrained", no_model)
    emb = bb.get_backbone(str(tmp_path)).load_embeddings()
    assert torch.equal(emb.token, model.get_input_embeddings().weight)
    assert torch.equal(emb.position, model.embeddings.position_embeddings.weight)


def test_missing_weights_is_one_clear_error(tmp_path, dirs):
    (tmp_path / "config.json").write_bytes((dirs["klue"] / "config.json").read_bytes())
    with pytest.raises(KodalleError, match="no model.safetensors"):
        bb.get_backbone(str(tmp_path)).load_embeddings()


def test_backbone_path_points_a_builtin_at_a_local_copy(dirs):
    backbone = bb.get_backbone("klue-roberta-large", str(dirs["klue"]))
    assert backbone.name == "klue-roberta-large" and backbone.source == "klue/roberta-large"
    assert backbone.load_embeddings().dim == 64


def test_offline_without_cache_names_the_backbone_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(KodalleError) as err:
        bb.get_backbone("klue-roberta-large").load_embeddings()
    message = str(err.value)
    assert "klue-roberta-large" in message and "--backbone-path" in message
    assert "config.json" in message and "\n" not in message


def test_unknown_backbone_lists_the_registered_ones():
    with pytest.raises(UsageError, match="klue-roberta-large"):
        bb.get_backbone("no-such-backbone")


def test_hf_backbone_without_a_path_says_how():
    with pytest.raises(UsageError, match="--backbone-path"):
        bb.get_backbone("hf").load_embeddings()


def test_describe_reads_sizes_from_a_local_config_only(dirs):
    described = bb.get_backbone("klue-roberta-base", str(dirs["klue"])).describe()
    assert (described["vocab"], described["dim"], described["positions"]) == (
        bb.get_backbone(str(dirs["klue"])).load_embeddings().vocab_size, 64, 130,
    )
    assert bb.get_backbone(str(dirs["gptj"])).describe()["positions"] == 0
