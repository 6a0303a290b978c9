"""`kodalle demo --quick`: the whole pipeline end to end, and the report a person reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kodalle_cli.experiments.common import REPORT_STYLE
from kodalle_cli.experiments.demo import HOLDOUT, caption_category, caption_colour


def test_caption_colour_reads_the_colour_sentence():
    assert caption_colour("상의에서 색상은 레드이다. 카테고리는 티셔츠이다.") == "레드"
    assert caption_colour("하의에서 기장은 발목이다. 색상은 네이비이다.") == "네이비"
    assert caption_colour("카테고리는 티셔츠이다.") is None
    assert caption_category("상의에서 색상은 레드이다. 카테고리는 티셔츠이다.") == "티셔츠"


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "kodalle_cli", "demo", "--quick", "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--backbone multilingual-e5-small" in result.stdout  # says what a full run uses
    report = (out / "report.html").read_text(encoding="utf-8")
    assert report.count("data:image/png;base64,") >= 10  # grids, reconstructions, curves
    for heading in ("Caption faithfulness", "Per pair: seen", "Per pair: held-out",
                    "Worst captions", "Scores", "Loss curves", "VQGAN reconstructions",
                    "Generated: seen combinations", "Generated: held-out combinations",
                    "Timings", "Memorisation"):
        assert heading in report
    assert "Noto Sans KR" in report and REPORT_STYLE in report  # a font stack with Hangul
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    faith = summary["faithfulness"]
    for name in ("seen", "held-out"):
        for kind in ("all", "reranked", "perplexity", "chance"):
            for what in ("colour", "category", "both"):
                share = faith[name][kind][what]
                assert share["n"] > 0 and 0.0 <= share["share"] <= 1.0
                assert share["ci95"][0] <= share["share"] <= share["ci95"][1]
    # the checkers read the validation images themselves (almost) perfectly
    assert faith["validation images"]["all"]["colour"]["share"] == 1.0
    assert faith["validation images"]["all"]["category"]["share"] >= 0.95
    assert "VQGAN reconstructions" in faith
    assert {tuple(r["pair"]) for r in summary["per_pair"]["held-out"]} == set(HOLDOUT)
    assert set(summary["timings"]) >= {"2. prepare -> shards", "5. train DALLE", "8. score"}
    assert "clip_score" in summary["scores"]
    memo = summary["memorisation"]  # score's memorisation check, by the reranker's embedding
    assert memo["method"] == "reranker-embedding" and memo["generated_images"] > 0
    assert memo["threshold"] is not None and 0.0 <= memo["near_copy_share"] <= 1.0
    assert (out / "score" / "closest_pairs.png").is_file()
    # held-out pairs never reach anything trained: not one training caption has one
    from kodalle_cli.data.shards import iter_image_samples

    trained = {s.caption for s in iter_image_samples(out / "shards", split="train")}
    assert not {(caption_colour(c), caption_category(c)) for c in trained} & set(HOLDOUT)
    held = [json.loads(p.read_text(encoding="utf-8"))["caption"]
            for p in (out / "samples" / "held-out").glob("*/metadata.json")]
    assert len(held) == len(HOLDOUT) and not set(held) & trained
    held_out_pairs = {f"{c} {k}" for c, k in HOLDOUT}
    assert all(pair in report for pair in held_out_pairs)
    output = result.stdout + result.stderr  # kodalle's own progress only: no library bars
    for noise in ("Writing model shards", "Loading weights", "%|", "it/s]", "lpips"):
        assert noise not in output, noise
