"""Weights files read for use, all or nothing: the one place a ``.safetensors`` file becomes a
state_dict and a state_dict goes into a model.

- :func:`read_safetensors`: a missing, truncated or foreign file is one
  :class:`~kodalle_cli.errors.KodalleError` line naming the file (never a Rust traceback);
- :func:`read_torch_file`: a ``.pt`` / ``.ckpt`` read with ``torch.load(weights_only=True)``;
  a file that needs any other global to unpickle (``os.system``, ``builtins.open``, a class of
  some package) is refused before anything of it runs, naming the global;
- :func:`load_strict`: every key of the model present with its shape and nothing extra, or
  one line saying what differs (how many keys are missing, unexpected or of another shape,
  with an example of each). The model is only touched once everything matches
  (``strict=True``): no model is ever half loaded.

Used by :func:`kodalle_cli.runs.load_run` (DALLE checkpoints), the dalle-pytorch ``.pt``
converter, the VQGAN files (:mod:`kodalle_cli.vqgan.io`) and the reranker.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from kodalle_cli.errors import KodalleError


def read_safetensors(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of ``path`` on the CPU; one error line when it cannot be read."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise KodalleError(f"{what} file {path} is missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: the same to a user
        detail = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise KodalleError(
            f"cannot read {what} {path}: damaged or truncated ({detail}); copy it again or "
            "use another checkpoint"
        ) from None


def _unpickling_detail(exc: Exception) -> str:
    """The global (or opcode) torch's weights-only unpickler refused, out of its long text."""
    text = str(exc)
    found = re.search(r"\bGLOBAL ([\w.]+)", text)
    if found:
        return f"it pickles {found[1]}"
    if "WeightsUnpickler error:" in text:
        after = text.split("WeightsUnpickler error:", 1)[1]
        lines = [ln.strip() for ln in after.splitlines() if ln.strip()]
        if lines:
            return lines[0]
    return "it pickles an object that is not plain weights"


def read_torch_file(path: str | os.PathLike, what: str = "checkpoint",
                    allowed: Sequence = (), accepted: str = "plain weights"):
    """``torch.load(path, weights_only=True)`` on the CPU, with ``allowed`` (``[(class,
    "dotted.name")]`` inert stand-ins) also accepted. A file that needs anything else to
    unpickle is refused and nothing of it runs; a damaged one is one error line."""
    path = Path(path)
    if not path.is_file():
        raise KodalleError(f"{what} {path} is missing")
    try:
        with warnings.catch_warnings():  # "pickle protocol 4" chatter on some files
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(list(allowed)):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise KodalleError(
            f"refusing to load {path}: it needs arbitrary code to unpickle "
            f"({_unpickling_detail(exc)}); only {accepted} are accepted"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, EOF
        detail = (str(exc).splitlines() or [""])[0].split(". ")[0] or type(exc).__name__
        if len(detail) > 160:
            detail = detail[:160] + "…"
        raise KodalleError(
            f"cannot read {what} {path}: damaged, truncated or not a PyTorch file ({detail})"
        ) from None


def mismatch(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``sd`` from loading strictly into ``model`` (one phrase), or None."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    other = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}"
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if other:
        parts.append(f"{len(other)} with other shapes (e.g. {other[0]})")
    return "; ".join(parts) or None


def load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str,
                against: str = "its config") -> None:
    """Load ``sd`` into ``model`` with ``strict=True`` after checking every key and shape;
    a mismatch is ``KodalleError("{where} does not match {against}: ...")``."""
    problem = mismatch(model, sd)
    if problem is not None:
        raise KodalleError(f"{where} does not match {against}: {problem}")
    model.load_state_dict(sd, strict=True)
