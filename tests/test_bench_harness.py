"""The benchmark harness: arms interleaved, medians, ratios and JSON (timing itself is not
asserted: speed is measured by the scripts, never by tests)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Arm, command, compare, parser  # noqa: E402


def test_arms_run_interleaved_after_a_warm_up_and_report_medians(tmp_path, capsys):
    order = []
    seconds = {"a": iter([9.0, 1.0, 3.0, 2.0, 5.0]), "b": iter([4.0, 2.0, 6.0, 8.0, 4.0])}

    def arm(name):
        def run():
            order.append(name)
            return next(seconds[name]) if len(order) > 2 else None  # 2 warm-up calls

        return Arm(name, run, per=10)

    args = parser(__doc__).parse_args(["--repeats", "5", "--json", str(tmp_path / "r.json")])
    result = compare("t", [arm("a"), arm("b")], args)
    assert order == ["a", "b"] * 6
    a, b = result["arms"]
    assert a["runs"] == [9.0, 1.0, 3.0, 2.0, 5.0] and a["median"] == 3.0 and a["min"] == 1.0
    assert b["median"] == 4.0 and b["ratio_to_first"] == 4.0 / 3.0 and b["spread"] == 6.0
    assert a["rate_median"] == 10 / 3.0
    assert "load average" in capsys.readouterr().out
    compare("t2", [Arm("c", lambda: 1.0)], parser(None).parse_args(["--quick", "--json",
                                                        str(tmp_path / "r.json")]))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["title"] for r in saved] == ["t", "t2"] and saved[1]["quick"] is True


def test_a_failing_command_arm_fails_the_benchmark():
    import pytest

    arm = command("false", [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited 3"):
        arm.run()


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_smoke_configuration():
    import subprocess

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--quick"], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "samples/s" in done.stdout and "sampling 16 images" in done.stdout
