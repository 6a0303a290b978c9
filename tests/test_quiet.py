"""A normal run prints kodalle's own output only: no library warnings on import."""

import os
import subprocess
import sys

# Every kodalle module, then the libraries its commands import lazily, in a fresh process with
# Python's default warning filters (what a user's run has).
SCRIPT = """
import importlib, pkgutil, kodalle_cli
for m in pkgutil.walk_packages(kodalle_cli.__path__, "kodalle_cli."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
import transformers, webdataset, torch_fidelity
from transformers import AutoModel, AutoTokenizer
"""


def test_importing_kodalle_and_its_libraries_prints_no_warnings():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_library_progress_bars_are_off_unless_debug():
    """kodalle's own bars only; `--debug` lets the libraries' bars and messages through."""
    code = ("import os, sys\nfrom kodalle_cli.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "KODALLE_DEBUG")}
    run = [sys.executable, "-c", code]
    quiet = subprocess.run([*run, "--version"], capture_output=True, text=True, env=env)
    debug = subprocess.run([*run, "--debug", "--version"], capture_output=True, text=True,
                           env=env)
    assert quiet.stdout.split()[-1] == "1" and debug.stdout.split()[-1] == "None"
