"""The one way every benchmark here times things: arms interleaved, repeated, medians.

    from benchmarks.harness import Arm, compare, parser

    args = parser(__doc__).parse_args()
    compare("sampling 8 images", [Arm("dalle-pytorch", run_ref), Arm("kodalle", run_ours)],
            args, unit="s")

- The arms run interleaved (A, B, A, B, ...) after one untimed warm-up round, so a change in
  the machine's load hits every arm alike. ``--repeats`` (at least 5 unless ``--quick``).
- An arm is a callable. It returns ``None`` (the harness times the call), its own measured
  seconds (when set-up must stay out of the time), or a dict with ``"seconds"`` and other
  numbers measured in that run (memory, CPU seconds, accuracy), each reported per arm as
  median and min. :func:`command` makes an arm that runs a whole process (what users of a
  CLI experience); :func:`reporting_command` one whose process measures itself and prints
  such a dict as JSON (a fresh process per run, its imports kept out of the time).
- Printed per arm: min, median, spread (max - min) and every run; the ratio of each arm's
  median to the first arm's (the baseline). The load average before and after and the
  thread count are printed too: a number measured on a busy machine says so.
- ``--json PATH`` writes the same as JSON beside the table.

Run benchmarks alone on the machine: no test run, build or second benchmark beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kodalle_cli.atomic import write_json_atomic

MIN_REPEATS = 5


@dataclass
class Arm:
    name: str
    run: Callable[[], float | dict | None]
    per: float | None = None  # work per run (images, samples): adds a rate column


def _run_process(name: str, argv: Sequence[str], env: dict | None,
                 cwd: str | Path | None) -> str:
    done = subprocess.run([str(a) for a in argv], env={**os.environ, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: {' '.join(map(str, argv))} exited {done.returncode}:\n"
                           f"{done.stderr[-2000:]}")
    return done.stdout


def command(name: str, argv: Sequence[str], env: dict | None = None, per: float | None = None,
            cwd: str | Path | None = None, before: Callable[[], object] | None = None) -> Arm:
    """An arm that runs ``argv`` as a whole process and fails loudly if it fails. The time is
    the whole process, start-up included; ``before`` (e.g. emptying an output folder) runs
    ahead of each start, untimed."""

    def run() -> float:
        if before is not None:
            before()
        start = time.perf_counter()
        _run_process(name, argv, env, cwd)
        return time.perf_counter() - start

    return Arm(name, run, per)


def reporting_command(name: str, argv: Sequence[str], env: dict | None = None,
                      per: float | None = None, cwd: str | Path | None = None) -> Arm:
    """An arm that runs ``argv`` as a fresh process which measures itself: its last line of
    output is a JSON object with ``"seconds"`` and any other numbers (see :class:`Arm`)."""

    def run() -> dict:
        out = _run_process(name, argv, env, cwd).strip().splitlines()
        if not out:
            raise RuntimeError(f"{name}: {' '.join(map(str, argv))} printed no result")
        return json.loads(out[-1])

    return Arm(name, run, per)


def cpu_seconds() -> float:
    """CPU time of this process and its finished child processes (what a run costs the
    machine; the machine's load changes it much less than the wall clock)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def with_cpu(fn: Callable[[], object]) -> Callable[[], dict]:
    """An arm's run that reports its wall seconds and the CPU seconds it used (``cpu_s``)."""

    def run() -> dict:
        start, cpu = time.perf_counter(), cpu_seconds()
        fn()
        return {"seconds": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu}

    return run


def sync(device) -> None:
    """Wait for queued GPU work, so a timer stops when the work is done."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def parser(doc: str | None) -> argparse.ArgumentParser:
    """argparse with the flags every benchmark has: --repeats, --quick, --json."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=MIN_REPEATS,
                    help=f"timed runs per arm (>= {MIN_REPEATS} for numbers you report)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny sizes, 2 repeats, no warm-up (numbers mean nothing)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap


def machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _timed(arm: Arm) -> tuple[float, dict]:
    start = time.perf_counter()
    measured = arm.run()
    if measured is None:
        return time.perf_counter() - start, {}
    if isinstance(measured, dict):
        extra = dict(measured)
        return float(extra.pop("seconds")), extra
    return float(measured), {}


def compare(title: str, arms: Sequence[Arm], args: argparse.Namespace, unit: str = "s",
            note: str = "") -> dict:
    """Warm up, run the arms interleaved ``args.repeats`` times, print the table, return it."""
    repeats = 2 if args.quick else args.repeats
    if not args.quick and repeats < MIN_REPEATS:
        print(f"note: {repeats} repeats; reported numbers need >= {MIN_REPEATS}", file=sys.stderr)
    before = machine()
    if not args.quick:
        for arm in arms:
            arm.run()
    runs: dict[str, list[float]] = {arm.name: [] for arm in arms}
    extras: dict[str, list[dict]] = {arm.name: [] for arm in arms}
    for _ in range(repeats):
        for arm in arms:
            seconds, extra = _timed(arm)
            runs[arm.name].append(seconds)
            extras[arm.name].append(extra)
    load_after = round(os.getloadavg()[0], 2)
    result = {"title": title, "note": note, "repeats": repeats, "quick": bool(args.quick),
              "machine": {**before, "load_average_1m_after": load_after}, "arms": []}
    base = statistics.median(runs[arms[0].name])
    for arm in arms:
        xs = runs[arm.name]
        med = statistics.median(xs)
        row = {"name": arm.name, "min": min(xs), "median": med, "spread": max(xs) - min(xs),
               "runs": xs, "ratio_to_first": med / base if base else float("nan")}
        if arm.per:
            row["per_run"] = arm.per
            row["rate_median"] = arm.per / med if med else float("nan")
        keys = [k for k in extras[arm.name][0] if isinstance(extras[arm.name][0][k], int | float)]
        if keys:
            row["measured"] = {k: {"median": statistics.median(e[k] for e in extras[arm.name]),
                                   "min": min(e[k] for e in extras[arm.name]),
                                   "runs": [e[k] for e in extras[arm.name]]} for k in keys}
        result["arms"].append(row)
    print_table(result, unit)
    if args.json:
        _write_json(args.json, result)
    return result


def print_table(result: dict, unit: str = "s") -> None:
    m = result["machine"]
    print(f"\n{result['title']}")
    if result["note"]:
        print(result["note"])
    print(f"{m['cpus']} CPUs, torch threads {m['torch_threads']}"
          + (f", GPU {m['gpu']}" if "gpu" in m else "")
          + f"; load average {m['load_average_1m']} before, {m['load_average_1m_after']} after;"
          f" {result['repeats']} interleaved runs per arm"
          + (" (--quick: not a measurement)" if result["quick"] else ""))
    width = max(len(a["name"]) for a in result["arms"])
    rate = any("rate_median" in a for a in result["arms"])
    print(f"{'arm':<{width}}  {'min ' + unit:>10}  {'median ' + unit:>10}  {'spread':>8}"
          f"  {'vs first':>8}" + ("  {:>10}".format("per s") if rate else "") + "  runs")
    for a in result["arms"]:
        line = (f"{a['name']:<{width}}  {a['min']:>10.4g}  {a['median']:>10.4g}  "
                f"{a['spread']:>8.3g}  {a['ratio_to_first']:>7.2f}x")
        if rate:
            line += f"  {a.get('rate_median', float('nan')):>10.4g}"
        print(line + "  " + ", ".join(f"{x:.4g}" for x in a["runs"]))
    keys = list(dict.fromkeys(k for a in result["arms"] for k in a.get("measured", {})))
    if keys:
        print("also measured in each run, median (min):")
        print(f"{'arm':<{width}}" + "".join(f"  {k:>20}" for k in keys))
        for a in result["arms"]:
            m = a.get("measured", {})
            cells = (f"{m[k]['median']:.4g} ({m[k]['min']:.4g})" if k in m else "" for k in keys)
            print(f"{a['name']:<{width}}" + "".join(f"  {c:>20}" for c in cells))


def _write_json(path: Path, result: dict) -> None:
    """Append this comparison to the JSON file (a list: a script may compare several things)."""
    path = Path(path)
    results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    results.append(result)
    write_json_atomic(path, results)
