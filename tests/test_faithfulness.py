"""The caption-faithfulness checkers the demo and the unseen-words experiment report with."""

from __future__ import annotations

import random

import pytest

from kodalle_cli.data import synthetic
from kodalle_cli.experiments import faithfulness as fa
from kodalle_cli.experiments.demo import CATEGORIES, COLOURS, PALETTE

PAIRS = [(c, k) for c in COLOURS for k in CATEGORIES]


def _garments(n: int, size: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        colour, category = PAIRS[i % len(PAIRS)]
        g = synthetic.random_garment(rng, colour, category)
        yield synthetic.render(g, 64)[0].resize((size, size)), colour, category


def test_ground_truth_garments_score_every_time():
    judged = [fa.judge(im, c, k, PALETTE) for im, c, k in _garments(144, 64)]
    shares = fa.summarise(judged)
    assert shares["colour"].hits == shares["category"].hits == shares["both"].hits == 144


def test_ground_truth_garments_at_the_demos_32_px():
    # at 32 px a long-sleeved t-shirt's sleeves can touch its body: ~0.5% are read as
    # another category (the demo reports this ceiling on its validation images)
    shares = fa.summarise(fa.judge(im, c, k, PALETTE) for im, c, k in _garments(144, 32))
    assert shares["colour"].hits == 144
    assert shares["category"].hits >= 142


def test_the_same_images_against_shuffled_captions_score_near_chance():
    judged = [fa.judge(im, c, k, PALETTE) for im, c, k in _garments(216, 32, seed=1)]
    chance = fa.summarise(fa.shuffled(judged, seed=0))
    # 6 colours, 6 categories, balanced: 1/6 and 1/36 expected
    assert abs(chance["colour"].value - 1 / 6) < 0.08
    assert abs(chance["category"].value - 1 / 6) < 0.08
    assert chance["both"].value < 0.08
    assert fa.shuffled(judged, seed=0) == fa.shuffled(judged, seed=0)  # seeded


def test_a_garment_of_another_colour_or_shape_is_caught():
    image = synthetic.render(synthetic.Garment("레드", "스커트", length="미디"), 64)[0]
    j = fa.judge(image.resize((32, 32)), "블루", "스커트", PALETTE)
    assert (j.colour, j.colour_ok, j.category_ok, j.both_ok) == ("레드", False, True, False)
    j = fa.judge(image, "레드", "코트", PALETTE)
    assert (j.colour_ok, j.category_ok) == (True, False)


def test_wilson_interval_matches_known_values():
    lo, hi = fa.wilson(45, 50)  # textbook value: 0.7864 .. 0.9565
    assert lo == pytest.approx(0.7864, abs=1e-3) and hi == pytest.approx(0.9565, abs=1e-3)
    assert fa.wilson(0, 10)[0] == 0.0 and fa.wilson(10, 10)[1] == pytest.approx(1.0)
    assert str(fa.Share(9, 10)).startswith("90% [")
    assert fa.Share(3, 4).to_dict()["share"] == 0.75
