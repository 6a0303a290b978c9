"""kodalle's cache folder: ``$KODALLE_CACHE`` or ``~/.cache/kodalle``, one subfolder per kind
(``vqgan`` presets, ``backbones`` built from PyPI packages)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    root = os.environ.get("KODALLE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "kodalle"
    return base / kind
