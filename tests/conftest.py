"""Shared fixtures: tiny backbones built once per test session (about a second each)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_klue(tmp_path_factory):
    """A KLUE-like RoBERTa directory (pad 1, [CLS] 0, position offset 2), dim 64."""
    from kodalle_cli.tiny_backbone import build_klue_like

    return build_klue_like(tmp_path_factory.mktemp("backbones") / "tiny-klue")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A GPT-2-like directory (wte + wpe), dim 48."""
    from kodalle_cli.tiny_backbone import build_gpt2_like

    return build_gpt2_like(tmp_path_factory.mktemp("backbones") / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_gptj(tmp_path_factory):
    """A GPT-J-like directory (no position table), dim 64."""
    from kodalle_cli.tiny_backbone import build_gptj_like

    return build_gptj_like(tmp_path_factory.mktemp("backbones") / "tiny-gptj")
