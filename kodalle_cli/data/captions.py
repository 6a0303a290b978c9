"""Korean captions built from K-Fashion label JSONs (the captions KoDALLE trained on).

The label's ``데이터셋 정보.데이터셋 상세설명.라벨링`` holds one entry per part (아우터, 하의,
원피스, 상의; ``[{}]`` when the part is absent) and a 스타일 entry. Each part's attributes become
sentences, in the label's own order:

- ``per-part`` (default): ``하의에서 기장은 발목이다. 색상은 블루이다. ... 상의에서 색상은 ...``
- ``per-attribute``: every sentence names its part (``상의에서 색상은 화이트이다.``)
- ``compact``: one sentence per part, category last
  (``아우터는 색상이 카키 소재가 우븐 핏이 루즈인 코트이다.``)

The particle follows the final syllable of the word before it (은/이 after a final consonant,
는/가 after a vowel); list-valued attributes (소재, 프린트, 디테일) take 에는 in the sentence
styles. Every sentence ends in 이다.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

CAPTION_STYLES = ("per-part", "per-attribute", "compact")
PARTS = ("아우터", "하의", "원피스", "상의")
LIST_ATTRIBUTES = ("소재", "프린트", "디테일")
STYLE_KEY = "스타일"
CATEGORY_KEY = "카테고리"

# Spelling variants seen in K-Fashion labels -> the spelling the captions use.
SPELLING = {
    "노말": "노멀",
    "롱슬리브": "긴팔",
    "숏슬리브": "반팔",
}

# Digits and Latin letters read with a final consonant (영 일 삼 육 칠 팔; L M N as 엘 엠 엔 ...).
_CONSONANT_ENDINGS = set("013678lmnrLMNR")


def has_final_consonant(word: str) -> bool:
    """Whether ``word``'s last syllable ends in a consonant (받침), deciding 은/는 and 이/가."""
    word = word.rstrip(" )]\"'")
    if not word:
        return False
    ch = word[-1]
    if "가" <= ch <= "힣":
        return (ord(ch) - ord("가")) % 28 != 0
    return ch in _CONSONANT_ENDINGS


def topic(word: str) -> str:
    """``word`` + 은/는."""
    return word + ("은" if has_final_consonant(word) else "는")


def subject(word: str) -> str:
    """``word`` + 이/가."""
    return word + ("이" if has_final_consonant(word) else "가")


def normalise(value: str) -> str:
    value = " ".join(str(value).split())
    return SPELLING.get(value, value)


def _value(value: Any) -> str:
    """An attribute value as text: lists joined with ", ", spelling normalised, empties dropped."""
    if isinstance(value, list | tuple):
        return ", ".join(v for v in (normalise(x) for x in value if x is not None) if v)
    if value is None or isinstance(value, dict):
        return ""
    return normalise(value)


def labeling(label: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``라벨링`` block of a K-Fashion label (raises KeyError/TypeError when absent)."""
    block = label["데이터셋 정보"]["데이터셋 상세설명"]["라벨링"]
    if not isinstance(block, Mapping):
        raise TypeError("라벨링 is not an object")
    return block


def _entries(block: Mapping[str, Any], key: str) -> Iterable[Mapping[str, Any]]:
    entries = block.get(key) or []
    if isinstance(entries, Mapping):
        entries = [entries]
    for entry in entries:
        if isinstance(entry, Mapping) and entry:
            yield entry


def part_attributes(label: Mapping[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(part, [(attribute, value text), ...]), ...]`` in the label's order, empties skipped."""
    block = labeling(label)
    out = []
    for part in block:
        if part == STYLE_KEY or part not in PARTS:
            continue
        for entry in _entries(block, part):
            attrs = [(str(k), _value(v)) for k, v in entry.items()]
            attrs = [(k, v) for k, v in attrs if v]
            if attrs:
                out.append((part, attrs))
    return out


def _style_sentences(label: Mapping[str, Any]) -> list[str]:
    sentences = []
    for entry in _entries(labeling(label), STYLE_KEY):
        for k, v in entry.items():
            text = _value(v)
            if text:
                sentences.append(f"{topic(str(k))} {text}이다.")
    return sentences


def _attribute_sentence(name: str, value: str) -> str:
    particle = name + "에는" if name in LIST_ATTRIBUTES else topic(name)
    return f"{particle} {value}이다."


def caption_from_label(
    label: Mapping[str, Any], style: str = "per-part", include_style: bool = False
) -> str:
    """The caption for one K-Fashion label; ``""`` when the label has no attributes.

    Raises KeyError/TypeError when the label lacks the ``데이터셋 정보.데이터셋 상세설명.라벨링``
    block, ValueError for an unknown style.
    """
    if style not in CAPTION_STYLES:
        raise ValueError(f"unknown caption style {style!r} (choose {', '.join(CAPTION_STYLES)})")
    sentences = _style_sentences(label) if include_style else []
    for part, attrs in part_attributes(label):
        if style == "per-part":
            for i, (name, value) in enumerate(attrs):
                sentence = _attribute_sentence(name, value)
                sentences.append(f"{part}에서 {sentence}" if i == 0 else sentence)
        elif style == "per-attribute":
            sentences.extend(f"{part}에서 {_attribute_sentence(n, v)}" for n, v in attrs)
        else:  # compact
            category = next((v for n, v in attrs if n == CATEGORY_KEY), None)
            phrases = [f"{subject(n)} {v}" for n, v in attrs if n != CATEGORY_KEY]
            if category is None:
                sentences.append(f"{topic(part)} {' '.join(phrases)}이다.")
            elif phrases:
                sentences.append(f"{topic(part)} {' '.join(phrases)}인 {category}이다.")
            else:
                sentences.append(f"{topic(part)} {category}이다.")
    return " ".join(sentences)
