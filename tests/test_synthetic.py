"""Synthetic K-Fashion data: real label schema, seeded, and checkable from its pixels."""

import json
from pathlib import Path

import pytest
from PIL import Image

from kodalle_cli.data.captions import caption_from_label
from kodalle_cli.data.prepare import PrepareConfig, prepare
from kodalle_cli.data.shards import iter_image_samples
from kodalle_cli.data.synthetic import (
    CATEGORIES,
    COLOURS,
    PRINTS,
    SLEEVES,
    Garment,
    combinations,
    garment_category,
    garment_colour,
    generate,
    render,
)

FIXTURES = Path(__file__).parents[2] / "shared/fixtures/kfashion"


def keys(obj, prefix=""):
    """Every key path of the nested label (list items merged)."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(prefix + k)
            out |= keys(v, prefix + k + ".")
    elif isinstance(obj, list):
        for v in obj:
            out |= keys(v, prefix)
    return out


def test_labels_follow_the_real_schema(tmp_path):
    items = generate(tmp_path, 6, size=64, seed=0)
    label = json.loads(items[0].label.read_text(encoding="utf-8"))
    detail = label["데이터셋 정보"]["데이터셋 상세설명"]
    assert list(detail["라벨링"]) == ["스타일", "아우터", "하의", "원피스", "상의"]
    part = items[0].garment.part
    rect = detail["렉트좌표"][part][0]
    assert set(rect) == {"X좌표", "Y좌표", "가로", "세로"} and max(rect["가로"], rect["세로"]) > 40
    assert label["이미지 정보"]["이미지 파일명"] == items[0].image.name
    if FIXTURES.is_dir():  # every key of ours is a key of the real format
        real = json.loads((FIXTURES / "100026.json").read_text(encoding="utf-8"))
        allowed = keys(real)
        ours = {k for k in keys(label) if ".폴리곤좌표." not in k}
        assert ours <= allowed, ours - allowed


def test_seeded_and_prefix_stable(tmp_path):
    a = generate(tmp_path / "a", 5, size=32, seed=7)
    b = generate(tmp_path / "b", 8, size=32, seed=7)
    c = generate(tmp_path / "c", 5, size=32, seed=8)
    for x, y in zip(a, b[:5], strict=True):
        assert x.image.read_bytes() == y.image.read_bytes()
        assert x.label.read_bytes() == y.label.read_bytes()
    assert [x.garment for x in a] != [x.garment for x in c]


def test_combinations_and_holdout(tmp_path):
    held = [("레드", "스커트"), ("블루", "코트")]
    items = generate(tmp_path / "h", 120, size=32, seed=1, holdout=held)
    drawn = {(i.garment.colour, i.garment.category) for i in items}
    assert not drawn & set(held) and len(drawn) > 30
    only = [("그린", "팬츠"), ("핑크", "드레스")]
    items = generate(tmp_path / "o", 20, size=32, seed=1, combos=only)
    assert {(i.garment.colour, i.garment.category) for i in items} == set(only)
    assert len(combinations()) == len(COLOURS) * len(CATEGORIES) >= 60
    with pytest.raises(ValueError):
        generate(tmp_path / "x", 1, combos=only, holdout=only)


@pytest.mark.parametrize("size", [64, 256])
def test_colour_and_category_are_recovered_from_pixels(tmp_path, size):
    items = generate(tmp_path, 150 if size == 64 else 40, size=size, seed=2)
    assert {i.garment.category for i in items} == set(CATEGORIES)
    assert {i.garment.print for i in items} == set(PRINTS)
    for it in items:
        with Image.open(it.image) as im:  # the JPEG written to disk
            assert garment_colour(im) == it.garment.colour, it
            assert garment_category(im) == it.garment.category, it


def test_every_colour_and_category_is_distinct_when_drawn():
    for colour in COLOURS:
        for category in CATEGORIES:
            im, _ = render(Garment(colour, category, "스트라이프",
                                   sleeve=SLEEVES.get(category, (None,))[0]), 64)
            assert garment_colour(im) == colour
            assert garment_category(im) == category
    blank = Image.new("RGB", (64, 64), "white")
    assert garment_colour(blank) is None and garment_category(blank) is None


def test_prepare_reads_synthetic_data(tmp_path):
    items = generate(tmp_path / "src", 8, size=64, seed=4, split_dirs=True)
    m = prepare(PrepareConfig(source=tmp_path / "src", out=tmp_path / "out", workers=1,
                              image_size=64, crop="garments", progress=False))
    assert m["format"] == "kfashion" and m["samples"] == 8
    by_key = {i.stem: i for i in items}
    for s in iter_image_samples(tmp_path / "out"):
        g = by_key[s.key].garment
        label = json.loads(by_key[s.key].label.read_text(encoding="utf-8"))
        assert s.caption == caption_from_label(label)
        assert f"색상은 {g.colour}이다" in s.caption and f"카테고리는 {g.category}이다" in s.caption
        assert garment_colour(s.image) == g.colour  # survives the crop and re-encode
