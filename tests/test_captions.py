"""Captions from K-Fashion labels: the three specified captions and the real samples."""

import json
from pathlib import Path

import pytest

from kodalle_cli.data.captions import (
    caption_attribute,
    caption_from_label,
    has_final_consonant,
    topic,
)

FIXTURES = Path(__file__).parents[2] / "shared/fixtures/kfashion"


def label(**parts):
    """A K-Fashion label whose 라벨링 holds ``parts`` (in the real part order)."""
    block = {"스타일": [parts.pop("스타일", {})]}
    for part in ("아우터", "하의", "원피스", "상의"):
        block[part] = [parts.get(part, {})]
    return {"이미지 정보": {"이미지 파일명": "x.jpg"},
            "데이터셋 정보": {"데이터셋 상세설명": {"라벨링": block}}}


def test_per_part_caption_matches_the_original_system():
    lbl = label(
        하의={"기장": "발목", "색상": "블루", "카테고리": "스커트", "소재": ["데님"], "핏": "와이드"},
        상의={"색상": "화이트", "카테고리": "블라우스", "디테일": ["셔링"], "소매기장": "반팔",
            "소재": ["우븐"]},
    )
    assert caption_from_label(lbl) == (
        "하의에서 기장은 발목이다. 색상은 블루이다. 카테고리는 스커트이다. 소재에는 데님이다. "
        "핏은 와이드이다. 상의에서 색상은 화이트이다. 카테고리는 블라우스이다. 디테일에는 셔링이다. "
        "소매기장은 반팔이다. 소재에는 우븐이다."
    )


def test_per_attribute_caption_matches_and_normalises_spelling():
    lbl = label(상의={"기장": "노말", "색상": "화이트", "서브색상": "블랙", "카테고리": "티셔츠",
                    "소매기장": "반팔", "소재": ["저지"], "프린트": ["레터링"], "넥라인": "라운드넥",
                    "핏": "루즈"})
    assert caption_from_label(lbl, "per-attribute") == (
        "상의에서 기장은 노멀이다. 상의에서 색상은 화이트이다. 상의에서 서브색상은 블랙이다. "
        "상의에서 카테고리는 티셔츠이다. 상의에서 소매기장은 반팔이다. 상의에서 소재에는 저지이다. "
        "상의에서 프린트에는 레터링이다. 상의에서 넥라인은 라운드넥이다. 상의에서 핏은 루즈이다."
    )


def test_compact_caption_puts_the_category_last():
    lbl = label(
        아우터={"색상": "카키", "카테고리": "코트", "소재": ["우븐"], "핏": "루즈"},
        하의={"색상": "네이비", "카테고리": "청바지", "소재": ["데님"], "핏": "스키니"},
    )
    assert caption_from_label(lbl, "compact") == (
        "아우터는 색상이 카키 소재가 우븐 핏이 루즈인 코트이다. "
        "하의는 색상이 네이비 소재가 데님 핏이 스키니인 청바지이다."
    )


def test_list_values_are_joined_and_style_only_on_request():
    lbl = label(스타일={"스타일": "로맨틱"}, 상의={"소재": ["우븐", "레이스"], "색상": "레드"})
    assert caption_from_label(lbl) == "상의에서 소재에는 우븐, 레이스이다. 색상은 레드이다."
    assert caption_from_label(lbl, include_style=True).startswith("스타일은 로맨틱이다. 상의에서")


def test_label_with_no_attributes_gives_an_empty_caption():
    assert caption_from_label(label()) == ""


def test_label_without_labeling_block_raises():
    with pytest.raises(KeyError):
        caption_from_label({"이미지 정보": {}})


def test_caption_attribute_reads_a_value_back():
    caption = caption_from_label(label(하의={"색상": "블루", "카테고리": "스커트"},
                                       상의={"색상": "화이트", "카테고리": "블라우스"}))
    assert caption_attribute(caption, "색상") == "블루"  # the first part's
    assert caption_attribute(caption, "카테고리") == "스커트"
    assert caption_attribute(caption, "핏") is None
    assert caption_attribute("상의에서 소매기장은 7부소매이다.", "소매기장") == "7부소매"


def test_particles_follow_the_final_syllable():
    assert [has_final_consonant(w) for w in ("색상", "카테고리", "핏", "옷깃", "7", "2")] == [
        True, False, True, True, True, False]
    assert topic("아우터") == "아우터는" and topic("소매기장") == "소매기장은"


REAL = {
    "100026": {
        "per-part": (
            "하의에서 기장은 니렝스이다. 색상은 화이트이다. 서브색상은 실버이다. 카테고리는 스커트이다. "
            "소재에는 레이스, 우븐이다. 프린트에는 도트이다. 핏은 노멀이다. 상의에서 기장은 노멀이다. "
            "색상은 화이트이다. 서브색상은 실버이다. 카테고리는 블라우스이다. 옷깃은 보우칼라이다. "
            "소매기장은 캡이다. 소재에는 우븐, 레이스이다. 프린트에는 도트이다. 넥라인은 브이넥이다. "
            "핏은 루즈이다."
        ),
        "compact": (
            "하의는 기장이 니렝스 색상이 화이트 서브색상이 실버 소재가 레이스, 우븐 프린트가 도트 "
            "핏이 노멀인 스커트이다. 상의는 기장이 노멀 색상이 화이트 서브색상이 실버 옷깃이 보우칼라 "
            "소매기장이 캡 소재가 우븐, 레이스 프린트가 도트 넥라인이 브이넥 핏이 루즈인 블라우스이다."
        ),
    },
    "1070263": {
        "per-part": "하의에서 색상은 화이트이다. 상의에서 색상은 화이트이다. 소매기장은 7부소매이다.",
        "per-attribute": (
            "하의에서 색상은 화이트이다. 상의에서 색상은 화이트이다. 상의에서 소매기장은 7부소매이다."
        ),
    },
    "1092253": {
        "per-part": "하의에서 색상은 베이지이다. 상의에서 색상은 그레이이다. 소매기장은 반팔이다.",
        "compact": "하의는 색상이 베이지이다. 상의는 색상이 그레이 소매기장이 반팔이다.",
    },
}


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="real K-Fashion samples not available")
@pytest.mark.parametrize("stem", sorted(REAL))
def test_real_kfashion_labels(stem):
    lbl = json.loads((FIXTURES / f"{stem}.json").read_text(encoding="utf-8"))
    for style, expected in REAL[stem].items():
        assert caption_from_label(lbl, style) == expected
    if stem == "100026":
        assert caption_from_label(lbl, include_style=True) == "스타일은 로맨틱이다. " + REAL[stem]["per-part"]
    else:  # "스타일": [{}] adds nothing
        assert caption_from_label(lbl, include_style=True) == REAL[stem]["per-part"]
