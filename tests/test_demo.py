"""`kodalle demo --quick`: the whole pipeline end to end, and the report a person reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kodalle_cli.demo import HOLDOUT, caption_colour


def test_caption_colour_reads_the_colour_sentence():
    assert caption_colour("상의에서 색상은 레드이다. 카테고리는 티셔츠이다.") == "레드"
    assert caption_colour("하의에서 기장은 발목이다. 색상은 네이비이다.") == "네이비"
    assert caption_colour("카테고리는 티셔츠이다.") is None


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "kodalle_cli", "demo", "--quick", "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--backbone klue-roberta-large" in result.stdout  # says what a real run uses
    report = (out / "report.html").read_text(encoding="utf-8")
    assert report.count("data:image/png;base64,") >= 10  # grids, reconstructions, curves
    for heading in ("Caption faithfulness", "Scores", "Loss curves", "VQGAN reconstructions",
                    "Generated: seen combinations", "Generated: held-out combinations",
                    "Timings"):
        assert heading in report
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for name in ("seen", "held-out"):
        f = summary["faithfulness"][name]
        assert f["images"] > 0 and 0.0 <= f["match"] <= 1.0 and f["chance"] == pytest.approx(1 / 6)
    assert set(summary["timings"]) >= {"2. prepare -> shards", "5. train DALLE", "8. score"}
    assert "clip_score" in summary["scores"]
    held_out_pairs = {f"{c} {k}" for c, k in HOLDOUT}
    assert all(pair in report for pair in held_out_pairs)
