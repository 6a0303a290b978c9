"""``metrics.csv``: the trainer's tidy log, one ``step,split,metric,value,time`` row per
value (:class:`Metrics` writes it, :func:`read_metrics` reads it back)."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

METRIC_FIELDS = ["step", "split", "metric", "value", "time"]


class Metrics:
    """metrics.csv: one row per (step, split, metric). Rows past a resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled or not values:
            return
        now = f"{time.time():.3f}"
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            for k, v in values.items():
                w.writerow([step, split, k, f"{float(v):.8g}", now])


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.csv as dicts (``step`` an int, ``value`` a float)."""
    with open(path, newline="") as f:
        return [{**r, "step": int(r["step"]), "value": float(r["value"])}
                for r in csv.DictReader(f)]
