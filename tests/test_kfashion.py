"""K-Fashion labels: the parser, the captions and `kodalle prepare --format kfashion`, on four
hand-written labels in AI Hub's structure (tests/fixtures/kfashion) with images drawn here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from kodalle_cli.cli import main
from kodalle_cli.data import kfashion
from kodalle_cli.data.captions import caption_from_label
from kodalle_cli.data.prepare import PrepareConfig, SampleError, make_sample, prepare
from kodalle_cli.data.shards import iter_image_samples
from kodalle_cli.data.sources import Candidate
from kodalle_cli.data.synthetic import COLOURS

LABELS = Path(__file__).parent / "fixtures" / "kfashion"
STEMS = ("200101", "200102", "200103", "200104")
# the colours of the fixtures that the synthetic palette lacks
EXTRA_COLOURS = {"화이트": (235, 235, 235), "카키": (110, 110, 60)}


def load(stem: str) -> dict:
    return kfashion.read_label(LABELS / f"{stem}.json")


def draw_image(label: dict, path: Path) -> None:
    """The label's image as the tests use it: each part's rectangle in its colour on white,
    at the size the label declares."""
    info = label["이미지 정보"]
    image = Image.new("RGB", (info["이미지 너비"], info["이미지 높이"]), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    detail = label["데이터셋 정보"]["데이터셋 상세설명"]
    for part in kfashion.PARTS:
        rect = detail["렉트좌표"][part][0]
        if rect:
            colour = detail["라벨링"][part][0]["색상"]
            x, y, w, h = rect["X좌표"], rect["Y좌표"], rect["가로"], rect["세로"]
            draw.rectangle([x, y, x + w, y + h], fill={**COLOURS, **EXTRA_COLOURS}[colour])
    image.save(path, quality=90)


@pytest.fixture()
def source(tmp_path) -> Path:
    """The fixtures as AI Hub ships them: images/ and labels/ side by side."""
    root = tmp_path / "kfashion"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem in STEMS:
        shutil.copy(LABELS / f"{stem}.json", root / "labels")
        draw_image(load(stem), root / "images" / f"{stem}.jpg")
    return root


# ---- the parser ------------------------------------------------------------------------------
def test_every_fixture_is_a_label_naming_its_file():
    for stem in STEMS:
        label = load(stem)
        assert kfashion.is_label(label)
        assert list(kfashion.labeling(label)) == ["스타일", *kfashion.PARTS]
    assert kfashion.image_file_name(load("200101")) == "street_0412_07.jpg"
    assert kfashion.image_file_name(load("200103")) == "200103.jpg"  # read through its BOM
    assert kfashion.image_file_name({"이미지 정보": {"이미지 파일명": ""}}) is None
    assert not kfashion.is_label({"images": []})


def test_parts_and_attributes_in_label_order_with_values_as_text():
    assert kfashion.part_attributes(load("200101")) == [
        ("아우터", [("기장", "롱"), ("색상", "카키"), ("카테고리", "코트"), ("옷깃", "테일러드칼라"),
                  ("소매기장", "긴팔"), ("소재", "울/캐시미어"), ("프린트", "무지"), ("핏", "루즈")]),
        ("하의", [("기장", "발목"), ("색상", "블랙"), ("카테고리", "팬츠"), ("소재", "데님"),
                 ("프린트", "무지"), ("핏", "스키니")]),
        ("상의", [("기장", "노멀"), ("색상", "화이트"), ("카테고리", "티셔츠"), ("소매기장", "반팔"),
                 ("소재", "저지"), ("프린트", "레터링"), ("넥라인", "라운드넥"), ("핏", "노멀")]),
    ]
    # lists joined, spelling variants (노말, 숏슬리브, 롱슬리브) made the usual ones
    dress = dict(kfashion.part_attributes(load("200102")))["원피스"]
    assert ("디테일", "셔링, 프릴") in dress and dress[-1] == ("핏", "노멀")
    assert kfashion.part_attributes(load("200103")) == [
        ("하의", [("색상", "베이지")]), ("상의", [("색상", "네이비"), ("소매기장", "반팔")])]
    blouse = dict(kfashion.part_attributes(load("200104")))["상의"]
    assert ("소매기장", "긴팔") in blouse and ("소재", "우븐, 레이스") in blouse


def test_style_attributes():
    assert kfashion.style_attributes(load("200101")) == [("스타일", "스트리트"), ("서브스타일", "힙합")]
    assert kfashion.style_attributes(load("200103")) == []  # "스타일": [{}]


def test_boxes_are_the_rectangles_of_the_parts_present():
    boxes, space = kfashion.label_boxes(load("200101"))
    assert space == (800, 1049)
    want = [(151.3, 98.72, 663.3, 858.72), (262.41, 560.1, 563.41, 1030.1),
            (290.66, 180.05, 526.66, 510.05)]  # 아우터, 하의, 상의 as (left, top, right, bottom)
    assert [pytest.approx(b) for b in boxes] == want
    boxes, space = kfashion.label_boxes(load("200102"))
    assert boxes == [(203.5, 64.25, 601.5, 765.25)] and space == (800, 800)
    broken = load("200104")
    broken["데이터셋 정보"]["데이터셋 상세설명"]["렉트좌표"]["하의"][0]["가로"] = 0
    with pytest.raises(kfashion.LabelError, match="degenerate crop box: 하의 rectangle 0.0x300.0"):
        kfashion.label_boxes(broken)


def test_unreadable_labels_say_why(tmp_path):
    cases = {"bad.json": b'{"a": ', "list.json": b"[1, 2]", "latin1.json": "{\"é\": 1}".encode("latin-1")}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(kfashion.LabelError, match="invalid JSON: Expecting value at line 1"):
        kfashion.read_label(tmp_path / "bad.json")
    with pytest.raises(kfashion.LabelError, match="not a JSON object"):
        kfashion.read_label(tmp_path / "list.json")
    with pytest.raises(kfashion.LabelError, match="not UTF-8"):
        kfashion.read_label(tmp_path / "latin1.json")
    with pytest.raises(kfashion.LabelError, match="unreadable label"):
        kfashion.read_label(tmp_path / "missing.json")


def test_make_label_has_the_structure_of_the_fixtures():
    rect = {"X좌표": 1.5, "Y좌표": 2, "가로": 3, "세로": 4}
    made = kfashion.make_label("x.jpg", 7, (800, 600), {"원피스": ({"색상": "레드"}, rect, {})})
    fixture = load("200102")
    assert list(made) == list(fixture)
    assert list(made["데이터셋 정보"]) == list(fixture["데이터셋 정보"])
    detail, want = made["데이터셋 정보"]["데이터셋 상세설명"], fixture["데이터셋 정보"]["데이터셋 상세설명"]
    assert {k: list(v) for k, v in detail.items()} == {k: list(v) for k, v in want.items()}
    assert detail["라벨링"]["상의"] == [{}] and detail["라벨링"]["스타일"] == [{}]
    assert kfashion.label_boxes(made) == ([(1.5, 2.0, 4.5, 6.0)], (800, 600))
    with pytest.raises(ValueError, match="unknown parts"):
        kfashion.make_label("x.jpg", 7, (8, 8), {"모자": ({}, {}, {})})


# ---- captions --------------------------------------------------------------------------------
def test_captions_of_the_fixtures():
    street = load("200101")
    per_part = (
        "아우터에서 기장은 롱이다. 색상은 카키이다. 카테고리는 코트이다. 옷깃은 테일러드칼라이다. "
        "소매기장은 긴팔이다. 소재에는 울/캐시미어이다. 프린트에는 무지이다. 핏은 루즈이다. "
        "하의에서 기장은 발목이다. 색상은 블랙이다. 카테고리는 팬츠이다. 소재에는 데님이다. "
        "프린트에는 무지이다. 핏은 스키니이다. "
        "상의에서 기장은 노멀이다. 색상은 화이트이다. 카테고리는 티셔츠이다. 소매기장은 반팔이다. "
        "소재에는 저지이다. 프린트에는 레터링이다. 넥라인은 라운드넥이다. 핏은 노멀이다."
    )
    assert caption_from_label(street) == per_part
    assert caption_from_label(street, include_style=True) == (
        "스타일은 스트리트이다. 서브스타일은 힙합이다. " + per_part)
    assert caption_from_label(street, "compact") == (
        "아우터는 기장이 롱 색상이 카키 옷깃이 테일러드칼라 소매기장이 긴팔 소재가 울/캐시미어 "
        "프린트가 무지 핏이 루즈인 코트이다. 하의는 기장이 발목 색상이 블랙 소재가 데님 프린트가 무지 "
        "핏이 스키니인 팬츠이다. 상의는 기장이 노멀 색상이 화이트 소매기장이 반팔 소재가 저지 "
        "프린트가 레터링 넥라인이 라운드넥 핏이 노멀인 티셔츠이다."
    )
    assert caption_from_label(load("200102"), "per-attribute") == (
        "원피스에서 기장은 미디이다. 원피스에서 색상은 레드이다. 원피스에서 카테고리는 드레스이다. "
        "원피스에서 소매기장은 민소매이다. 원피스에서 소재에는 시폰이다. 원피스에서 프린트에는 "
        "플로럴이다. 원피스에서 디테일에는 셔링, 프릴이다. 원피스에서 넥라인은 브이넥이다. "
        "원피스에서 핏은 노멀이다."
    )
    sparse = load("200103")
    assert caption_from_label(sparse) == caption_from_label(sparse, include_style=True) == (
        "하의에서 색상은 베이지이다. 상의에서 색상은 네이비이다. 소매기장은 반팔이다.")
    assert caption_from_label(load("200104"), "compact") == (
        "하의는 기장이 미니 색상이 핑크 소재가 트위드 핏이 노멀인 스커트이다. 상의는 색상이 화이트 "
        "서브색상이 핑크 옷깃이 피터팬칼라 소매기장이 긴팔 소재가 우븐, 레이스 디테일이 리본인 "
        "블라우스이다."
    )


# ---- kodalle prepare -------------------------------------------------------------------------
def test_prepare_kfashion_on_the_fixtures(source, tmp_path, capsys):
    out = tmp_path / "shards"
    main(["prepare", str(source), "--format", "kfashion", "--out", str(out), "--crop",
          "garments", "--image-size", "64", "--workers", "1", "--caption-style", "compact"])
    assert "wrote 4 samples (4 train, 0 val)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["format"] == "kfashion" and manifest["skipped"] == []
    got = {s.key: s for s in iter_image_samples(out)}
    assert sorted(got) == list(STEMS)  # paired by stem: the named files are not there
    for stem, s in got.items():
        label = load(stem)
        assert s.caption == caption_from_label(label, "compact")
        assert s.meta["label"] == f"labels/{stem}.json" and s.meta["source"] == f"images/{stem}.jpg"
        assert s.meta["labels"] == kfashion.labeling(label)
        assert s.image.size == (64, 64)
    assert got["200102"].meta["original_size"] == [800, 800]
    # union of the rectangles (x 128.5..668.5, y 106.45..1045.04) plus 5% of its size on each
    # side, rounded outwards and clamped to the 800x1049 image
    assert got["200103"].meta["crop_box"] == [101, 59, 696, 1049]
    # the dress alone: x 203.5..601.5, y 64.25..765.25
    assert got["200102"].meta["crop_box"] == [183, 29, 622, 800]


def test_prepare_skips_what_a_label_cannot_give(source, tmp_path):
    (source / "labels" / "200104.json").write_text("{", encoding="utf-8")
    lbl = load("200102")
    lbl["데이터셋 정보"]["데이터셋 상세설명"]["렉트좌표"]["원피스"][0]["세로"] = -3
    (source / "labels" / "200102.json").write_text(json.dumps(lbl, ensure_ascii=False),
                                                   encoding="utf-8")
    m = prepare(PrepareConfig(source=source, out=tmp_path / "out", crop="garments",
                              image_size=32, workers=1, progress=False))
    assert m["samples"] == 2
    assert {"source": "labels/200104.json",
            "reason": "invalid JSON: Expecting property name enclosed in double quotes at "
                      "line 1 column 2"} in m["skipped"]
    assert {"source": "labels/200102.json",
            "reason": "degenerate crop box: 원피스 rectangle 398.0x-3.0"} in m["skipped"]
    # a label broken after the scan is skipped with the same reason
    cfg = PrepareConfig(source=source, out=tmp_path / "o2")
    cand = Candidate("200104", str(source / "images" / "200104.jpg"), "images/200104.jpg",
                     label=str(source / "labels" / "200104.json"))
    with pytest.raises(SampleError, match="invalid JSON") as err:
        make_sample(cand, cfg)
    assert err.value.source == "labels/200104.json"
