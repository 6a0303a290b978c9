"""The attribute picker of ``kodalle serve``'s page: the run's attribute record
(:func:`kodalle_cli.attributes.run_attributes`) as choices, and captions built from picked
values."""

from __future__ import annotations

import threading
from pathlib import Path

from kodalle_cli.attributes import attribute_caption, run_attributes
from kodalle_cli.errors import KodalleError
from kodalle_cli.serve.checks import BadRequest


class Attributes:
    """The run's attribute record (:func:`kodalle_cli.attributes.run_attributes`), read once,
    as the picker's choices; and captions built from picked values. For a run not trained on
    K-Fashion shards there are no choices and the page shows only the caption box."""

    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._read = False
        self.record: dict | None = None
        self.reason: str | None = None

    def _load(self) -> None:
        with self._lock:
            if self._read:
                return
            self._read = True
            if self.run_dir is None:
                self.reason = "the checkpoint is not in a run directory"
                return
            try:
                self.record = run_attributes(self.run_dir)
            except KodalleError as exc:
                self.reason = str(exc)
            except Exception as exc:  # the picker is optional: the page works without it
                self.reason = f"the run's attributes could not be read ({type(exc).__name__})"

    def choices(self) -> tuple[list[dict], str | None]:
        """``[{"key": "상의.색상", "part", "name", "values": [{"value", "count"}]}]`` in the
        training captions' order (values most frequent first), and why there are none."""
        self._load()
        if self.record is None:
            return [], self.reason
        rows = [{"key": f"{part}.{name}", "part": part, "name": name,
                 "values": [{"value": v, "count": c} for v, c in values.items()]}
                for part, info in self.record.get("parts", {}).items()
                for name, values in info.get("attributes", {}).items()]
        return rows, None if rows else "the run's training captions hold no attributes"

    def caption(self, picked: dict[str, str]) -> str:
        """The caption for ``{"part.name": value}``, built as the run's captions were."""
        self._load()
        if self.record is None:
            raise BadRequest(f"no attribute captions here: {self.reason}", 404)
        try:
            return attribute_caption(self.record, [f"{k}={v}" for k, v in picked.items()])
        except KodalleError as exc:
            raise BadRequest(str(exc).removeprefix("--attr ")) from None

