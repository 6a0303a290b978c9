"""K-Fashion labels (AI Hub): the one place that knows their structure, names and values.

A label is one JSON object per image::

    이미지 정보        이미지 식별자, 이미지 높이, 이미지 파일명, 이미지 너비
    데이터셋 정보
      데이터셋 상세설명
        렉트좌표       per part: [{X좌표, Y좌표, 가로, 세로}] (the garment's rectangle)
        폴리곤좌표     per part: [{X좌표1, Y좌표1, ...}]
        라벨링         스타일: [{스타일, 서브스타일}], and per part: [{attribute: value}]
      파일 생성일자, 파일 번호, 파일 이름

The parts are 아우터, 하의, 원피스 and 상의 (:data:`PARTS`, in a real label's order); an absent
part is ``[{}]``. Attributes are Korean names with Korean values (``색상: 화이트``,
``카테고리: 블라우스``); 소재, 프린트 and 디테일 hold lists (:data:`LIST_ATTRIBUTES`). Some values
come in several spellings (:data:`SPELLING`). ``이미지 파일명`` is often the photographer's
original name, not the name of the image beside the label (sources pair by stem then).

- :func:`read_label`: a label file -> dict, or :class:`LabelError` with the reason
- :func:`image_file_name`, :func:`is_label`, :func:`labeling`
- :func:`part_attributes`, :func:`style_attributes`: attributes with their values as text
- :func:`label_boxes`: the garment rectangles (for ``--crop garments``)
- :func:`make_label`: a label in this structure (the synthetic data set)

Captions built from labels are :mod:`kodalle_cli.data.captions`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

IMAGE_INFO = "이미지 정보"
DATASET_INFO = "데이터셋 정보"
DETAIL = "데이터셋 상세설명"
RECTANGLES = "렉트좌표"
POLYGONS = "폴리곤좌표"
LABELING = "라벨링"
IMAGE_FILE = "이미지 파일명"

PARTS = ("아우터", "하의", "원피스", "상의")  # in a real label's order
STYLE = "스타일"
COLOUR = "색상"
CATEGORY = "카테고리"
LIST_ATTRIBUTES = ("소재", "프린트", "디테일")

# Spelling variants seen in K-Fashion labels -> the spelling the captions use.
SPELLING = {
    "노말": "노멀",
    "롱슬리브": "긴팔",
    "숏슬리브": "반팔",
}

Box = tuple[float, float, float, float]


class LabelError(ValueError):
    """A label that cannot be used; the message is the reason (it goes to the manifest)."""


# ---- reading ---------------------------------------------------------------------------------
def read_label(path: str | os.PathLike) -> dict:
    """A label file as a dict (UTF-8, with or without BOM). Raises :class:`LabelError`."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except UnicodeDecodeError:
        raise LabelError("label is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise LabelError(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except OSError as exc:
        raise LabelError(f"unreadable label: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise LabelError("invalid label: not a JSON object")
    return data


def is_label(data: Any) -> bool:
    """Whether a parsed JSON file looks like a K-Fashion label."""
    return isinstance(data, dict) and (DATASET_INFO in data or IMAGE_INFO in data)


def image_file_name(label: Mapping[str, Any]) -> str | None:
    """``이미지 정보.이미지 파일명``, or None when absent or empty."""
    info = label.get(IMAGE_INFO)
    name = info.get(IMAGE_FILE) if isinstance(info, dict) else None
    return str(name) if name else None


def labeling(label: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``라벨링`` block of a label (raises KeyError/TypeError when absent)."""
    block = label[DATASET_INFO][DETAIL][LABELING]
    if not isinstance(block, Mapping):
        raise TypeError("라벨링 is not an object")
    return block


def wrap_labeling(block: Mapping[str, Any]) -> dict:
    """A ``라벨링`` block (what image shards keep as ``labels``) as the label that holds it
    (what the readers here and :mod:`~kodalle_cli.data.captions` take)."""
    return {DATASET_INFO: {DETAIL: {LABELING: block}}}


def normalise(value: str) -> str:
    """A value with its whitespace collapsed and its spelling made the usual one."""
    value = " ".join(str(value).split())
    return SPELLING.get(value, value)


def value_text(value: Any) -> str:
    """An attribute value as text: lists joined with ", ", spelling normalised, empties dropped."""
    if isinstance(value, list | tuple):
        return ", ".join(v for v in (normalise(x) for x in value if x is not None) if v)
    if value is None or isinstance(value, dict):
        return ""
    return normalise(value)


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
        if part == STYLE or part not in PARTS:
            continue
        for entry in _entries(block, part):
            attrs = [(str(k), value_text(v)) for k, v in entry.items()]
            attrs = [(k, v) for k, v in attrs if v]
            if attrs:
                out.append((part, attrs))
    return out


def style_attributes(label: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``[(attribute, value text), ...]`` of the ``스타일`` entries (스타일, 서브스타일)."""
    return [(str(k), text) for entry in _entries(labeling(label), STYLE)
            for k, v in entry.items() if (text := value_text(v))]


def label_boxes(label: Mapping[str, Any]) -> tuple[list[Box], tuple[int, int] | None]:
    """The label's garment rectangles (렉트좌표) as (left, top, right, bottom), and the image
    size the label declares (이미지 너비/높이) when present. Raises :class:`LabelError` when
    a rectangle is degenerate, KeyError/TypeError when there is no 렉트좌표 block."""
    rects = label[DATASET_INFO][DETAIL].get(RECTANGLES) or {}
    boxes = []
    for part, entries in rects.items() if isinstance(rects, dict) else ():
        for r in entries if isinstance(entries, list) else [entries]:
            if not isinstance(r, dict) or not r:
                continue
            try:
                x, y, w, h = (float(r[k]) for k in ("X좌표", "Y좌표", "가로", "세로"))
            except (KeyError, TypeError, ValueError):
                raise LabelError(f"degenerate crop box: bad {part} rectangle {r}") from None
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                raise LabelError(f"degenerate crop box: {part} rectangle {w}x{h}")
            boxes.append((x, y, x + w, y + h))
    info = label.get(IMAGE_INFO) or {}
    try:
        space = (int(info["이미지 너비"]), int(info["이미지 높이"]))
    except (KeyError, TypeError, ValueError):
        space = None
    return boxes, space


# ---- writing ---------------------------------------------------------------------------------
def make_label(
    file_name: str,
    ident: int,
    size: tuple[int, int],
    parts: Mapping[str, tuple[dict, dict, dict]],
    style: dict | None = None,
    created: str = "2026-01-01 00:00:00",
) -> dict:
    """A label in AI Hub's structure and key order. ``parts`` maps a part to its
    (attributes, rectangle, polygon); the other parts are ``[{}]`` as in real labels.
    ``size`` is (width, height)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)} (choose {', '.join(PARTS)})")

    def per_part(i: int) -> dict:
        return {p: [parts[p][i] if p in parts else {}] for p in PARTS}

    width, height = size
    return {
        IMAGE_INFO: {"이미지 식별자": ident, "이미지 높이": height, IMAGE_FILE: file_name,
                     "이미지 너비": width},
        DATASET_INFO: {
            "파일 생성일자": created,
            DETAIL: {
                RECTANGLES: per_part(1),
                POLYGONS: per_part(2),
                LABELING: {STYLE: [style or {}], **per_part(0)},
            },
            "파일 번호": ident,
            "파일 이름": file_name,
        },
    }
