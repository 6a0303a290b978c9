"""`kodalle tokenize`: image shards -> token shards, with a tiny backbone and a tiny VQGAN."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import write_image_shard
from PIL import Image

from kodalle_cli.data import tokens as token_shards
from kodalle_cli.errors import KodalleError
from kodalle_cli.tokenize_shards import TokenizeConfig, tokenize
from kodalle_cli.vqgan import VQGAN, VQGANConfig, load_vqgan, save_vqgan

CAPTIONS = [
    "상의에서 색상은 레드이다. 카테고리는 블라우스이다.",
    "하의에서 색상은 블루이다. 카테고리는 스커트이다.",
    "원피스에서 색상은 블랙이다. " * 12,  # longer than text_seq_len: truncated
]


def random_image(seed, size=32):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BILINEAR)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from kodalle_cli.experiments.tiny_backbone import build_klue_like

    root = tmp_path_factory.mktemp("tok")
    backbone = build_klue_like(root / "backbone")
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(n_embed=64, embed_dim=8, ch=32, ch_mult=(1, 2, 2),
                           num_res_blocks=1, attn_resolutions=(), resolution=32, z_channels=8))
    with torch.no_grad():
        feats = vq.encode_features(torch.rand(2, 3, 32, 32) * 2 - 1)
        vq.quantize.embedding.weight.copy_(feats.permute(0, 2, 3, 1).reshape(-1, 8)[:64])
    save_vqgan(vq, root / "vqgan")
    shards = root / "shards"
    shards.mkdir()
    n = 0
    for split, count in (("train", 2), ("val", 1)):
        for i in range(count):
            samples = []
            for _ in range(3):
                samples.append((f"s{n:04d}", random_image(n), CAPTIONS[n % 3]))
                n += 1
            write_image_shard(shards / f"{split}-{i:06d}.tar", samples)
    return root, backbone, shards


def config(setup, **kw):
    root, backbone, shards = setup
    base = dict(shards=shards, vqgan=str(root / "vqgan"), backbone=str(backbone),
                text_seq_len=16, batch_size=2, device="cpu", progress=False)
    base.update(kw)
    return TokenizeConfig(**base)


def test_tokenize_writes_padded_ids_codes_and_manifest(setup):
    root, backbone, shards = setup
    summary = tokenize(config(setup))
    out = shards / "tokens"
    assert summary.out == out and summary.samples == {"train": 6, "val": 3}
    assert summary.truncated == 3 and summary.shards_written == 3

    manifest = token_shards.read_manifest(out)
    vq = load_vqgan(root / "vqgan")
    assert manifest["text_seq_len"] == 16 and manifest["pad_id"] == 1
    assert manifest["vqgan"]["hash"] == vq.identity()
    assert manifest["num_image_tokens"] == 64 and manifest["image_fmap_size"] == 8
    assert manifest["codes_dtype"] == "int16" and manifest["tokenizer_hash"].startswith("sha256:")
    assert manifest["splits"]["train"]["count"] == 6 and manifest["splits"]["val"]["count"] == 3

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbone)
    from kodalle_cli.data.images import to_tensor
    from kodalle_cli.data.shards import iter_image_samples

    originals = {s.key: s for s in iter_image_samples(shards, "train")}
    samples = token_shards.read_shard(out / "train-000000.tar")
    assert [s["key"] for s in samples] == ["s0000", "s0001", "s0002"]
    for s in samples:
        want = tok(originals[s["key"]].caption, truncation=True, max_length=16)["input_ids"]
        assert want[-1] == 2  # a truncated caption still ends with [SEP]
        assert s["ids"][: len(want)].tolist() == want
        assert (s["ids"][len(want):] == 1).all()
        assert s["txt"] == originals[s["key"]].caption
        image = to_tensor([originals[s["key"]].image], size=32)
        assert s["codes"].tolist() == vq.encode(image)[0].tolist()
    assert len({tuple(s["codes"].tolist()) for s in samples}) == 3
    # stored dtypes: int32 ids, int16 codes
    import tarfile

    with tarfile.open(out / "train-000000.tar") as tar:
        ids = np.load(io.BytesIO(tar.extractfile("s0000.ids.npy").read()))
        codes = np.load(io.BytesIO(tar.extractfile("s0000.codes.npy").read()))
    assert ids.dtype == np.int32 and ids.shape == (16,)
    assert codes.dtype == np.int16 and codes.shape == (64,)
    # the trainer's reader takes them; train and val stay apart
    batch = next(iter(token_shards.TokenBatches(out, "train", batch_size=4)))
    assert batch["ids"].shape == (4, 16) and batch["codes"].shape == (4, 64)
    val_keys = [s["key"] for s in token_shards.iter_split(out, "val")]
    assert val_keys == ["s0006", "s0007", "s0008"]


def test_tokenize_resumes_per_shard_and_refuses_another_vqgan(setup, tmp_path):
    out = tmp_path / "tokens"
    tokenize(config(setup, out=out))
    before = (out / "train-000001.tar").read_bytes()
    (out / "train-000000_stats.json").unlink()  # as if killed while writing this shard
    again = tokenize(config(setup, out=out))
    assert again.shards_written == 1 and again.shards_skipped == 2
    assert again.samples == {"train": 6, "val": 3}
    assert (out / "train-000001.tar").read_bytes() == before
    assert not list(out.glob(".*tmp*"))

    root = setup[0]
    other = VQGAN(load_vqgan(root / "vqgan").config)
    save_vqgan(other, tmp_path / "other")
    with pytest.raises(KodalleError, match="another VQGAN"):
        tokenize(config(setup, out=out, vqgan=str(tmp_path / "other")))
    with pytest.raises(KodalleError, match="another text_seq_len"):
        tokenize(config(setup, out=out, text_seq_len=20))


def test_cli_tokenize(setup, tmp_path, capsys):
    from kodalle_cli.cli import main

    root, backbone, shards = setup
    main(["tokenize", str(shards), "--vqgan", str(root / "vqgan"), "--backbone",
          str(backbone), "--text-seq-len", "16", "--out", str(tmp_path / "t"),
          "--device", "cpu", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert "6 train, 3 val" in printed and "3 captions truncated" in printed
    assert (tmp_path / "t" / "manifest.json").is_file()


def test_token_writer_names_shards_writes_stats_and_leaves_nothing_on_error(tmp_path):
    """The writer `kodalle tokenize` uses: shards named by the caller, a stats file beside
    each finished one, shards of an earlier run listed, nothing left by a failed shard."""
    kw = dict(text_seq_len=4, num_image_tokens=300, image_fmap_size=2, pad_id=1,
              tokenizer_hash="t", vqgan={"hash": "v"}, shard_size=None,
              tokenizer={"backbone": "b"}, extra={"truncated": 0})
    with token_shards.TokenShardsWriter(tmp_path, **kw) as w:
        w.add_finished("train", "train-000007.tar", 5)
        w.open_shard("train", "train-000009.tar")
        for i in range(3):
            w.write("train", f"k{i}", np.array([0, i, 1, 1]), np.full(4, 299), "c")
        w.finish_shard("train", {"count": 3})
        w.extra["truncated"] = 2
    manifest = token_shards.read_manifest(tmp_path)
    assert list(manifest)[8:11] == ["vqgan", "tokenizer", "splits"]
    assert manifest["splits"]["train"] == {"count": 8, "shards": [
        {"name": "train-000007.tar", "count": 5}, {"name": "train-000009.tar", "count": 3}]}
    assert manifest["truncated"] == 2 and manifest["codes_dtype"] == "int16"
    assert json.loads((tmp_path / "train-000009_stats.json").read_text()) == {"count": 3}
    assert [s["codes"].tolist() for s in token_shards.read_shard(tmp_path / "train-000009.tar")
            ] == [[299] * 4] * 3

    with pytest.raises(RuntimeError), token_shards.TokenShardsWriter(tmp_path / "b", **kw) as w:
        w.open_shard("val", "val-000000.tar")
        w.write("val", "k", np.zeros(4), np.zeros(4), "c")
        raise RuntimeError("killed")
    assert list((tmp_path / "b").iterdir()) == []


# ---- faults: a kill, bad images, a full disk ---------------------------------------------------
def token_files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_killed_tokenize_rerun_gives_the_bytes_of_a_clean_run(setup, tmp_path):
    """SIGKILL (the whole process group) half-way through the second shard, then the same
    command again: every token shard, stats file and the manifest are byte-identical to an
    uninterrupted run's, and no temporary file is left."""
    import os
    import signal
    import subprocess
    import sys

    root, backbone, shards = setup
    tokenize(config(setup, out=tmp_path / "clean"))
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "KODALLE_TEST_KILL_IN_TOKENIZE": "train-000001.tar:2"}
    proc = subprocess.run(
        [sys.executable, "-m", "kodalle_cli", "tokenize", str(shards), "--vqgan",
         str(root / "vqgan"), "--backbone", str(backbone), "--text-seq-len", "16", "--out",
         str(out), "--device", "cpu", "--batch-size", "2"],
        env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "train-000000_stats.json").is_file() and not (out / "manifest.json").exists()
    assert list(out.glob(".train-000001.tar.tmp-*"))  # the shard it was writing
    tokenize(config(setup, out=out))
    assert token_files(out) == token_files(tmp_path / "clean")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def damaged_image_shards(setup, tmp_path):
    """A copy of the image shards with bad JPEG bytes in s0001 and the second train shard
    cut short (its stats file, as prepare writes it, says it held 3 samples)."""
    import shutil

    _, _, shards = setup
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy, ignore=shutil.ignore_patterns("tokens"))
    samples = []
    import tarfile

    with tarfile.open(copy / "train-000000.tar") as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            samples.append((m, b"\xff\xd8 not a jpeg" if m.name == "s0001.jpg" else data))
    with tarfile.open(copy / "train-000000.tar", "w") as tar:
        for m, data in samples:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    second = copy / "train-000001.tar"
    second.write_bytes(second.read_bytes()[:1000])  # cut inside its first image
    (copy / "train-000001_stats.json").write_text('{"samples": 3}')
    return copy


def test_tokenize_skips_unreadable_images_and_stops_past_the_fraction(setup, tmp_path, capsys):
    shards = damaged_image_shards(setup, tmp_path)
    with pytest.raises(KodalleError, match="unreadable .* --max-bad-fraction"):
        tokenize(config(setup, shards=shards, out=tmp_path / "strict"))
    assert not (tmp_path / "strict" / "manifest.json").exists()
    capsys.readouterr()

    summary = tokenize(config(setup, shards=shards, out=tmp_path / "t", max_bad_fraction=0.5))
    warned = capsys.readouterr().err
    assert "train-000000.tar: s0001: unreadable sample" in warned
    assert "train-000001.tar" in warned and "unreadable tar" in warned
    stats = json.loads((tmp_path / "t" / "train-000000_stats.json").read_text())
    assert stats["count"] == 2 and stats["bad"] == 1 and stats["skipped"][0]["key"] == "s0001"
    assert summary.bad == 1 + 3 - token_shards.read_manifest(tmp_path / "t")["splits"][
        "train"]["shards"][1]["count"]
    manifest = token_shards.read_manifest(tmp_path / "t")
    assert manifest["bad"] == summary.bad
    keys = [s["key"] for s in token_shards.read_shard(tmp_path / "t" / "train-000000.tar")]
    assert keys == ["s0000", "s0002"]


def test_tokenize_disk_full_leaves_no_partial_shard(setup, tmp_path, monkeypatch):
    import errno

    import webdataset as wds

    real_write = wds.TarWriter.write

    def full_disk(self, obj):
        if obj["__key__"] == "s0004":  # in the second train shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, obj)

    out = tmp_path / "t"
    monkeypatch.setattr(wds.TarWriter, "write", full_disk)
    with pytest.raises(KodalleError) as err:
        tokenize(config(setup, out=out))
    assert "disk full (no space left on device)" in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar",
                                                      "train-000000_stats.json"]
    monkeypatch.setattr(wds.TarWriter, "write", real_write)
    again = tokenize(config(setup, out=out))  # space freed: the same command goes on
    assert again.shards_skipped == 1 and again.shards_written == 2
