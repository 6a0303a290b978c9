"""Attribute captions: the run's record of its K-Fashion captions, `kodalle attributes`, and
`kodalle sample --attr PART.NAME=VALUE` built like the training captions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kodalle_cli.attributes import (
    _majority_order,
    attribute_caption,
    caption_record,
    parse_attr,
    record_of,
    run_attributes,
    scan_labels,
)
from kodalle_cli.data.captions import caption_from_label
from kodalle_cli.errors import KodalleError, UsageError

TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--device", "cpu",
        "--workers", "0", "--no-progress"]


def block(**parts) -> dict:
    """A 라벨링 block: part -> {attribute: value}; absent parts are [{}] as in real labels."""
    out = {"스타일": [parts.pop("스타일", {})]}
    for part in ("아우터", "하의", "원피스", "상의"):
        out[part] = [parts.get(part, {})]
    return out


def wrap(b: dict) -> dict:
    return {"데이터셋 정보": {"데이터셋 상세설명": {"라벨링": b}}}


LABELS = [
    block(상의={"색상": "레드", "카테고리": "티셔츠", "소재": ["니트", "우븐"]},
          하의={"색상": "블루", "카테고리": "스커트"}),
    block(상의={"색상": "화이트", "카테고리": "블라우스", "소매기장": "반팔"}),
    block(상의={"카테고리": "티셔츠", "소매기장": "긴팔"}, 스타일={"스타일": "스트리트"}),
]


def test_scan_counts_values_and_keeps_the_captions_order():
    record = scan_labels(LABELS)
    assert record["samples"] == 3
    assert list(record["parts"]) == ["하의", "상의"]  # the labels' order of parts
    top = record["parts"]["상의"]
    assert top["samples"] == 3
    # 색상 < 카테고리 < 소재 and 카테고리 < 소매기장, as every label puts them
    assert list(top["attributes"]) == ["색상", "카테고리", "소재", "소매기장"]
    assert top["attributes"]["카테고리"] == {"티셔츠": 2, "블라우스": 1}  # most frequent first
    assert top["attributes"]["소재"] == {"니트": 1, "우븐": 1}  # list items count one by one
    with_style = scan_labels(LABELS, include_style=True)
    assert list(with_style["parts"])[0] == "스타일"
    assert with_style["parts"]["스타일"]["attributes"] == {"스타일": {"스트리트": 1}}


def test_majority_order_survives_disagreeing_and_partial_sequences():
    seqs = Counter({("a", "b", "c"): 5, ("b", "a"): 1, ("a", "c"): 2, ("x", "c"): 1})
    order = _majority_order(seqs)
    assert order.index("a") < order.index("b") < order.index("c")
    assert order.index("x") < order.index("c")
    assert _majority_order(Counter({("상의",): 1, ("하의",): 1}), ("하의", "상의")) == [
        "하의", "상의"]  # parts that never meet: the labels' usual order


@pytest.mark.parametrize("style", ["per-part", "per-attribute", "compact"])
def test_attribute_caption_is_the_training_captions_builder(style):
    record = {"style": style, "include_style": False, **scan_labels(LABELS)}
    got = attribute_caption(record, ["상의.카테고리=티셔츠", "하의.색상=블루",
                                     "상의.색상=레드", "상의.소재=우븐,니트"])
    label = wrap(block(하의={"색상": "블루"},
                       상의={"색상": "레드", "카테고리": "티셔츠", "소재": ["우븐", "니트"]}))
    assert got == caption_from_label(label, style)
    if style == "per-part":
        assert got == ("하의에서 색상은 블루이다. 상의에서 색상은 레드이다. 카테고리는 티셔츠이다. "
                       "소재에는 우븐, 니트이다.")
    # a list attribute given twice is one sentence; the same single attribute twice is refused
    assert attribute_caption(record, ["상의.소재=니트", "상의.소재=우븐"]) == attribute_caption(
        record, ["상의.소재=니트,우븐"])
    with pytest.raises(UsageError, match="given twice"):
        attribute_caption(record, ["상의.색상=레드", "상의.색상=화이트"])


def test_unknown_parts_names_and_values_are_one_line_with_the_closest():
    record = {"style": "per-part", **scan_labels(LABELS)}
    cases = {
        "상이.색상=레드": ("no part '상이'", "상의"),
        "상의.색깔=레드": ("no attribute '색깔'", "색상"),
        "상의.색상=레도": ("'레도' never occurs as 상의.색상", "레드"),
        "상의.색상=블루": ("(it does as 하의.색상)", "레드"),
        "상의색상=레드": ("write PART.NAME=VALUE", ""),
    }
    for text, (what, closest) in cases.items():
        with pytest.raises(UsageError) as info:
            attribute_caption(record, [text])
        message = str(info.value)
        assert what in message and closest in message and "\n" not in message, message
    assert parse_attr(" 상의 . 색상 = 레드 ") == ("상의", "색상", "레드")


# ---- a run trained on `prepare --format kfashion` shards -------------------------------------
def build_kfashion_run(root: Path, backbone: Path, *, cond_drop: float = 0.5) -> dict:
    """Synthetic K-Fashion -> prepare (16 px) -> tokenize (tiny VQGAN, 4x4 codes) -> a
    2-step DALLE run. Returns the paths."""
    from conftest import save_tiny_vqgan

    from kodalle_cli.cli import main
    from kodalle_cli.configs import PrepareConfig, TokenizeConfig
    from kodalle_cli.data.prepare import prepare
    from kodalle_cli.data.synthetic import generate
    from kodalle_cli.tokenize_shards import tokenize

    generate(root / "kfashion", 20, size=32, seed=0, split_dirs=True)
    generate(root / "kfashion", 4, size=32, seed=0, split_dirs=True, start=20,
             combos=[("레드", "티셔츠")])
    shards = root / "shards"
    prepare(PrepareConfig(source=root / "kfashion", out=shards, image_size=16,
                          val_fraction=0.25, workers=1, progress=False))
    vqgan = save_tiny_vqgan(root / "vqgan")
    tokenize(TokenizeConfig(shards=shards, vqgan=str(vqgan), backbone=str(backbone),
                            text_seq_len=32, device="cpu", progress=False))
    run = root / "run"
    main(["train", "--backbone", str(backbone), "--data", str(shards), "--out", str(run),
          *TINY, "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "1",
          "--cond-drop", str(cond_drop), "--save-every", "2", "--eval-every", "2",
          "--sample-every", "0"])
    return {"root": root, "shards": shards, "tokens": shards / "tokens", "vqgan": vqgan,
            "run": run}


@pytest.fixture(scope="module")
def kfashion_run(tmp_path_factory, tiny_klue, one_thread):
    return build_kfashion_run(tmp_path_factory.mktemp("kfashion-run"), tiny_klue)


def run_cli(args, capsys):
    from kodalle_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_train_records_the_captions_and_attributes_lists_them(kfashion_run, capsys):
    from kodalle_cli.data.kfashion import value_text
    from kodalle_cli.data.shards import iter_image_samples

    run = kfashion_run["run"]
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    record = config["captions"]
    assert record["format"] == "kfashion" and record["style"] == "per-part"
    train = list(iter_image_samples(kfashion_run["shards"], split="train"))
    assert record["samples"] == len(train)
    assert record["parts"]["상의"]["attributes"]["카테고리"]["티셔츠"] >= 3
    code, out, _ = run_cli(["attributes", "--run", str(run), "--json"], capsys)
    assert code == 0 and json.loads(out) == {"run": str(run), **record}
    assert run_attributes(run / "checkpoints" / "step-0000002")["parts"] == record["parts"]
    code, out, _ = run_cli(["attributes", "--run", str(run)], capsys)
    assert code == 0 and "티셔츠" in out and "카테고리" in out and "상의" in out
    # every training caption is rebuilt from its own label's attributes
    sample = next(s for s in train if "상의에서" in s.caption)
    attrs = [f"상의.{n}={value_text(v)}" for n, v in sample.meta["labels"]["상의"][0].items()]
    assert attribute_caption(record, attrs) == sample.caption


def test_sample_attr_builds_the_caption_and_misspelt_values_fail(kfashion_run, tmp_path,
                                                                 capsys):
    run = kfashion_run["run"]
    out = tmp_path / "samples"
    code, _, err = run_cli(["sample", "--attr", "상의.색상=레드", "--attr", "상의.카테고리=티셔츠",
                            "-n", "2", "--seed", "0", "--device", "cpu", "--checkpoint",
                            str(run), "--out", str(out)], capsys)
    assert code == 0, err
    [folder] = out.iterdir()
    meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    assert meta["caption"] == "상의에서 색상은 레드이다. 카테고리는 티셔츠이다."
    assert meta["attributes"] == ["상의.색상=레드", "상의.카테고리=티셔츠"]
    code, _, err = run_cli(["sample", "--attr", "상의.색상=레디", "--checkpoint", str(run),
                            "--device", "cpu", "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "레드" in err, err
    code, _, err = run_cli(["sample", "a caption", "--attr", "상의.색상=레드"], capsys)
    assert code == 2 and "not both" in err


def test_runs_not_from_kfashion_shards_get_a_clear_error(tmp_path, tiny_dalle_data):
    from kodalle_cli.configs import PrepareConfig
    from kodalle_cli.data.prepare import prepare
    from kodalle_cli.data.synthetic import generate

    generate(tmp_path / "raw", 4, size=16, seed=0)
    for p in (tmp_path / "raw").glob("*.json"):  # a folder of images with caption files
        p.with_suffix(".txt").write_text("상의에서 색상은 레드이다.", encoding="utf-8")
        p.unlink()
    prepare(PrepareConfig(source=tmp_path / "raw", out=tmp_path / "shards", format="folder",
                          image_size=16, workers=1, progress=False))
    record = caption_record(tmp_path / "shards" / "tokens")
    assert record["format"] == "folder"
    with pytest.raises(KodalleError, match="--format folder.*--format kfashion"):
        record_of({"captions": record}, "runs/x")
    _, tokens, _ = tiny_dalle_data  # token shards with no image shards beside them
    with pytest.raises(KodalleError, match="kfashion"):
        record_of({"data": {"tokens": str(tokens)}}, "runs/y")
    with pytest.raises(KodalleError, match="records no training captions"):
        record_of({}, "kodalle.pt")
