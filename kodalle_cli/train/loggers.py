"""Where a training run's numbers go: ``--log csv|tensorboard|wandb`` (repeatable, or
comma-separated). ``metrics.csv`` (:mod:`.metrics`) is always written; beside it:

- ``tensorboard``: event files in ``OUT/tensorboard/`` through ``torch.utils.tensorboard``
  (``tensorboard --logdir OUT/tensorboard``). A resumed run purges the events after its
  checkpoint's step, as metrics.csv drops those rows.
- ``wandb``: a Weights & Biases run with its files in ``OUT/wandb/``. Its id is kept in
  ``OUT/wandb_id``, so a resumed run continues the same W&B run. ``WANDB_MODE=offline``
  needs no network or account (``wandb sync OUT/wandb/offline-run-*`` uploads later);
  ``WANDB_PROJECT`` names the project (default ``kodalle``).

Both are optional extras (``pip install 'kodalle[tensorboard]'``, ``'kodalle[wandb]'``); a
missing one stops the run before it starts, in one line naming the extra.

:class:`Loggers` takes what the trainer logs and sends it to each: per step a ``split``
(``train``: the loss and its parts, ``lr``, ``grad_norm``, ``samples_per_s``,
``tokens_per_s``; ``val``: the task's validation metrics; ``data``: at step 0) and its
values, shown as ``split/metric`` (``train/loss``, ``val/loss``); and the preview grids as
images (``samples/preview``). Only rank 0 logs.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from kodalle_cli.atomic import write_text_atomic
from kodalle_cli.errors import KodalleError, UsageError
from kodalle_cli.runs import METRICS
from kodalle_cli.train.metrics import Metrics

LOG_CHOICES = ("csv", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID = "wandb_id"
STEP_KEY = "trainer/step"  # wandb: the x axis of every chart (a resume may repeat steps)


def parse_logs(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """``--log`` values (repeated, or comma-separated) -> the dashboards, ``csv`` first,
    each once."""
    if isinstance(values, str):
        values = [values]
    names = ["csv"]
    for value in values or ():
        for name in str(value).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in LOG_CHOICES:
                raise UsageError(f"--log {name}: choose csv, tensorboard or wandb "
                                 "(repeat --log for several)")
            if name not in names:
                names.append(name)
    return tuple(names)


def require(names: Iterable[str]) -> None:
    """A one-line error for a dashboard whose package is not installed."""
    for name in names:
        if name != "csv" and importlib.util.find_spec(name) is None:
            raise KodalleError(f"--log {name} needs the {name} package: "
                               f"pip install 'kodalle[{name}]'")


class Loggers:
    """metrics.csv and the dashboards ``names`` (see :func:`parse_logs`). Disabled (on
    ranks other than 0) it writes nothing. ``resume_step``: the checkpoint's step, or None
    for a new run."""

    def __init__(self, out: Path, names: Iterable[str], enabled: bool,
                 resume_step: int | None, config: dict | None = None):
        names = parse_logs(list(names))
        self.csv = Metrics(Path(out) / METRICS, enabled, resume_step)
        self.sinks: list = []
        if not enabled:
            return
        require(names)
        try:
            if "tensorboard" in names:
                self.sinks.append(_TensorBoard(Path(out), resume_step))
            if "wandb" in names:
                self.sinks.append(_Wandb(Path(out), resume_step, config or {}))
        except BaseException:
            self.close(failed=True)
            raise

    def write(self, step: int, split: str, values: dict) -> None:
        self.csv.write(step, split, values)
        if values:
            scalars = {f"{split}/{k}": float(v) for k, v in values.items()}
            for sink in self.sinks:
                sink.scalars(step, scalars)

    def image(self, step: int, tag: str, path: Path | None) -> None:
        """The PNG at ``path`` (e.g. a preview grid) as image ``tag`` of ``step``."""
        if path is None or not self.sinks:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        for sink in self.sinks:
            sink.image(step, tag, pixels)

    def close(self, failed: bool = False) -> None:
        """Flush and close each dashboard; ``failed``: the run stopped on an error or an
        interrupt (W&B records exit status 1)."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed)


class _TensorBoard:
    def __init__(self, out: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events from steps the resumed run will log again are dropped
        self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=(
            resume_step + 1 if resume_step is not None else None))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def image(self, step: int, tag: str, pixels) -> None:
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, resume_step: int | None, config: dict):
        import wandb

        id_file = out / WANDB_ID
        if resume_step is not None and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = secrets.token_hex(4)  # wandb's ids: 8 lowercase letters and digits
            write_text_atomic(id_file, run_id + "\n")
        (out / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "kodalle", name=out.name,
                id=run_id, resume="allow", dir=str(out), config=config,
                settings=wandb.Settings(console="off", silent=True))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise KodalleError(f"--log wandb: cannot start the W&B run ({first}); "
                               "WANDB_MODE=offline logs without a network") from None
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, STEP_KEY: step})

    def image(self, step: int, tag: str, pixels) -> None:
        self.run.log({tag: self.wandb.Image(pixels), STEP_KEY: step})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
