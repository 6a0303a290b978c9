"""Every `kodalle` command in README.md runs, as written, on a tiny synthetic K-Fashion set.

The README shows real-size runs (klue-roberta-large, 256 px, KoDALLE's model); the test
appends options that shrink them (a later option wins) and points the built-in backbone at
a tiny local copy, so each command's own words and paths are what is exercised.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kodalle_cli.data.synthetic import generate
from kodalle_cli.experiments.tiny_backbone import build_klue_like

ROOT = Path(__file__).resolve().parents[1]

TINY_VQGAN = ("--resolution 32 --ch 32 --ch-mult 1,2 --n-embed 32 --embed-dim 8 "
              "--num-res-blocks 1 --max-steps 2 --batch-size 4")
TINY_DALLE = ("--dim 32 --depth 1 --heads 2 --dim-head 16 --max-steps 2 --batch-size 4 "
              "--save-every 2 --eval-every 2 --sample-every 2 --device cpu --no-progress")


def readme_commands() -> list[str]:
    """`kodalle ...` lines of the README's bash blocks (continuation lines joined)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("kodalle "):
                commands.append(line)
    return commands


def shrink(words: list[str], tiny_backbone: Path, inception: Path) -> list[str]:
    """Options appended to a README command to make it tiny."""
    sub = words[1] if words[1] != "train" else " ".join(words[1:3])
    backbone = ["--backbone-path", str(tiny_backbone)] if "klue-roberta-large" in words else []
    extra = {
        "prepare": "--image-size 32 --workers 1 --no-progress",
        "train vqgan": TINY_VQGAN,
        "tokenize": "--text-seq-len 24 --device cpu",
        "train reranker": "--image-size 32 --max-steps 2 --batch-size 4 --embed-dim 16 "
                          "--device cpu",
        "sample": "-n 4 --seed 0 --device cpu",
        "rerank": "--device cpu",
        "score": f"--num-samples 4 --inception-weights {inception} --device cpu",
        "backbones": "",
        "attributes": "",
        "plan": "",  # reads manifests and the backbone's config; --card: no measurement
    }.get(sub)
    if extra is None:  # `train --backbone ...` (the DALLE)
        extra = TINY_DALLE
    return [*backbone, *extra.split()]


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    from kodalle_cli.score import write_random_inception_weights

    commands = readme_commands()
    assert any(c.startswith("kodalle prepare ./kfashion") for c in commands)
    assert any(c.startswith("kodalle sample ") for c in commands)
    for feature in ("kodalle attributes", "--attr ", "--init-image ", "--rank perplexity",
                    "--no-fidelity"):  # issue 17's features are shown, and run below
        assert any(feature in c for c in commands), feature
    generate(tmp_path / "kfashion", 48, size=64, seed=0, split_dirs=True)
    # red t-shirts, so that the README's `--attr 상의.색상=레드 --attr 상의.카테고리=티셔츠`
    # names values the training captions hold; one of them is the --init-image photo
    items = generate(tmp_path / "kfashion", 4, size=64, seed=0, split_dirs=True, start=48,
                     combos=[("레드", "티셔츠")])
    shutil.copy(items[0].image, tmp_path / "photo.jpg")
    tiny = build_klue_like(tmp_path / "tiny-klue", max_positions=40)
    inception = write_random_inception_weights(tmp_path / "inception.pth")
    plugin_site = tmp_path / "plugin-site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(plugin_site),
         str(ROOT / "examples" / "kodalle-backbone-minilm")], check=True, capture_output=True,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(plugin_site)}
    for command in commands:
        words = shlex.split(command)
        args = []
        for word in words[1:]:  # the shell's globbing, as a user's shell would do it
            args.extend(sorted(glob.glob(str(tmp_path / word)))
                        if "*" in word else [word])
        args = [a.replace(str(tmp_path) + "/", "") for a in args]
        args += shrink(words, tiny, inception)
        result = subprocess.run(
            [sys.executable, "-m", "kodalle_cli", *args], cwd=tmp_path, env=env,
            capture_output=True, text=True,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert (tmp_path / "runs" / "klue-roberta-large" / "latest").is_file()
    assert list((tmp_path / "samples").glob("*/grid.png"))
    assert list((tmp_path / "samples").glob("*/prompt.png"))  # --init-image
