"""The one caption encoder: training (``kodalle tokenize``), sampling and the reranker give
a caption the ids they always did, and training and sampling give it the same ids."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from kodalle_cli.text import CaptionEncoder

CAPTIONS = [
    "상의에서 색상은 레드이다. 카테고리는 블라우스이다.",
    "하의에서 색상은 블루이다. 카테고리는 스커트이다.",
    "원피스에서 색상은 블랙이다. " * 12,  # longer than text_seq_len: cut
    "qqq zzz xxx",  # mostly unknown to the Korean tokenizer
    unicodedata.normalize("NFD", "아우터에서 색상은 그린이다."),  # decomposed Hangul
]


@pytest.fixture(scope="module", params=["tiny_klue", "tiny_gpt2"])
def backbone(request):
    from kodalle_cli.backbone import get_backbone

    return get_backbone(str(request.getfixturevalue(request.param)))


def write_run(run, backbone, text_seq_len: int, pad_id: int):
    """A run directory as ``kodalle train`` leaves it: the model config records the token
    shards' pad id, the tokenizer is the backbone's."""
    from kodalle_cli.model.dalle import DALLE, DALLEConfig
    from kodalle_cli.runs import save_run

    tok = backbone.load_tokenizer()
    model = DALLE(DALLEConfig(num_text_tokens=len(tok), num_image_tokens=8, image_fmap_size=2,
                              dim=16, depth=1, heads=2, dim_head=8, text_seq_len=text_seq_len,
                              pad_id=pad_id, bos_id=0))
    return save_run(run, model, tok, step=1)


def test_training_ids_equal_sampling_ids(backbone, tmp_path):
    """``kodalle tokenize``'s batch path and ``kodalle sample``'s path (a run opened by
    :func:`load_run`, its pad id read from the model config) agree id for id."""
    from kodalle_cli.runs import load_run

    training = CaptionEncoder.for_backbone(backbone, 16)
    ids, truncated = training.encode_batch(CAPTIONS)
    assert ids.dtype == np.int32 and ids.shape == (len(CAPTIONS), 16)
    assert truncated == 1
    run = load_run(write_run(tmp_path / "run", backbone, 16, training.pad_id),
                   with_vqgan=False)
    assert run.caption_encoder.pad_id == training.pad_id
    assert run.caption_encoder.text_seq_len == 16
    for row, caption in zip(ids, CAPTIONS, strict=True):
        encoded = run.caption_encoder.encode(caption)
        assert encoded.ids == row.tolist()
        assert encoded.caption == unicodedata.normalize("NFC", caption)
    cut = run.caption_encoder.encode(CAPTIONS[2])
    assert cut.num_tokens == 16 and cut.truncated > 0 and "longer than" in cut.warnings[0]
    assert ids[2, -1] != training.pad_id  # filled to the end, the special end token kept
    # the decomposed caption is encoded as its composed form
    assert ids[4].tolist() == training.encode_batch(
        [unicodedata.normalize("NFC", CAPTIONS[4])])[0][0].tolist()


def test_ids_are_what_the_tokenizer_makes(tiny_klue):
    """Byte for byte what the encoders before the shared one made: the tokenizer's ids with
    special tokens, cut by the tokenizer, padded with the backbone's pad id."""
    from kodalle_cli.backbone import get_backbone, special_ids

    backbone = get_backbone(str(tiny_klue))
    tok = backbone.load_tokenizer()
    encoder = CaptionEncoder.for_backbone(backbone, 16)
    assert encoder.pad_id == special_ids(backbone.config())[0] == 1
    captions = [unicodedata.normalize("NFC", c) for c in CAPTIONS]
    ids, _ = encoder.encode_batch(captions)
    for row, caption in zip(ids, captions, strict=True):
        want = tok(caption, truncation=True, max_length=16)["input_ids"]
        assert row.tolist() == want + [1] * (16 - len(want))


@pytest.mark.parametrize("batch", [CAPTIONS, CAPTIONS[:1], CAPTIONS[1:4]])
def test_reranker_ids_and_mask_equal_the_tokenizers_padding(backbone, batch):
    tok = backbone.load_tokenizer()
    encoder = CaptionEncoder.for_tokenizer(backbone.load_tokenizer(), 16)
    got = encoder.encode_with_mask(batch)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    want = tok([unicodedata.normalize("NFC", c) for c in batch], padding=True,
               truncation=True, max_length=16, return_tensors="pt")
    for key in ("input_ids", "attention_mask"):
        assert got[key].dtype == want[key].dtype
        assert got[key].tolist() == want[key].tolist(), key


def test_unknown_words_warn(tiny_klue):
    from kodalle_cli.backbone import get_backbone

    encoder = CaptionEncoder.for_backbone(get_backbone(str(tiny_klue)), 16)
    assert encoder.encode(CAPTIONS[0]).warnings == []
    unknown = encoder.encode("qqq zzz xxx")
    assert unknown.unknown_tokens > 0 and "unknown to the tokenizer" in unknown.warnings[0]


def test_a_checked_run_samples_with_the_tokenizers_library_and_the_same_ids(backbone,
                                                                             tmp_path):
    """A run whose tokenizer.json alone gives transformers' ids (checked at train time on
    its captions) is sampled without importing transformers, id for id and warning for
    warning as before; a tokenizer.json changed since the check goes back to transformers."""
    import subprocess
    import sys

    from kodalle_cli.runs import load_run
    from kodalle_cli.text import RAW_CHECK, RawTokenizer, check_raw_tokenizer

    training = CaptionEncoder.for_backbone(backbone, 16)
    run = write_run(tmp_path / "run", backbone, 16, training.pad_id)
    plain = load_run(run, with_vqgan=False).caption_encoder
    assert not isinstance(plain.tokenizer, RawTokenizer)  # no check file: transformers
    assert check_raw_tokenizer(run / "tokenizer", backbone.load_tokenizer(), CAPTIONS, 16)
    fast = load_run(run, with_vqgan=False).caption_encoder
    assert isinstance(fast.tokenizer, RawTokenizer)
    for caption in [*CAPTIONS, "", "!!", "xx " * 40]:
        a, b = plain.encode(caption), fast.encode(caption)
        assert (a.ids, a.num_tokens, a.full_length, a.unknown_tokens, a.warnings) == (
            b.ids, b.num_tokens, b.full_length, b.unknown_tokens, b.warnings)
    code = ("import sys; from kodalle_cli.runs import load_run; "
            f"e = load_run({str(run)!r}, with_vqgan=False).caption_encoder; e.encode('a b'); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
    tokenizer_json = run / "tokenizer" / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text() + " ")  # edited after the check
    assert not isinstance(load_run(run, with_vqgan=False).caption_encoder.tokenizer,
                          RawTokenizer)
    assert (run / "tokenizer" / RAW_CHECK).is_file()


def test_a_tokenizer_the_library_reads_differently_is_not_checked(tiny_klue, tmp_path):
    """transformers can read a tokenizer.json differently (its config can change lower
    casing, prefix spaces, added tokens: here a token added after saving); the check sees
    the difference and writes nothing."""
    from transformers import AutoTokenizer

    from kodalle_cli.text import RAW_CHECK, check_raw_tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_klue)
    tok.save_pretrained(tmp_path)
    tok.add_tokens(["상의"])  # now transformers splits what the file does not
    assert not check_raw_tokenizer(tmp_path, tok, ["상의에서 색상은 레드이다.", "XYZ"], 16)
    assert not (tmp_path / RAW_CHECK).exists()
