"""`kodalle demo --experiment unseen-words`: the word lists, the captions, the token check with
the real MiniLM tokenizer, the random-table backbone, and the quick run end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from kodalle_cli.experiments import common, demo
from kodalle_cli.experiments import faithfulness as fa
from kodalle_cli.experiments import unseen_words as uw

pytestmark = pytest.mark.usefixtures("one_thread")
HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")


def test_word_lists_cover_the_demo_concepts_and_never_reuse_a_training_word():
    assert set(uw.TRAIN_COLOUR_WORDS) == set(demo.COLOURS) == set(uw.UNSEEN_COLOUR_WORDS)
    assert set(uw.TRAIN_CATEGORY_WORDS) == set(demo.CATEGORIES) == set(uw.UNSEEN_CATEGORY_WORDS)
    training_words = {w for c in uw.all_training_captions() for w in re.findall(r"[a-z]+", c)}
    new_words = [w for ws in (*uw.UNSEEN_COLOUR_WORDS.values(), *uw.UNSEEN_CATEGORY_WORDS.values())
                 for w in ws] + uw.template_words(uw.UNSEEN_TEMPLATES)
    assert len(new_words) == len(set(new_words))  # a new word names one concept only
    for word in new_words:
        assert not set(re.findall(r"[a-z]+", word)) & training_words, word
    for template in uw.UNSEEN_TEMPLATES:  # no punctuation of the training templates either
        assert not set(template) & set(".,")
    assert uw.template_words(["a {colour} {category}.", "this {category} is {colour}."]) == [
        "a", ".", "this", "is"]


def test_caption_sets_seen_unseen_and_mixed():
    sets = uw.caption_sets(per_combo=2, seed=3)
    assert set(sets) == set(uw.CAPTION_SETS)
    training = set(uw.all_training_captions())
    for captions in sets.values():
        assert len(captions) == 36 * 2
        assert {(c.colour, c.category) for c in captions} == set(uw.combos())
        for c in captions:  # every caption names its garment, with whichever words it uses
            assert uw.caption_concepts(c.caption) == (c.colour, c.category), c.caption
    assert all(c.caption in training and not (c.new_colour or c.new_category)
               for c in sets["seen"])
    for c in sets["unseen"]:
        assert c.caption not in training and c.new_colour and c.new_category and c.new_template
        assert uw.TRAIN_COLOUR_WORDS[c.colour] not in c.caption.split()
        assert uw.TRAIN_CATEGORY_WORDS[c.category] not in c.caption.split()
    mixed = sets["mixed"]
    assert all(c.new_colour != c.new_category and not c.new_template for c in mixed)
    assert sum(c.new_colour for c in mixed) == sum(c.new_category for c in mixed) == 36
    for c in mixed:
        words = c.caption.rstrip(".").split()
        if c.new_colour:
            assert uw.TRAIN_CATEGORY_WORDS[c.category] in words
            assert set(words) & set(uw.UNSEEN_COLOUR_WORDS[c.colour])
        else:
            assert uw.TRAIN_COLOUR_WORDS[c.colour] in words
            assert set(words) & set(uw.UNSEEN_CATEGORY_WORDS[c.category])
    assert uw.caption_sets(per_combo=2, seed=3) == sets  # seeded
    assert uw.caption_sets(per_combo=2, seed=4) != sets


def test_caption_concepts_and_training_captions():
    assert uw.caption_concepts("a photo of a red t-shirt.") == ("레드", "티셔츠")
    assert uw.caption_concepts("tee colored crimson") == ("레드", "티셔츠")
    assert uw.caption_concepts("my new overcoat looks navy") == ("블루", "코트")
    assert uw.caption_concepts("a photo of something") == (None, None)
    import random

    caption = uw.training_caption("그린", "드레스", random.Random(0))
    assert caption in uw.all_training_captions() and "green" in caption and "dress" in caption
    assert len(uw.all_training_captions()) == len(uw.TRAIN_TEMPLATES) * 36


def test_new_words_share_no_wordpiece_with_the_training_captions():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(uw.minilm_dir())
    check = uw.token_check(tokenizer, uw.all_training_captions())
    assert check["disjoint"] and check["overlap"] == []
    assert {"red", "shirt", "photo", "."} <= set(check["training_tokens"])
    assert "[CLS]" not in check["training_tokens"]
    entries = {e["text"]: e for e in check["unseen_colour_words"] + check["unseen_category_words"]}
    assert entries["crimson"]["pieces"] == ["crimson"]
    assert len(entries["overcoat"]["pieces"]) == 2  # over ##coat: not the token "coat"
    # the check does find an overlap when there is one
    leaky = uw.token_check(tokenizer, [*uw.all_training_captions(), "a crimson tee."])
    assert not leaky["disjoint"] and {"crimson", "tee"} <= set(leaky["overlap"])
    # and every unseen-word caption is made of new WordPieces only
    seen = set(check["training_tokens"])
    for c in uw.caption_sets(per_combo=2)["unseen"]:
        assert not set(tokenizer.tokenize(c.caption)) & seen, c.caption
    # no caption of any set is cut by text_seq_len ([CLS] and [SEP] included)
    colours = list(uw.TRAIN_COLOUR_WORDS.values()) + [
        w for ws in uw.UNSEEN_COLOUR_WORDS.values() for w in ws]
    categories = list(uw.TRAIN_CATEGORY_WORDS.values()) + [
        w for ws in uw.UNSEEN_CATEGORY_WORDS.values() for w in ws]
    every = [uw.fill(t, c, k) for t in uw.TRAIN_TEMPLATES + uw.UNSEEN_TEMPLATES
             for c in colours for k in categories]
    longest = max(len(ids) for ids in tokenizer(every)["input_ids"])
    assert longest <= uw.UnseenConfig().seq_len


def test_random_tables_backbone_changes_only_the_two_tables(tmp_path):
    from safetensors.torch import load_file

    from kodalle_cli.backbone import get_backbone

    source = uw.minilm_dir()
    out = uw.random_tables_backbone(source, tmp_path / "random", seed=1)
    pretrained, rnd = get_backbone(str(source)), get_backbone(str(out))
    a, b = pretrained.load_embeddings(), rnd.load_embeddings()
    assert a.token.shape == b.token.shape and a.position.shape == b.position.shape
    for x, y in ((a.token, b.token), (a.position, b.position)):
        assert abs(float(x.std()) - float(y.std())) < 0.05 * float(x.std())
        assert abs(float((x * y).sum() / (x.norm() * y.norm()))) < 0.05  # unrelated
    assert (a.pad_id, a.bos_id, a.eos_id) == (b.pad_id, b.bos_id, b.eos_id)
    from kodalle_cli.tokenize_shards import tokenizer_identity

    assert tokenizer_identity(pretrained) == tokenizer_identity(rnd)  # same token shards
    src, new = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {k for k in src if not (src[k] == new[k]).all()}
    assert changed == {"embeddings.word_embeddings.weight",
                       "embeddings.position_embeddings.weight"}
    again = uw.random_tables_backbone(source, tmp_path / "again", seed=1)
    assert (load_file(str(again / "model.safetensors"))["embeddings.word_embeddings.weight"]
            == new["embeddings.word_embeddings.weight"]).all()


def test_newcombe_difference_and_comparisons():
    same = uw.newcombe(fa.Share(30, 100), fa.Share(30, 100))
    assert same["diff"] == 0 and same["ci95"][0] < 0 < same["ci95"][1]
    big = uw.newcombe(fa.Share(80, 100), fa.Share(20, 100))
    assert abs(big["diff"] - 0.6) < 1e-9 and 0.45 < big["ci95"][0] < 0.6 < big["ci95"][1] < 0.75

    def judged(hits, n):
        return [fa.Judged("레드", "코트", "레드" if i < hits else "블루", "코트") for i in range(n)]

    def arm(hits):
        per_seed = {s: {"unseen": judged(hits, 60)} for s in (0, 1)}
        return uw.summarise_arm(per_seed, seed=0)

    arms = {"minilm-trained": arm(50), "random-trained": arm(10),
            "minilm-frozen": arm(12), "random-frozen": arm(10)}
    rows = {(r["pretrained"], r["what"]): r for r in uw.compare(arms)}
    assert rows[("minilm-trained", "colour")]["effect"] == "better"
    assert rows[("minilm-frozen", "colour")]["effect"] is None
    assert rows[("minilm-trained", "category")]["effect"] is None  # both always right


@pytest.mark.slow
def test_quick_experiment_runs_end_to_end(tmp_path):
    out = tmp_path / "unseen"
    result = subprocess.run(
        [sys.executable, "-m", "kodalle_cli", "demo", "--experiment", "unseen-words", "--quick",
         "--out", str(out)],
        capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["experiment"] == "unseen-words"
    assert summary["token_check"]["disjoint"] and summary["token_check"]["overlap"] == []
    assert set(summary["arms"]) == {a.name for a in uw.ARMS}
    assert {(a["tables"], a["frozen"], a["text_encoder"]) for a in summary["arms"].values()} == {
        ("minilm", False, "tables"), ("minilm", True, "tables"), ("random", False, "tables"),
        ("random", True, "tables"), ("minilm", True, "contextual")}
    for arm in summary["arms"].values():
        assert set(arm["sets"]) >= {"seen", "unseen", "mixed", "mixed, new colour word",
                                    "mixed, new category word"}
        unseen = arm["sets"]["unseen"]  # per class: recall, asked, drawn; kappa
        assert set(unseen["classes"]["colour"]) == {"red", "blue", "black", "yellow", "green",
                                                    "pink", "(none)"}
        assert sum(v["asked"] for v in unseen["classes"]["colour"].values()) == unseen[
            "all"]["colour"]["n"]
        assert sum(v["drawn"] for v in unseen["classes"]["category"].values()) == unseen[
            "all"]["category"]["n"]
        assert -1.0 <= unseen["kappa"]["colour"] <= 1.0
        for subset in arm["sets"].values():
            for kind in ("all", "chance"):
                for what in ("colour", "category", "both"):
                    share = subset[kind][what]
                    assert share["n"] > 0 and 0.0 <= share["share"] <= 1.0
                    assert share["ci95"][0] <= share["share"] <= share["ci95"][1]
            assert set(subset["per_seed"]) == {"0"}
    assert summary["verdict"] and any("no measurable effect" in line or "measurable effect"
                                      in line for line in summary["verdict"])
    assert {(c["pretrained"], c["random"]) for c in summary["comparisons"]} == set(
        uw.COMPARISONS)
    assert summary["vqgan_ceiling"]["validation images"]["all"]["colour"]["share"] == 1.0
    # the training captions in the shards use the training words only
    from kodalle_cli.data.shards import iter_image_samples

    trained = {s.caption for s in iter_image_samples(out / "shards", split="train", decode=False)}
    assert trained <= set(uw.all_training_captions())
    assert not trained & {c["caption"] for c in summary["captions"]["unseen"]}
    assert all("kappa_diff" in c and len(c["kappa_ci95"]) == 2 for c in summary["comparisons"])
    for arm in uw.ARMS:  # the same data, steps and seed for every arm
        config = json.loads((out / "runs" / f"{arm.name}-s0" / "config.json").read_text(
            encoding="utf-8"))
        assert config["train"]["freeze_text_emb"] is arm.frozen
        assert config["model"]["text_encoder"] == arm.text_encoder
        assert config["train"]["max_steps"] == uw.QUICK.dalle_steps
        assert config["data"]["tokens"] == str(out / "shards" / "tokens")
        assert (arm.tables == "random") == ("random-tables" in config["backbone"]["source"])
        judged = json.loads((out / "judged" / f"{arm.name}-s0.json").read_text(encoding="utf-8"))
        assert len(judged) == 3 * 36 * uw.QUICK.captions_per_combo * uw.QUICK.images_per_caption
    report = (out / "report.html").read_text(encoding="utf-8")
    for heading in ("Verdict", "Caption faithfulness", "Each arm minus its control",
                    "Per class: recall and how often each class is drawn",
                    "Same new-word captions under each arm", "The words", "Token check",
                    "What the image tokenizer allows", "Timings"):
        assert heading in report
    assert report.count("data:image/png;base64,") >= len(uw.ARMS) * 6
    assert not HANGUL.search(report)  # any font works
    assert common.REPORT_STYLE in report  # the demo's stylesheet
    assert "crimson" in report or "scarlet" in report or "ruby" in report


def test_unknown_experiment_is_a_usage_error(capsys):
    from kodalle_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--experiment", "no-such-thing", "--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2
    assert "unseen-words" in capsys.readouterr().err
