"""The training loop shared by ``kodalle train``, ``train vqgan`` and ``train reranker``.

A model is trained by giving :func:`train` a :class:`Task` and a :class:`TrainerConfig`.
The task says *what* is trained; the trainer owns *how*: precision and autocast, gradient
accumulation and clipping, the learning-rate schedule (:func:`lr_at`), non-finite-loss
skipping and the progress bar. Beside it: DDP and FSDP (``cfg.strategy``) in :mod:`.dist`, checkpoints, RNG states and
exact resume in :mod:`.checkpoint`, ``metrics.csv`` in :mod:`.metrics` (and the ``--log``
dashboards, TensorBoard and W&B, in :mod:`.loggers`), and the run directory's layout
(``checkpoints/``, ``latest``, ``metrics.csv``, ``samples/``) in :mod:`kodalle_cli.runs`.
Only rank 0 writes; the task's own files are its business.

The Task interface and the settings the trainer takes: :mod:`.task`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kodalle_cli.atomic import disk_full_error, is_disk_full, jsonable
from kodalle_cli.device import autocast, pick_device, pick_dtype
from kodalle_cli.errors import KodalleError, UsageError
from kodalle_cli.progress import progress_bar
from kodalle_cli.runlock import run_lock
from kodalle_cli.runs import CKPT_DIR, SAMPLES_DIR, latest_checkpoint
from kodalle_cli.train.checkpoint import (
    kill_hook,
    load_optimizer,
    load_weights,
    read_state,
    remove_partial_saves,
    restore_rng,
    save_checkpoint,
)
from kodalle_cli.train.dist import Dist, make_strategy, plain
from kodalle_cli.train.loggers import Loggers, parse_logs, require
from kodalle_cli.train.task import Task, TrainerConfig


@dataclass
class TrainResult:
    step: int
    last_loss: float | None
    checkpoint: Path | None
    bad_steps: int = 0
    history: list[dict] = field(default_factory=list)  # per logged step: step, loss, lr


# ---- the learning-rate schedule --------------------------------------------------------------
def lr_at(step: int, cfg: TrainerConfig, max_steps: int) -> float:
    """Linear warm-up to ``lr``, then constant or cosine down to ``lr * min_lr_ratio``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


# ---- the loop --------------------------------------------------------------------------------
class TrainingInterrupted(KodalleError):
    """Ctrl-C: the step finished and a checkpoint was written; the message says how to resume
    (exit status 130, as for any interrupted command)."""

    exit_code = 130


def train(task: Task, cfg: TrainerConfig, dist: Dist | None = None,
          device: torch.device | None = None) -> TrainResult:
    """Train ``task`` to ``cfg.max_steps`` (or ``cfg.epochs``), resuming from ``cfg.out``.

    While it runs, ``OUT/lock`` names this process (a second run on ``out`` is refused) and
    Ctrl-C finishes the step, writes a checkpoint and raises :class:`TrainingInterrupted`
    (a second Ctrl-C raises ``KeyboardInterrupt`` at once; the last complete checkpoint
    stays). The previous SIGINT handler is restored when it returns."""
    dist = dist or Dist()
    if dist.main:
        require(parse_logs(cfg.log))  # a missing dashboard package: before the run starts
    with run_lock(cfg.out, dist.main), _Interrupts() as interrupts:
        return _train(task, cfg, dist, device, interrupts)


def _train(task: Task, cfg: TrainerConfig, dist: Dist, device: torch.device | None,
           interrupts: _Interrupts) -> TrainResult:
    device = device or pick_device(cfg.device)
    cfg.device_type = device.type
    dtype = pick_dtype(cfg.precision, device)
    out = Path(cfg.out)
    max_steps, samples_per_step = _plan(task, cfg, dist)
    ckpt = _open_out_dir(out, cfg, dist)

    strategy = make_strategy(cfg.strategy, dist, device)
    model = task.model.to(device)
    state = {"step": 0, "bad_steps_total": 0}
    if ckpt is not None:
        load_weights(model, ckpt)  # full weights into the whole model, before any sharding
        state.update(read_state(ckpt))
    step = state["step"]
    # FSDP: each unit, then the root, sharded in place; the optimizer gets the shards
    model = task.model = strategy.shard(model, task.shard_units(model))
    optimizer = task.make_optimizer(task.param_groups(), cfg)
    # Precision, chosen once: autocast (a no-op context for fp32), and a loss scaler that
    # scales only for fp16 (disabled, its scale / unscale_ / step / update pass through).
    amp = autocast(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    if ckpt is not None:
        load_optimizer(optimizer, ckpt, device, strategy, model)
        task.load_extra(ckpt)
    train_model = strategy.wrap(model)
    if cfg.compile:
        train_model = torch.compile(train_model)
    # The data iterator is made before the RNG is restored: creating it may draw from the
    # RNG, and the uninterrupted run drew at its start, not at the resumed step.
    batches = iter(task.train_batches(step * cfg.grad_accum, dist.rank, dist.world_size))
    if ckpt is not None:
        restore_rng(ckpt, dist.rank, scaler)
        if dist.main:
            print(f"resuming from {ckpt} (step {step})", flush=True)

    run = _Run(task, cfg, dist, device, out, max_steps, samples_per_step, model, train_model,
               optimizer, amp, scaler, strategy,
               Loggers(out, cfg.log, dist.main, step if ckpt is not None else None,
                       config=_jsonable_config(cfg)))
    bad_in_row, last_loss, saved_ckpt = 0, None, ckpt
    saved_step = step if ckpt is not None else None
    history: list[dict] = []
    speed = _Throughput()
    evaluates = dist.main or strategy.forward_on_all_ranks  # FSDP: forwards are collective
    if dist.main and cfg.sample_every > 0 and not strategy.previews:
        print(f"note: --strategy {strategy.name} samples no preview grids while training; "
              "run `kodalle sample` on a checkpoint", flush=True)
    try:
        if ckpt is None and dist.main:
            run.logs.write(0, "data", task.data_metrics)
        if ckpt is None and evaluates and cfg.eval_every > 0:  # the baseline: step 0
            run.evaluate(0)
        with progress_bar("{task.fields[info]}", title="[bold]train",
                          enabled=cfg.progress and dist.main) as bar:
            bar_task = bar.add_task("train", total=max_steps, completed=step, info="")
            while step < max_steps:
                lr = run.set_lr(step)
                done = run.forward_backward(batches)
                run.optimizer_step(done.finite)
                step += 1
                extra = task.after_step(model, step, optimizer) if done.finite else None
                speed.count(done.samples * dist.world_size, done.tokens * dist.world_size)
                if done.finite:
                    bad_in_row = 0
                    last_loss = done.loss
                    entry = {"step": step, "loss": done.loss, "lr": lr, **done.parts,
                             **{k: float(v) for k, v in (extra or {}).items()}}
                    history.append(entry)
                    if step % cfg.log_every == 0 or step == max_steps or step == 1:
                        sps, tps = run.log(entry, done.grad_norm, speed)
                        bar.update(bar_task, info=f"loss {done.loss:.4f}  lr {lr:.2e}  "
                                                  f"{sps:.1f} samples/s  {tps:.0f} tok/s")
                else:
                    bad_in_row += 1
                    state["bad_steps_total"] += 1
                    _skipped(step, bad_in_row, cfg, dist, saved_ckpt)
                bar.update(bar_task, completed=step)

                kill_hook("KODALLE_TEST_KILL_AT_STEP", step)
                if evaluates and cfg.eval_every > 0 and (step % cfg.eval_every == 0
                                                         or step == max_steps):
                    run.evaluate(step)
                if (dist.main and strategy.previews and cfg.sample_every > 0
                        and step % cfg.sample_every == 0):
                    run.sample(step)
                if step % cfg.save_every == 0 or step == max_steps:
                    saved_ckpt, saved_step = run.save(state, step) or saved_ckpt, step
                # Ctrl-C: every rank stops after the same step, with its checkpoint
                if step < max_steps and dist.any(interrupts.requested, device):
                    if saved_step != step:
                        saved_ckpt, saved_step = run.save(state, step) or saved_ckpt, step
                    raise TrainingInterrupted(
                        f"interrupted at step {step}: checkpoint "
                        f"{saved_ckpt if saved_ckpt is not None else 'written'}; run the same "
                        "command again to resume")
    except KodalleError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            intact = (f"the last checkpoint {saved_ckpt} is intact" if saved_ckpt is not None
                      else "no checkpoint yet")
            raise disk_full_error(
                "the run", out, f"{intact}; free space and run the same command to resume"
            ) from None
        raise
    finally:
        run.logs.close(failed=sys.exc_info()[0] is not None)  # W&B: the run's exit status
    return TrainResult(step=step, last_loss=last_loss, checkpoint=saved_ckpt,
                       bad_steps=state["bad_steps_total"], history=history)


class _Interrupts:
    """SIGINT while :func:`train` runs: the first sets ``requested`` (the loop finishes the
    step, saves and stops), the second raises ``KeyboardInterrupt`` at once. In processes
    forked from the trainer (data-loader workers) it does nothing: the trainer stops them.
    Installed only from the main thread; the previous handler is restored on exit."""

    def __init__(self):
        self.requested = False
        self._pid = os.getpid()
        self._previous = None
        self._installed = False

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop "
              "now, losing the steps since the last checkpoint)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._installed:
            previous = self._previous
            signal.signal(signal.SIGINT,
                          previous if previous is not None else signal.default_int_handler)


# ---- the loop's steps ------------------------------------------------------------------------
def _plan(task: Task, cfg: TrainerConfig, dist: Dist) -> tuple[int, int]:
    """-> ``(max_steps, samples_per_step)``; ``--epochs`` becomes a number of steps."""
    if cfg.grad_accum < 1 or cfg.batch_size < 1:
        raise UsageError("--batch-size and --grad-accum must be at least 1")
    samples_per_step = cfg.batch_size * cfg.grad_accum * dist.world_size
    max_steps = cfg.max_steps
    if max_steps is None:
        if cfg.epochs is None or not task.epoch_samples:
            raise UsageError("give --max-steps, or --epochs with data of known size")
        max_steps = max(1, math.ceil(cfg.epochs * task.epoch_samples / samples_per_step))
    return max_steps, samples_per_step


def _jsonable_config(cfg: TrainerConfig) -> dict:
    """The trainer's settings, for a dashboard's run config (wandb)."""
    import dataclasses

    return jsonable(dataclasses.asdict(cfg))


def _open_out_dir(out: Path, cfg: TrainerConfig, dist: Dist) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); clears killed saves."""
    ckpt = latest_checkpoint(out)
    if cfg.resume and ckpt is None and dist.main:
        raise KodalleError(f"--resume: no checkpoint in {out / CKPT_DIR}")
    if dist.main:
        (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
        remove_partial_saves(out)
    return ckpt


@dataclass
class _StepResult:
    """One optimizer step's gradients, and its loss averaged over micro-batches and ranks."""

    loss: float
    parts: dict[str, float]
    grad_norm: torch.Tensor
    finite: bool  # loss and gradient norm: a non-finite step is skipped
    samples: int  # on this rank
    tokens: int


@dataclass
class _Run:
    """What a run fixes before its first step, and the steps made of it."""

    task: Task
    cfg: TrainerConfig
    dist: Dist
    device: torch.device
    out: Path
    max_steps: int
    samples_per_step: int
    model: nn.Module  # the task's module
    train_model: nn.Module  # it maybe wrapped in DDP and compiled: what the loss calls
    optimizer: torch.optim.Optimizer
    amp: contextlib.AbstractContextManager  # torch.autocast or nullcontext
    scaler: torch.amp.GradScaler
    strategy: object  # dist.DDPStrategy or dist.FSDPStrategy
    logs: Loggers  # metrics.csv and the --log dashboards (rank 0)

    def __post_init__(self):
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def forward_backward(self, batches: Iterator) -> _StepResult:
        """Accumulate the gradients of ``grad_accum`` micro-batches (DDP and FSDP sync on
        the last only), unscale and clip them."""
        cfg, device, task = self.cfg, self.device, self.task
        self.model.train()
        loss_sum = torch.zeros((), device=device)
        parts_sum: dict[str, torch.Tensor] = {}
        samples = tokens = 0
        try:
            for micro in range(cfg.grad_accum):
                batch = task.to_device(next(batches), device)
                samples += task.batch_size(batch)
                tokens += task.batch_tokens(batch)
                sync = micro == cfg.grad_accum - 1 or not self.dist.enabled
                no_sync = (contextlib.nullcontext() if sync
                           else self.strategy.no_sync(self.train_model))
                with no_sync, self.amp:
                    loss, parts = task.loss(self.train_model, batch)
                    scaled = loss / cfg.grad_accum
                self.scaler.scale(scaled).backward()
                loss_sum += loss.detach().float() / cfg.grad_accum
                for k, v in parts.items():
                    v = torch.as_tensor(v, device=device).detach().float()
                    parts_sum[k] = parts_sum.get(k, 0) + v / cfg.grad_accum
            self.scaler.unscale_(self.optimizer)
            norm = plain(torch.nn.utils.clip_grad_norm_(  # FSDP: a DTensor, made whole
                self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            ))
        except Exception as exc:
            if _is_oom(exc):
                raise KodalleError(_oom_message(cfg)) from None
            raise
        logged = self.dist.mean_(torch.stack([loss_sum, *parts_sum.values()]))
        finite = bool(torch.isfinite(logged[0])) and bool(torch.isfinite(norm))
        loss_value, *part_values = logged.tolist()
        return _StepResult(loss_value, dict(zip(parts_sum, part_values, strict=True)), norm,
                           finite, samples, tokens)

    def optimizer_step(self, finite: bool) -> None:
        """Step on finite gradients only; the fp16 scale is updated either way."""
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def log(self, entry: dict, grad_norm: torch.Tensor,
            speed: _Throughput) -> tuple[float, float]:
        """The step's train rows in metrics.csv (and the dashboards); -> (samples/s,
        tokens/s) since the last."""
        sps, tps = speed.take()
        self.logs.write(entry["step"], "train", {
            **{k: v for k, v in entry.items() if k != "step"},
            "grad_norm": float(grad_norm), "samples_per_s": sps, "tokens_per_s": tps,
        })
        return sps, tps

    def evaluate(self, step: int) -> None:
        self.model.eval()
        with torch.no_grad(), self.amp:
            self.logs.write(step, "val", self.task.evaluate(self.model, step))

    def sample(self, step: int) -> None:
        self.model.eval()
        with torch.no_grad():
            grid = self.task.sample(self.model, step, self.out / SAMPLES_DIR)
        self.logs.image(step, "samples/preview", grid)

    def save(self, state: dict, step: int) -> Path | None:
        """A checkpoint of ``step`` (rank 0 gets its path)."""
        state = {**state, "step": step, "max_steps": self.max_steps,
                 "samples_per_step": self.samples_per_step, "world_size": self.dist.world_size}
        return save_checkpoint(self.out, self.task, self.optimizer, self.scaler, state,
                               self.dist, self.cfg.keep_last, self.strategy)


class _Throughput:
    """Samples and tokens (all ranks) per second since the last :meth:`take`."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.start, self.samples, self.tokens = time.perf_counter(), 0, 0

    def count(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def take(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = self.samples / elapsed, self.tokens / elapsed
        self._reset()
        return rates


def _skipped(step: int, in_row: int, cfg: TrainerConfig, dist: Dist,
             good: Path | None) -> None:
    """Report a skipped (non-finite) step; stop after ``max_bad_steps`` in a row."""
    if dist.main:
        print(f"step {step}: non-finite loss, step skipped ({in_row} in a row)", flush=True)
    if in_row >= cfg.max_bad_steps:
        raise KodalleError(
            f"stopped at step {step}: {in_row} non-finite losses in a row "
            f"(--max-bad-steps {cfg.max_bad_steps}); the last good checkpoint is "
            f"{good.name if good else 'none yet'}. Try a lower --lr, --grad-clip, or "
            "--precision fp32/bf16"
        )


def _oom_message(cfg: TrainerConfig) -> str:
    return (
        f"out of memory at --batch-size {cfg.batch_size}; reduce memory with "
        f"{cfg.memory_hint}, --grad-checkpointing, --precision bf16, or a smaller "
        "model (--dim, --depth)"
    )


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )
