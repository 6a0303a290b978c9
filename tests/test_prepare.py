"""`kodalle prepare`: sources, images, bad input, resume, determinism, the shard reader."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kodalle_cli.cli import main
from kodalle_cli.data import prepare as prep
from kodalle_cli.data.captions import caption_from_label
from kodalle_cli.data.images import crop_box, fit, open_image, preprocess, to_rgb, to_tensor
from kodalle_cli.data.prepare import PrepareConfig, prepare, split_of
from kodalle_cli.data.shards import iter_image_samples, shard_paths
from kodalle_cli.data.synthetic import generate
from kodalle_cli.errors import KodalleError

FIXTURES = Path(__file__).parents[2] / "shared/fixtures/kfashion"


def run(source, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    kw.setdefault("image_size", 32)
    return prepare(PrepareConfig(source=Path(source), out=Path(out), **kw))


def samples(out, split="train"):
    return list(iter_image_samples(out, split))


def tar_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.tar"))}


def jpeg(size=(40, 30), colour=(200, 30, 30), **save):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", **save)
    return buf.getvalue()


@pytest.fixture()
def kf(tmp_path):
    """A small synthetic K-Fashion tree, images and labels in separate folders (AI Hub style)."""
    src = tmp_path / "kf"
    generate(src, 12, size=48, seed=3, split_dirs=True)
    return src


# ---- real samples ----------------------------------------------------------------------------
@pytest.mark.skipif(not FIXTURES.is_dir(), reason="real K-Fashion samples not available")
def test_real_samples_to_garment_crops(tmp_path):
    m = run(FIXTURES, tmp_path / "out", crop="garments", image_size=64)
    assert m["format"] == "kfashion" and m["samples"] == 3 and m["skipped"] == []
    got = {s.key: s for s in samples(tmp_path / "out")}
    assert sorted(got) == ["100026", "1070263", "1092253"]
    for key, s in got.items():
        label = json.loads((FIXTURES / f"{key}.json").read_text(encoding="utf-8"))
        assert s.caption == caption_from_label(label)
        assert s.image.size == (64, 64)
        assert s.meta["source"] == f"{key}.jpg" and s.meta["label"] == f"{key}.json"
        assert s.meta["labels"] == label["데이터셋 정보"]["데이터셋 상세설명"]["라벨링"]
    assert got["100026"].meta["original_size"] == [800, 800]
    assert got["1092253"].meta["original_size"] == [800, 1049]
    # union of the blouse and skirt rectangles (x 260.1..555.1, y 59.4..618.2) plus 5% of
    # its size on each side, rounded outwards
    assert got["100026"].meta["crop_box"] == [245, 31, 570, 647]
    assert got["1070263"].meta["crop_box"][3] == 1049  # clamped to the image


# ---- sources ---------------------------------------------------------------------------------
def test_kfashion_pairs_by_named_file_then_by_stem(tmp_path, kf):
    # a label naming another file pairs with that file, not with its stem twin
    (kf / "images" / "named_elsewhere.jpg").write_bytes((kf / "images" / "000000.jpg").read_bytes())
    lbl = json.loads((kf / "labels" / "000001.json").read_text(encoding="utf-8"))
    lbl["이미지 정보"]["이미지 파일명"] = "named_elsewhere.jpg"
    (kf / "labels" / "000001.json").write_text(json.dumps(lbl, ensure_ascii=False), encoding="utf-8")
    m = run(kf, tmp_path / "out")
    keys = {s.key: s for s in samples(tmp_path / "out")}
    assert keys["named_elsewhere"].meta["label"] == "labels/000001.json"
    assert {"source": "images/000001.jpg", "reason": "image has no label"} in m["skipped"]
    assert m["samples"] == 12


def test_folder_format_caption_pick(tmp_path):
    src = tmp_path / "folder"
    src.mkdir()
    for stem in ("a", "b"):
        (src / f"{stem}.png").write_bytes(jpeg())  # a JPEG named .png still opens
        (src / f"{stem}.txt").write_text(f"{stem} one\n\n{stem} two\n", encoding="utf-8")
    m = run(src, tmp_path / "all")
    assert m["format"] == "folder" and m["samples"] == 4
    assert [(s.key, s.caption) for s in samples(tmp_path / "all")] == [
        ("a_0", "a one"), ("a_1", "a two"), ("b_0", "b one"), ("b_1", "b two")]
    run(src, tmp_path / "first", caption_pick="first")
    assert [(s.key, s.caption) for s in samples(tmp_path / "first")] == [
        ("a", "a one"), ("b", "b one")]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_formats(tmp_path, fmt):
    src = tmp_path / "m"
    (src / "img").mkdir(parents=True)
    (src / "img" / "x.y.jpg").write_bytes(jpeg())
    (src / "img" / "z.jpg").write_bytes(jpeg(colour=(0, 0, 200)))
    rows = [("img/x.y.jpg", "빨간 상자"), ("img/z.jpg", "파란 상자"), ("../outside.jpg", "탈출"),
            ("img/z.jpg", "  ")]
    if fmt == "jsonl":
        text = "\n".join(json.dumps({"image": p, "caption": c}, ensure_ascii=False) for p, c in rows)
        text += "\n{not json\n"
    else:
        text = "image,caption\n" + "".join(f"{p},{c}\n" for p, c in rows)
    (src / f"data.{fmt}").write_text(text, encoding="utf-8")
    m = run(src, tmp_path / "out")  # auto-detected from the directory
    assert m["format"] == fmt
    got = [(s.key, s.caption) for s in samples(tmp_path / "out")]
    assert got == [("x_y", "빨간 상자"), ("z", "파란 상자")]  # keys have no dots
    reasons = sorted(s["reason"].split(":")[0] for s in m["skipped"])
    expected = ["caption is empty", "image path '../outside.jpg' escapes the source directory"]
    assert reasons == sorted(expected + (["invalid JSON"] if fmt == "jsonl" else []))


def test_empty_or_missing_source_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KodalleError, match="is empty"):
        run(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(SystemExit) as exc:
        main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: source") and "does not exist" in err and "\n" not in err


# ---- bad input -------------------------------------------------------------------------------
def test_every_bad_input_is_skipped_with_its_reason(tmp_path, kf):
    images, labels = kf / "images", kf / "labels"
    good = (images / "000000.jpg").read_bytes()
    base = json.loads((labels / "000000.json").read_text(encoding="utf-8"))

    def add(stem, image=None, label=None):
        if image is not None:
            (images / f"{stem}.jpg").write_bytes(image)
        if label is not None:
            if isinstance(label, dict) and stem != "escape":
                label = json.loads(json.dumps(label))
                label["이미지 정보"]["이미지 파일명"] = f"{stem}.jpg"
            text = label if isinstance(label, str) else json.dumps(label, ensure_ascii=False)
            (labels / f"{stem}.json").write_text(text, encoding="utf-8")

    def relabel(**parts):
        lbl = json.loads(json.dumps(base))
        detail = lbl["데이터셋 정보"]["데이터셋 상세설명"]
        for k, v in parts.items():
            detail[k] = v
        return lbl

    add("corrupt", b"this is not a jpeg at all", base)
    add("truncated", good[: len(good) // 2], base)
    (images / "unreadable.jpg").symlink_to(tmp_path / "nowhere.jpg")  # a broken link
    add("unreadable", None, base)
    add("badjson", good, '{"이미지 정보": {')
    add("truncjson", good, json.dumps(base, ensure_ascii=False)[:-40])
    add("nokeys", good, {"이미지 정보": {"이미지 파일명": "nokeys.jpg"}})
    add("noimage", None, base)
    add("nolabel", good, None)
    add("empty", good, relabel(라벨링={"스타일": [{}], "아우터": [{}], "하의": [{}], "원피스": [{}],
                                    "상의": [{}]}))
    add("degenerate", good, relabel(렉트좌표={"상의": [{"X좌표": 3, "Y좌표": 4, "가로": 0, "세로": 9}]}))
    escape = json.loads(json.dumps(base))
    escape["이미지 정보"]["이미지 파일명"] = "../../../etc/passwd.jpg"
    add("escape", None, escape)
    big = io.BytesIO()
    Image.new("RGB", (300, 300)).save(big, "PNG")
    add("bomb", big.getvalue(), base)

    m = run(kf, tmp_path / "out", crop="garments", max_pixels=200 * 200)
    why = {s["source"]: s["reason"] for s in m["skipped"]}
    assert why["images/corrupt.jpg"].startswith("unreadable image")
    assert why["images/truncated.jpg"].startswith("unreadable image")
    assert why["images/unreadable.jpg"].startswith("unreadable image")
    assert why["labels/badjson.json"].startswith("invalid JSON")
    assert why["labels/truncjson.json"].startswith("invalid JSON")
    assert why["labels/nokeys.json"] == "label lacks 데이터셋 정보.데이터셋 상세설명.라벨링"
    assert why["labels/noimage.json"] == "the label's image is missing"
    assert why["images/nolabel.jpg"] == "image has no label"
    assert why["labels/empty.json"] == "caption is empty"
    assert why["labels/degenerate.json"].startswith("degenerate crop box")
    assert "escapes the source directory" in why["labels/escape.json"]
    assert why["images/bomb.jpg"].startswith("decompression bomb")
    assert len(why) == 12
    assert m["samples"] == 12  # the good ones all made it
    assert m["skip_reasons"]["unreadable image"] == 3
    assert sum(m["skip_reasons"].values()) == 12
    assert prep.summary(m, tmp_path / "out").splitlines()[1].startswith("skipped 12: ")
    with pytest.raises(KodalleError, match="--strict"):
        run(kf, tmp_path / "strict", crop="garments", strict=True)


# ---- images ----------------------------------------------------------------------------------
def test_modes_are_converted_to_rgb_and_alpha_flattened_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert to_rgb(la).getpixel((0, 0)) == (0, 0, 0)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info["transparency"] = 0
    assert to_rgb(p).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    half = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert to_rgb(half).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("L", (2, 2), 77)).mode == "RGB"


def test_16bit_png_and_exif_orientation(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 8), 40000, np.uint16)).save(path)
    im, size, _ = open_image(path)
    assert im.mode == "RGB" and size == (8, 6) and im.getpixel((0, 0)) == (156, 156, 156)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    src = Image.new("RGB", (40, 20), (255, 255, 255))
    src.paste((0, 0, 0), (0, 0, 10, 20))  # black on the left of the stored image
    buf = io.BytesIO()
    src.save(buf, "JPEG", exif=exif, quality=95)
    im, size, _ = open_image(buf.getvalue())
    assert size == (20, 40) and im.size == (20, 40)
    assert sum(im.getpixel((10, 2))) < 100 and sum(im.getpixel((10, 37))) > 600  # black on top


def test_resize_modes():
    wide = Image.new("RGB", (40, 20), (0, 0, 0))
    padded = fit(wide, 20, "pad")
    assert padded.size == (20, 20)
    assert padded.getpixel((10, 0)) == (255, 255, 255) and padded.getpixel((10, 10)) == (0, 0, 0)
    assert fit(wide, 20, "center-crop").getpixel((10, 0)) == (0, 0, 0)
    assert fit(wide, 20, "stretch").getpixel((10, 0)) == (0, 0, 0)


def test_crop_box_margin_and_clamp():
    assert crop_box([(10, 10, 30, 50), (20, 40, 50, 60)], (100, 100), 0.1) == (6, 5, 54, 65)
    assert crop_box([(0, 0, 100, 90)], (100, 90), 0.05) == (0, 0, 100, 90)


def test_large_jpeg_decodes_at_reduced_size_with_the_same_result():
    rng = np.random.default_rng(0)
    arr = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((40, 40, 1))).astype(np.uint8)
    data = io.BytesIO()
    Image.fromarray(arr).save(data, "JPEG", quality=95)  # 1600x1200
    data = data.getvalue()
    _, _, scale = open_image(data, min_size=(200, 150))
    assert scale == 1 / 8
    fast = np.asarray(preprocess(data, 64, boxes=[(400, 300, 1200, 900)]).image, np.float32)
    slow = np.asarray(preprocess(data, 64, boxes=[(400, 300, 1200, 900)],
                                 fast_decode=False).image, np.float32)
    assert np.abs(fast - slow).mean() < 6


def test_to_tensor():
    t = to_tensor([Image.new("RGB", (10, 5), (255, 0, 0)), Image.new("L", (8, 8), 0)], size=8)
    assert t.shape == (2, 3, 8, 8) and t.dtype.is_floating_point
    assert float(t.min()) == 0.0 and float(t.max()) == 1.0
    assert t[0, 0, 4, 4] == 1.0 and t[0, 1, 4, 4] == 0.0 and t[0, 1, 0, 0] == 1.0  # white pad


# ---- output, resume, determinism -------------------------------------------------------------
def test_val_split_is_stable_and_shards_are_sized(tmp_path, kf):
    m = run(kf, tmp_path / "out", val_fraction=0.3, shard_size=4)
    val = {s.key for s in samples(tmp_path / "out", "val")}
    train = {s.key for s in samples(tmp_path / "out", "train")}
    assert val and train and not (val & train) and len(val | train) == 12
    assert val == {k for k in val | train if split_of(k, 0.3) == "val"}
    assert m["splits"] == {"train": len(train), "val": len(val)}
    assert all(s["samples"] <= 4 for s in m["shards"])
    for s in m["shards"]:
        stats = json.loads((tmp_path / "out" / s["name"].replace(".tar", "_stats.json")).read_text())
        assert stats["samples"] == s["samples"]
    names = [s["name"] for s in m["shards"]]
    assert names[0] == "train-000000.tar" and "val-000000.tar" in names
    for tar in Path(tmp_path / "out").glob("*.tar"):
        with tarfile.open(tar) as t:
            members = t.getmembers()
        assert all(x.mtime == 0 and x.uid == 0 and x.name.count(".") == 1 for x in members)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["samples"] == 12 and manifest["options"]["val_fraction"] == 0.3
    with pytest.raises(KodalleError, match="no val shards"):
        shard_paths(tmp_path / "kf", "val")


def test_resume_after_interrupted_run_gives_the_same_shards(tmp_path, kf, monkeypatch):
    clean = tmp_path / "clean"
    run(kf, clean, shard_size=4)
    out = tmp_path / "out"
    real = prep.make_sample
    calls = {"n": 0}

    def dying(c, cfg):
        calls["n"] += 1
        if calls["n"] == 6:  # in the middle of the second shard
            raise KeyboardInterrupt
        return real(c, cfg)

    monkeypatch.setattr(prep, "make_sample", dying)
    with pytest.raises(KeyboardInterrupt):
        run(kf, out, shard_size=4)
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar", "train-000000_stats.json"]
    first = (out / "train-000000.tar").stat().st_mtime_ns
    monkeypatch.setattr(prep, "make_sample", real)
    (out / ".train-000001.tar.tmp-999").write_bytes(b"left by a killed worker")
    m = run(kf, out, shard_size=4)
    assert (out / "train-000000.tar").stat().st_mtime_ns == first  # reused, not rewritten
    assert not list(out.glob(".*"))
    assert m["samples"] == 12
    assert tar_bytes(out) == tar_bytes(clean)
    with pytest.raises(KodalleError, match="other options"):
        run(kf, out, shard_size=4, image_size=40)


def test_output_inside_the_source_is_not_read_as_input(tmp_path, kf):
    m1 = run(kf, kf / "shards")
    m2 = run(kf, kf / "shards")
    assert m1["samples"] == m2["samples"] == 12 and m2["skipped"] == []


def test_same_inputs_give_byte_identical_shards_with_any_worker_count(tmp_path, kf, monkeypatch):
    m1 = run(kf, tmp_path / "one", shard_size=5, val_fraction=0.2, workers=1)
    monkeypatch.setattr(prep, "PARALLEL_SCAN_MIN", 1)  # labels read in the workers too
    m2 = run(kf, tmp_path / "two", shard_size=5, val_fraction=0.2, workers=2)
    assert tar_bytes(tmp_path / "one") == tar_bytes(tmp_path / "two")
    assert len(tar_bytes(tmp_path / "one")) == len(m1["shards"]) >= 3
    assert m1["shards"] == m2["shards"] and m1["skipped"] == m2["skipped"] == []
    (kf / "images" / "000003.jpg").write_bytes(b"broken")
    with pytest.raises(KodalleError, match="000003.jpg: unreadable image"):
        run(kf, tmp_path / "strict", shard_size=5, workers=2, strict=True)
    assert not list((tmp_path / "strict").glob(".*"))  # no temporary files left behind


def test_cli_prepare(tmp_path, kf, capsys):
    main(["prepare", str(kf), "--out", str(tmp_path / "out"), "--workers", "1",
          "--image-size", "32", "--caption-style", "compact", "--no-progress"])
    assert "wrote 12 samples (12 train, 0 val) in 1 shard" in capsys.readouterr().out
    first = samples(tmp_path / "out")[0]
    assert first.caption.endswith("이다.") and first.image.size == (32, 32)
    with pytest.raises(SystemExit) as exc:
        main(["prepare", str(kf), "--resize", "squash"])
    assert exc.value.code == 2


def test_reader_splits_shards_between_workers_and_repeats(tmp_path, kf, monkeypatch):
    run(kf, tmp_path / "out", shard_size=4)  # 3 shards of 4
    every = [s.key for s in iter_image_samples(tmp_path / "out")]
    assert len(every) == 12 and every == sorted(every)
    monkeypatch.setenv("NUM_WORKERS", "2")  # what a torch DataLoader worker would report
    parts = []
    for worker in ("0", "1"):
        monkeypatch.setenv("WORKER", worker)
        parts.append([s.key for s in iter_image_samples(tmp_path / "out")])
    assert sorted(parts[0] + parts[1]) == every and len(parts[0]) == 8
    monkeypatch.delenv("NUM_WORKERS")
    monkeypatch.delenv("WORKER")
    shuffled = [s.key for s in iter_image_samples(
        str(tmp_path / "out" / "train-*.tar"), shuffle_shards=True, seed=1, repeat=True,
        limit=30, decode=False)]
    assert len(shuffled) == 30 and set(shuffled) == set(every)
    raw = next(iter_image_samples(tmp_path / "out", decode=False)).image
    assert isinstance(raw, bytes) and raw[:2] == b"\xff\xd8"
