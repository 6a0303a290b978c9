"""The one progress bar style every long command uses (rich)."""

from __future__ import annotations


def progress_bar(*middle, title: str = "{task.description}", enabled: bool = True,
                 eta: bool = True):
    """``title | bar | done/total | *middle | elapsed | ETA``; ``middle`` are extra columns
    (rich ProgressColumn objects or format strings such as ``"{task.fields[info]}"``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn(title), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(c) if isinstance(c, str) else c for c in middle]
    columns.append(TimeElapsedColumn())
    if eta:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, disable=not enabled, transient=False)


def quiet_libraries() -> None:
    """Keep other libraries' progress bars out of kodalle's output (transformers' "Loading
    weights" / "Writing model shards", huggingface_hub's downloads): kodalle shows its own.
    Cheap: imports nothing; call it before those libraries load, or at any time after.
    ``kodalle --debug`` does not call it."""
    import os
    import sys

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by both at import
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
