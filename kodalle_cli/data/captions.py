"""Korean captions built from K-Fashion label JSONs (the captions KoDALLE trained on), and
read back (:func:`caption_attribute`). What a label holds is :mod:`kodalle_cli.data.kfashion`.

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

import re
from collections.abc import Mapping
from typing import Any

from kodalle_cli.data.kfashion import CATEGORY, LIST_ATTRIBUTES, part_attributes, style_attributes

CAPTION_STYLES = ("per-part", "per-attribute", "compact")

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


def _style_sentences(label: Mapping[str, Any]) -> list[str]:
    return [f"{topic(name)} {text}이다." for name, text in style_attributes(label)]


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
            category = next((v for n, v in attrs if n == CATEGORY), None)
            phrases = [f"{subject(n)} {v}" for n, v in attrs if n != CATEGORY]
            if category is None:
                sentences.append(f"{topic(part)} {' '.join(phrases)}이다.")
            elif phrases:
                sentences.append(f"{topic(part)} {' '.join(phrases)}인 {category}이다.")
            else:
                sentences.append(f"{topic(part)} {category}이다.")
    return " ".join(sentences)


def style_captions(label: Mapping[str, Any], include_style: bool = False) -> list[str]:
    """The label's caption in every style, in :data:`CAPTION_STYLES` order, whitespace
    collapsed as ``prepare`` stores it (what ``train --caption-style mixed`` draws from)."""
    return [" ".join(caption_from_label(label, style, include_style).split())
            for style in CAPTION_STYLES]


def caption_attribute(caption: str, name: str) -> str | None:
    """The value a per-part or per-attribute caption gives attribute ``name`` (its first
    ``{name}은/는 {value}이다`` sentence), or None: ``caption_attribute(c, "색상")``."""
    match = re.search(re.escape(topic(name)) + r" (\S+?)이다", caption)
    return match.group(1) if match else None
