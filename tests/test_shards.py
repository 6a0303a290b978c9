"""data/shards.py is the one reader of image shards: every sample, one shard's metadata, one
sample's image, whatever image extension the sample carries."""

from __future__ import annotations

import io
import tarfile

from PIL import Image

from kodalle_cli.data.shards import (
    IMAGE_EXTENSIONS,
    ShardWriter,
    iter_image_samples,
    iter_shard_meta,
    read_image,
)


def _encoded(colour, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_what_prepare_writes_reads_back(tmp_path):
    writer = ShardWriter(tmp_path / "train-000000.tar")
    writer.write("a", _encoded((250, 0, 0), "JPEG"), "빨간 상자", {"labels": {"x": 1}})
    writer.write("b", _encoded((0, 0, 250), "JPEG"), "파란 상자", {"labels": {"x": 2}})
    writer.commit({"written": 2})
    tar = tmp_path / "train-000000.tar"
    assert [(s.key, s.caption) for s in iter_image_samples(tmp_path)] == [
        ("a", "빨간 상자"), ("b", "파란 상자")]
    assert list(iter_shard_meta(tar)) == [("a", {"labels": {"x": 1}}),
                                          ("b", {"labels": {"x": 2}})]
    red = read_image(tar, "a")
    assert red.mode == "RGB" and red.getpixel((4, 4))[0] > 200
    assert read_image(tar, "b", decode=False)[:2] == b"\xff\xd8"  # the JPEG as written
    assert read_image(tar, "missing") is None
    assert read_image(tmp_path / "no-such.tar", "a") is None


def test_every_image_extension(tmp_path):
    members = []
    for i, ext in enumerate(IMAGE_EXTENSIONS):
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
        members += [(f"k{i}.{ext}", _encoded((0, 200, 0), fmt)), (f"k{i}.txt", ext.encode())]
    members += [("broken.png", b"not an image"), ("broken.txt", b"x")]
    tar = _tar(tmp_path / "train-000000.tar", members)
    bad = []
    samples = list(iter_image_samples(tar, on_bad=lambda *a: bad.append(a)))
    assert [s.caption for s in samples] == list(IMAGE_EXTENSIONS)
    assert all(s.image.getpixel((4, 4))[1] > 150 for s in samples)
    assert [b[1] for b in bad] == ["broken"]
    for i, _ in enumerate(IMAGE_EXTENSIONS):
        assert read_image(tar, f"k{i}").getpixel((4, 4))[1] > 150
    assert read_image(tar, "broken") is None


def test_memorisation_and_attributes_read_through_it(tmp_path):
    from kodalle_cli.attributes import _shard_labels
    from kodalle_cli.memorisation import training_image

    tar = _tar(tmp_path / "train-000000.tar", [
        ("p.png", _encoded((0, 0, 240), "PNG")), ("p.json", b'{"labels": {"a": 1}}'),
        ("q.jpg", _encoded((240, 0, 0), "JPEG")), ("q.json", b'["not a dict"]')])
    assert training_image(tmp_path, tar.name, "p").getpixel((4, 4))[2] > 200
    assert training_image(tmp_path, tar.name, "q").getpixel((4, 4))[0] > 200
    assert training_image(tmp_path, "", "p") is None
    assert list(_shard_labels(tar)) == [{"a": 1}]
