"""``metrics.csv``: the trainer's tidy log, one ``step,split,metric,value,time`` row per
value (:class:`Metrics` writes it, :func:`read_metrics` reads it back)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from kodalle_cli.atomic import replacing

METRIC_FIELDS = ["step", "split", "metric", "value", "time"]


class Metrics:
    """metrics.csv: one row per (step, split, metric). Rows past a resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        rows = []
        if resume_step is not None and path.is_file():
            rows = [raw for raw, r in _rows(path) if r["step"] <= resume_step]
        with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, METRIC_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled or not values:
            return
        now = f"{time.time():.3f}"
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            for k, v in values.items():
                w.writerow([step, split, k, f"{float(v):.8g}", now])


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.csv as dicts (``step`` an int, ``value`` a float); a row cut
    short (a process killed, or a full disk, while appending it) is left out."""
    return [r for _, r in _rows(path)]


def _rows(path: Path) -> list[tuple[dict, dict]]:
    """(the row as written, the row parsed) for each whole row."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            try:
                rows.append((raw, {**raw, "step": int(raw["step"]),
                                   "value": float(raw["value"])}))
            except (TypeError, ValueError):
                continue
    return rows
