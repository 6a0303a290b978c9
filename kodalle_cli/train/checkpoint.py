"""Checkpoints of the shared trainer: writing and reading them, and the RNG states that make
a resume exact.

A checkpoint (``OUT/checkpoints/step-N``, named by :mod:`kodalle_cli.runs`) holds::

    model.safetensors     the weights (metadata: the step)
    optimizer.pt          the optimizer's state_dict (DDP: parameters keyed by index;
                          --strategy fsdp: the full state keyed by parameter name, from
                          torch.distributed.checkpoint's get_optimizer_state_dict)
    trainer_state.json    the step (which fixes the LR schedule and the data position), the
                          non-finite steps so far, max_steps, samples_per_step, world_size
    rng.pt                {"ranks": every rank's RNG states (torch, CUDA, numpy, python),
                           "scaler": the fp16 GradScaler's state_dict, or None without fp16}
    ...                   the task's own files (Task.save_extra / load_extra)

Exact resume: with all of it restored, a run killed and resumed on the CPU reaches bitwise
the weights of an uninterrupted run. A checkpoint is written to
``checkpoints/.step-N.tmp-PID`` and renamed when complete (:func:`kodalle_cli.atomic.replacing`);
``latest`` is replaced atomically after it, so a kill at any moment leaves the previous
checkpoint usable. A write that fails (a full disk) removes its
temporary directory and says so in one line; old checkpoints are renamed away before they
are deleted, so no half checkpoint ever carries a ``step-N`` name.

Resuming with other settings: :func:`refuse_changed_settings` lists what differs from the
settings the run recorded (each command names the settings that may change).

Test hooks (environment, see :func:`kill_hook`): ``KODALLE_TEST_KILL_AT_STEP=N`` SIGKILLs
the process after step N (before its checkpoint); ``KODALLE_TEST_KILL_IN_SAVE=N`` SIGKILLs
it half-way through writing the checkpoint of step N; ``KODALLE_TEST_KILL_IN_TOKENIZE=
SHARD:N`` SIGKILLs ``kodalle tokenize`` after N samples of SHARD. A process group leader
takes its group (data-loader workers) with it.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kodalle_cli.atomic import (
    discard,
    disk_full_error,
    is_disk_full,
    leftovers,
    remove_tree,
    replacing,
    write_text_atomic,
)
from kodalle_cli.errors import KodalleError
from kodalle_cli.runs import CKPT_DIR, LATEST, checkpoint_name, latest_checkpoint
from kodalle_cli.train.dist import DDPStrategy, Dist
from kodalle_cli.train.task import Task

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


def kill_hook(name: str, step: int | str) -> None:
    """SIGKILL this process if the environment variable ``name`` is ``step`` (tests). A
    process that leads its process group (a command started from a shell, or a test's
    subprocess in its own session) kills the whole group, data-loader workers included."""
    if os.environ.get(name) == str(step):
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


# ---- writing ---------------------------------------------------------------------------------
def remove_partial_saves(out: Path) -> None:
    """Delete what saves killed half-way left (``checkpoints/.step-N.tmp-PID`` ...)."""
    for stale in leftovers(out / CKPT_DIR):
        discard(stale)


def save_checkpoint(out: Path, task: Task, optimizer, scaler: torch.amp.GradScaler,
                    state: dict, dist: Dist, keep_last: int,
                    strategy: DDPStrategy | None = None) -> Path | None:
    """Gather every rank's RNG states, and the full weights and optimizer state (the
    ``strategy``'s: FSDP all-gathers its shards; default DDP's); on rank 0 write
    checkpoints/step-N (``state["step"]``) atomically, point ``latest`` at it and keep the
    newest ``keep_last``. All ranks wait for it; returns the checkpoint on rank 0, None on
    the others.

    A failed write (a full disk: one line saying so) leaves nothing of it behind; the
    previous checkpoint and ``latest`` are untouched."""
    strategy = strategy or DDPStrategy(dist, torch.device("cpu"))
    rngs = dist.gather(rng_state())
    weights = strategy.model_state(task.model)  # collectives: every rank, before the write
    optim = strategy.optimizer_state(task.model, optimizer)
    path = (_write(out, task, (weights, optim), scaler, state, rngs, keep_last)
            if dist.main else None)
    dist.barrier()
    return path


def _write(out: Path, task: Task, gathered: tuple[dict, dict], scaler: torch.amp.GradScaler, state: dict,
           rngs: list, keep_last: int) -> Path:
    ckpts = out / CKPT_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / checkpoint_name(state["step"])
    try:  # re-saving the same step (e.g. after a resume) replaces it whole
        with replacing(final, directory=True) as tmp:
            _write_files(tmp, task, gathered, scaler, state, rngs)
    except BaseException as exc:  # a full disk, a second Ctrl-C: nothing partial stays
        if is_disk_full(exc):
            previous = latest_checkpoint(out)
            intact = (f"the previous checkpoint {previous.name} and `latest` are intact"
                      if previous is not None else "there is no earlier checkpoint")
            raise disk_full_error(f"checkpoint {final.name}", ckpts,
                                  f"{intact}; free space and run the same command to resume"
                                  ) from None
        raise
    write_text_atomic(out / LATEST, f"{CKPT_DIR}/{final.name}")
    if keep_last > 0:
        done = sorted(p for p in ckpts.glob("step-*") if p.is_dir())
        for old in done[:-keep_last]:
            remove_tree(old)  # renamed first: never half a checkpoint
    return final


def _write_files(tmp: Path, task: Task, gathered: tuple[dict, dict],
                 scaler: torch.amp.GradScaler, state: dict, rngs: list) -> None:
    from safetensors.torch import save_file

    weights, optim = gathered
    save_file(weights, str(tmp / WEIGHTS), metadata={"step": str(state["step"])})
    kill_hook("KODALLE_TEST_KILL_IN_SAVE", state["step"])
    torch.save(optim, tmp / OPTIMIZER)
    # "scaler" is None unless fp16 loss scaling is on (a disabled scaler has no state)
    scaler_state = scaler.state_dict() if scaler.is_enabled() else None
    torch.save({"ranks": rngs, "scaler": scaler_state}, tmp / RNG)
    task.save_extra(tmp)
    (tmp / STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")


# ---- settings a resumed run may change -------------------------------------------------------
def changed_settings(saved: dict, current: dict, defaults: dict,
                     may_change: tuple[str, ...]) -> list[str]:
    """``"--name OLD (now NEW)"`` for each setting of ``current`` that differs from the run's
    ``saved`` ones, except ``may_change``. A setting the saved run does not record (added
    later) counts as its default."""
    def plain(value):
        return json.loads(json.dumps(value, default=str))

    diff = []
    for name, value in current.items():
        if name in may_change:
            continue
        before = saved.get(name, defaults.get(name))
        if plain(before) != plain(value):
            diff.append(f"{_flag(name)} {_shown(plain(before))} (now {_shown(plain(value))})")
    return diff


def refuse_changed_settings(out: Path, saved: dict, current: dict, defaults: dict,
                            may_change: tuple[str, ...]) -> None:
    """One error listing what differs from the run in ``out``, and what may change."""
    diff = changed_settings(saved, current, defaults, may_change)
    if diff:
        allowed = ", ".join(_flag(n) for n in may_change)
        raise KodalleError(
            f"{out} holds a run with other settings: {'; '.join(diff)}. Resuming may change "
            f"only {allowed}; use another --out for a new run"
        )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


# ---- reading ---------------------------------------------------------------------------------
def load_weights(model: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(ckpt / WEIGHTS))
    model.load_state_dict(sd)


def read_state(ckpt: Path) -> dict:
    """trainer_state.json: ``step``, ``bad_steps_total`` and the run's shape."""
    return json.loads((ckpt / STATE).read_text(encoding="utf-8"))


def load_optimizer(optimizer, ckpt: Path, device: torch.device,
                   strategy: DDPStrategy | None = None, model: nn.Module | None = None) -> None:
    """optimizer.pt into ``optimizer`` (FSDP: after sharding; every rank reads the full
    state and keeps its shard)."""
    # FSDP: the full state stays in CPU memory; each rank moves only its shard to the device
    where = "cpu" if strategy is not None and strategy.name == "fsdp" else device
    state = torch.load(ckpt / OPTIMIZER, map_location=where, weights_only=True)
    if strategy is None:
        optimizer.load_state_dict(state)
    else:
        strategy.load_optimizer_state(model, optimizer, state)


def restore_rng(ckpt: Path, rank: int, scaler: torch.amp.GradScaler) -> None:
    """Set this rank's RNG states (rank 0's if the run had fewer ranks) and the fp16
    scaler's state from the checkpoint."""
    saved = torch.load(ckpt / RNG, map_location="cpu", weights_only=True)
    ranks = saved["ranks"]
    set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
    if scaler.is_enabled() and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
