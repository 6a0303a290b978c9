"""Checkpoints of the shared trainer: writing and reading them, and the RNG states that make
a resume exact.

A checkpoint (``OUT/checkpoints/step-N``, named by :mod:`kodalle_cli.runs`) holds::

    model.safetensors     the weights (metadata: the step)
    optimizer.pt          the optimizer's state_dict
    trainer_state.json    the step (which fixes the LR schedule and the data position), the
                          non-finite steps so far, max_steps, samples_per_step, world_size
    rng.pt                {"ranks": every rank's RNG states (torch, CUDA, numpy, python),
                           "scaler": the fp16 GradScaler's state_dict, or None without fp16}
    ...                   the task's own files (Task.save_extra / load_extra)

Exact resume: with all of it restored, a run killed and resumed on the CPU reaches bitwise
the weights of an uninterrupted run. A checkpoint is written to ``checkpoints/.tmp-step-N``
and renamed when complete; ``latest`` is replaced atomically after it, so a kill at any
moment leaves the previous checkpoint usable.

Test hooks (environment, see :func:`kill_hook`): ``KODALLE_TEST_KILL_AT_STEP=N`` SIGKILLs
the process after step N (before its checkpoint); ``KODALLE_TEST_KILL_IN_SAVE=N`` SIGKILLs
it half-way through writing the checkpoint of step N.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from kodalle_cli.atomic import write_text_atomic
from kodalle_cli.runs import CKPT_DIR, LATEST, checkpoint_name
from kodalle_cli.train.dist import Dist, unwrap

if TYPE_CHECKING:
    from kodalle_cli.train.trainer import Task

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "trainer_state.json"
RNG = "rng.pt"


# ---- RNG states ------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every RNG state as plain Python (bytes, ints, lists): picklable across ranks."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "cuda": [t.numpy().tobytes() for t in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": _listify(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    def as_tensor(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.uint8)

    torch.set_rng_state(as_tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([as_tensor(b) for b in state["cuda"]])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, tuple | list) else x


def kill_hook(name: str, step: int) -> None:
    """SIGKILL this process if the environment variable ``name`` is ``step`` (tests)."""
    if os.environ.get(name) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


# ---- writing ---------------------------------------------------------------------------------
def remove_partial_saves(out: Path) -> None:
    """Delete what saves killed half-way left (``checkpoints/.tmp-*``)."""
    for stale in (out / CKPT_DIR).glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(out: Path, task: Task, optimizer, scaler: torch.amp.GradScaler,
                    state: dict, dist: Dist, keep_last: int) -> Path | None:
    """Gather every rank's RNG states; on rank 0 write checkpoints/step-N (``state["step"]``)
    atomically, point ``latest`` at it and keep the newest ``keep_last``. All ranks wait for
    it; returns the checkpoint on rank 0, None on the others."""
    rngs = dist.gather(rng_state())
    path = _write(out, task, optimizer, scaler, state, rngs, keep_last) if dist.main else None
    dist.barrier()
    return path


def _write(out: Path, task: Task, optimizer, scaler: torch.amp.GradScaler, state: dict,
           rngs: list, keep_last: int) -> Path:
    from safetensors.torch import save_file

    ckpts = out / CKPT_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / checkpoint_name(state["step"])
    tmp = ckpts / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model = unwrap(task.model)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / WEIGHTS), metadata={"step": str(state["step"])})
    kill_hook("KODALLE_TEST_KILL_IN_SAVE", state["step"])
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    # "scaler" is None unless fp16 loss scaling is on (a disabled scaler has no state)
    scaler_state = scaler.state_dict() if scaler.is_enabled() else None
    torch.save({"ranks": rngs, "scaler": scaler_state}, tmp / RNG)
    task.save_extra(tmp)
    (tmp / STATE).write_text(json.dumps(state, indent=2))
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(out / LATEST, f"{CKPT_DIR}/{final.name}")
    if keep_last > 0:
        done = sorted(p for p in ckpts.glob("step-*") if p.is_dir())
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---- reading ---------------------------------------------------------------------------------
def load_weights(model: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(ckpt / WEIGHTS))
    model.load_state_dict(sd)


def read_state(ckpt: Path) -> dict:
    """trainer_state.json: ``step``, ``bad_steps_total`` and the run's shape."""
    return json.loads((ckpt / STATE).read_text())


def load_optimizer(optimizer, ckpt: Path, device: torch.device) -> None:
    optimizer.load_state_dict(
        torch.load(ckpt / OPTIMIZER, map_location=device, weights_only=True)
    )


def restore_rng(ckpt: Path, rank: int, scaler: torch.amp.GradScaler) -> None:
    """Set this rank's RNG states (rank 0's if the run had fewer ranks) and the fp16
    scaler's state from the checkpoint."""
    saved = torch.load(ckpt / RNG, map_location="cpu", weights_only=True)
    ranks = saved["ranks"]
    set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
    if scaler.is_enabled() and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
