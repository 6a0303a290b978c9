"""Install the reference packages kodalle is tested against (test-time oracles only).

dalle-pytorch 1.6.6 and taming-transformers-rom1504 0.0.6 cannot be installed with their
declared dependencies on current Python stacks (dalle-pytorch requires youtokentome, which
does not build on Python 3.11, and the DALL-E package), so they go in with
``--no-deps``; what they import is in kodalle's ``test`` extra. taming's ``taming/main.py``
imports torchvision internals and a Lightning helper that no longer exist; its models only
need ``instantiate_from_config`` from it, so it is replaced by that one function.
Idempotent: a second run finds everything in place and does nothing.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import subprocess
import sys
from pathlib import Path

PACKAGES = {"dalle-pytorch": "1.6.6", "taming-transformers-rom1504": "0.0.6"}

TAMING_MAIN = '''"""Stand-in for taming/main.py, written by kodalle's scripts/install_oracles.py."""
import importlib


def get_obj_from_str(string, reload=False):
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config):
    if "target" not in config:
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))
'''


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def main() -> None:
    missing = [f"{n}=={v}" for n, v in PACKAGES.items() if installed(n) != v]
    if missing:
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "--no-deps", *missing]
        )
    spec = importlib.util.find_spec("taming")
    main_py = Path(next(iter(spec.submodule_search_locations))) / "main.py"
    if main_py.read_text(encoding="utf-8") != TAMING_MAIN:
        main_py.write_text(TAMING_MAIN, encoding="utf-8")
    print("oracles ready: " + ", ".join(f"{n} {installed(n)}" for n in PACKAGES))


if __name__ == "__main__":
    main()
