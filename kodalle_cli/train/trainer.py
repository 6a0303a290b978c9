"""The training loop shared by ``kodalle train``, ``train vqgan`` and ``train reranker``.

A model is trained by giving :func:`train` a :class:`Task` and a :class:`TrainerConfig`.
The task says *what* is trained; the trainer owns *how*: device and DDP, precision and
autocast, gradient accumulation and clipping, the learning-rate schedule, non-finite-loss
skipping, checkpoints and exact resume, ``metrics.csv`` and the progress bar.

The Task interface (subclass :class:`Task`; only the first four are required)::

    task.model                            the nn.Module to train (one module; put several
                                          in a container). Saved as model.safetensors.
    task.train_batches(start, rank, world)  an iterator of batches for this rank, positioned
                                          after `start` batches already consumed by it (the
                                          trainer counts them: resume = same iterator with
                                          the count it saved). Endless; the trainer stops it.
    task.loss(model, batch)               -> (loss tensor, {name: tensor|float}) on the
                                          batch; `model` is the (maybe DDP-wrapped or
                                          compiled) module: call it (its forward), not
                                          another method, or DDP cannot sync gradients.
                                          Runs under autocast.
    task.batch_size(batch)                samples in the batch (for samples/s)
    task.batch_tokens(batch)              tokens in the batch (for tokens/s; default 0)
    task.param_groups()                   optimizer groups (default: weight decay on >= 2-D
                                          trainable parameters, none on biases/norms/scales)
    task.make_optimizer(groups, cfg)      default AdamW(lr, weight_decay, betas)
    task.evaluate(model, step)            -> {name: float}, rank 0 only, under no_grad and
                                          eval mode (e.g. validation loss); default {}
    task.sample(model, step, out_dir)     rank 0 only, e.g. a PNG grid in out_dir; default none
    task.after_step(model, step, optimizer)  after each optimizer step taken (finite loss),
                                          `step` counted after it: task-owned updates (a
                                          second optimizer such as a GAN discriminator's,
                                          codebook restarts). Returns {name: float|tensor}
                                          logged with the step's metrics, or None
    task.save_extra(ckpt_dir) / task.load_extra(ckpt_dir)   more files in a checkpoint
                                          (e.g. that second optimizer); load_extra is called
                                          on resume, after the weights and the optimizer
    task.epoch_samples                    samples per epoch (for --epochs), or None

Run directory written here (rank 0 only; the task's own files are its business)::

    OUT/checkpoints/step-0000100/{model.safetensors, optimizer.pt, trainer_state.json,
                                  rng.pt, ...task extras}
    OUT/latest                            "checkpoints/step-0000100"
    OUT/metrics.csv                       step,split,metric,value,time (tidy: one value a row)

Exact resume: a checkpoint holds the weights, the optimizer, the step (which fixes the LR
schedule and the data position) and every rank's RNG states (torch, CUDA, numpy, python). A
checkpoint is written to ``checkpoints/.tmp-step-...`` and renamed when complete; ``latest``
is replaced atomically after it, so a kill at any moment leaves the previous checkpoint
usable. On CPU, a run killed and resumed reaches bitwise the weights of an uninterrupted run.

Test hooks (environment): ``KODALLE_TEST_KILL_AT_STEP=N`` SIGKILLs the process after step N
(before its checkpoint); ``KODALLE_TEST_KILL_IN_SAVE=N`` SIGKILLs it half-way through
writing the checkpoint of step N.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kodalle_cli.atomic import write_text_atomic
from kodalle_cli.errors import KodalleError, UsageError

CKPT_DIR = "checkpoints"
LATEST = "latest"
METRICS = "metrics.csv"
METRIC_FIELDS = ["step", "split", "metric", "value", "time"]


# ---- the task interface ----------------------------------------------------------------------
class Task:
    """What is trained. See the module docstring for the contract."""

    model: nn.Module
    epoch_samples: int | None = None

    def train_batches(self, start: int, rank: int, world_size: int) -> Iterator:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def batch_size(self, batch) -> int:
        raise NotImplementedError

    def batch_tokens(self, batch) -> int:
        return 0

    def param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def make_optimizer(self, groups: list[dict], cfg: TrainerConfig) -> torch.optim.Optimizer:
        fused = cfg.device_type == "cuda"
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 betas=tuple(cfg.betas), fused=fused or None)

    def to_device(self, batch, device: torch.device):
        if isinstance(batch, torch.Tensor):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self.to_device(v, device) for k, v in batch.items()}
        if isinstance(batch, list | tuple):
            return type(batch)(self.to_device(v, device) for v in batch)
        return batch

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return {}

    def sample(self, model: nn.Module, step: int, out_dir: Path) -> None:
        return None

    def after_step(self, model: nn.Module, step: int, optimizer) -> dict | None:
        return None

    def save_extra(self, ckpt_dir: Path) -> None:
        return None

    def load_extra(self, ckpt_dir: Path) -> None:
        return None


@dataclass
class TrainerConfig:
    out: Path
    lr: float = 3e-5
    weight_decay: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"  # cosine | constant (after warm-up)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 40  # per rank, per micro-step
    grad_accum: int = 1
    grad_clip: float = 0.5  # 0: no clipping
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    seed: int = 0
    save_every: int = 1000
    keep_last: int = 3
    eval_every: int = 500
    sample_every: int = 1000
    log_every: int = 10
    max_bad_steps: int = 10
    resume: bool = False  # also implied by an existing checkpoint in `out`
    progress: bool = True
    memory_hint: str = "--batch-size (with --grad-accum to keep the effective batch)"
    device_type: str = field(default="cpu", init=False)


@dataclass
class TrainResult:
    step: int
    last_loss: float | None
    checkpoint: Path | None
    bad_steps: int = 0
    history: list[dict] = field(default_factory=list)  # per logged step: step, loss, lr


# ---- distributed -----------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: NCCL on GPUs, gloo on the CPU."""
    from kodalle_cli.device import pick_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_name)
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


# ---- small helpers ---------------------------------------------------------------------------
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def _kill_hook(name: str, step: int) -> None:
    if os.environ.get(name) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)


# ---- checkpoints -----------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``latest`` points at; else the newest complete one; else None."""
    out = Path(out)
    pointer = out / LATEST
    if pointer.is_file():
        target = out / pointer.read_text().strip()
        if (target / "trainer_state.json").is_file():
            return target
    found = sorted((out / CKPT_DIR).glob("step-*")) if (out / CKPT_DIR).is_dir() else []
    found = [p for p in found if (p / "trainer_state.json").is_file()]
    return found[-1] if found else None


def save_checkpoint(out: Path, task: Task, optimizer, scaler, state: dict, rngs: list,
                    keep_last: int) -> Path:
    """Write checkpoints/step-N atomically (temp dir, rename), point ``latest`` at it and
    keep the newest ``keep_last``."""
    from safetensors.torch import save_file

    ckpts = out / CKPT_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / checkpoint_name(state["step"])
    tmp = ckpts / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model = unwrap(task.model)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(state["step"])})
    _kill_hook("KODALLE_TEST_KILL_IN_SAVE", state["step"])
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"ranks": rngs, "scaler": scaler.state_dict() if scaler else None}, tmp / "rng.pt")
    task.save_extra(tmp)
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(out / LATEST, f"{CKPT_DIR}/{final.name}")
    if keep_last > 0:
        done = sorted(p for p in ckpts.glob("step-*") if p.is_dir())
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(model: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(ckpt / "model.safetensors"))
    model.load_state_dict(sd)


# ---- metrics ---------------------------------------------------------------------------------
class Metrics:
    """metrics.csv: one row per (step, split, metric). Rows past a resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled or not values:
            return
        now = f"{time.time():.3f}"
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            for k, v in values.items():
                w.writerow([step, split, k, f"{float(v):.8g}", now])


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{**r, "step": int(r["step"]), "value": float(r["value"])}
                for r in csv.DictReader(f)]


# ---- progress --------------------------------------------------------------------------------
def _progress(enabled: bool):
    from kodalle_cli.progress import progress_bar

    return progress_bar("{task.fields[info]}", title="[bold]train", enabled=enabled)


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


# ---- the loop --------------------------------------------------------------------------------
def train(task: Task, cfg: TrainerConfig, dist: Dist | None = None,
          device: torch.device | None = None) -> TrainResult:
    """Train ``task`` to ``cfg.max_steps`` (or ``cfg.epochs``), resuming from ``cfg.out``."""
    from kodalle_cli.device import autocast, pick_device, pick_dtype

    if dist is None:
        dist = Dist()
    device = device or pick_device(cfg.device)
    cfg.device_type = device.type
    dtype = pick_dtype(cfg.precision, device)
    out = Path(cfg.out)
    if cfg.grad_accum < 1 or cfg.batch_size < 1:
        raise UsageError("--batch-size and --grad-accum must be at least 1")
    samples_per_step = cfg.batch_size * cfg.grad_accum * dist.world_size
    max_steps = cfg.max_steps
    if max_steps is None:
        if cfg.epochs is None or not task.epoch_samples:
            raise UsageError("give --max-steps, or --epochs with data of known size")
        max_steps = max(1, math.ceil(cfg.epochs * task.epoch_samples / samples_per_step))

    ckpt = latest_checkpoint(out)
    if cfg.resume and ckpt is None and dist.main:
        raise KodalleError(f"--resume: no checkpoint in {out / CKPT_DIR}")
    if dist.main:
        (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (out / CKPT_DIR).glob(".tmp-*"):  # a save that was killed
            shutil.rmtree(stale, ignore_errors=True)

    model = task.model.to(device)
    state = {"step": 0, "bad_steps_total": 0}
    if ckpt is not None:
        load_weights(model, ckpt)
        state.update(json.loads((ckpt / "trainer_state.json").read_text()))
    step = state["step"]

    optimizer = task.make_optimizer(task.param_groups(), cfg)
    scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
    if ckpt is not None:
        optimizer.load_state_dict(
            torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
        )
        task.load_extra(ckpt)
    train_model = model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    # The data iterator is made before the RNG is restored: creating it may draw from the
    # RNG, and the uninterrupted run drew at its start, not at the resumed step.
    batches = iter(task.train_batches(step * cfg.grad_accum, dist.rank, dist.world_size))
    if ckpt is not None:
        saved = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
        set_rng_state(saved["ranks"][dist.rank] if dist.rank < len(saved["ranks"])
                      else saved["ranks"][0])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        if dist.main:
            print(f"resuming from {ckpt} (step {step})", flush=True)

    metrics = Metrics(out / METRICS, dist.main, step if ckpt is not None else None)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bad_in_row, last_loss, saved_ckpt = 0, None, ckpt
    history: list[dict] = []
    window_t, window_samples, window_tokens = time.perf_counter(), 0, 0

    def save(step_now: int) -> Path | None:
        rngs = [rng_state()]
        if dist.enabled:
            gathered = [None] * dist.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        path = None
        if dist.main:
            state_now = {**state, "step": step_now, "max_steps": max_steps,
                         "samples_per_step": samples_per_step, "world_size": dist.world_size}
            path = save_checkpoint(out, task, optimizer, scaler, state_now, rngs, cfg.keep_last)
        dist.barrier()
        return path

    if ckpt is None and dist.main and cfg.eval_every > 0:  # the baseline: step 0
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            metrics.write(0, "val", task.evaluate(model, 0))
    with _progress(cfg.progress and dist.main) as bar:
        bar_task = bar.add_task("train", total=max_steps, completed=step, info="")
        while step < max_steps:
            lr = lr_at(step, cfg, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            model.train()
            loss_sum = torch.zeros((), device=device)
            parts_sum: dict[str, torch.Tensor] = {}
            n_samples = n_tokens = 0
            try:
                for micro in range(cfg.grad_accum):
                    batch = task.to_device(next(batches), device)
                    n_samples += task.batch_size(batch)
                    n_tokens += task.batch_tokens(batch)
                    sync = micro == cfg.grad_accum - 1 or not dist.enabled
                    ctx = train_model.no_sync() if not sync else _nullcontext()
                    with ctx, autocast(device, dtype):
                        loss, parts = task.loss(train_model, batch)
                        scaled = loss / cfg.grad_accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                    loss_sum += loss.detach().float() / cfg.grad_accum
                    for k, v in parts.items():
                        v = torch.as_tensor(v, device=device).detach().float()
                        parts_sum[k] = parts_sum.get(k, 0) + v / cfg.grad_accum
                if scaler:
                    scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(
                    params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                )
            except Exception as exc:
                if _is_oom(exc):
                    raise KodalleError(_oom_message(cfg)) from None
                raise
            logged = torch.stack([loss_sum, *parts_sum.values()])
            if dist.enabled:
                torch.distributed.all_reduce(logged)
                logged /= dist.world_size
            finite = bool(torch.isfinite(logged[0])) and bool(torch.isfinite(norm))
            if finite:
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                bad_in_row = 0
            else:
                if scaler:
                    scaler.update()
                bad_in_row += 1
                state["bad_steps_total"] += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1
            extra = task.after_step(model, step, optimizer) if finite else None
            window_samples += n_samples * dist.world_size
            window_tokens += n_tokens * dist.world_size

            if not finite:
                if dist.main:
                    print(f"step {step}: non-finite loss, step skipped "
                          f"({bad_in_row} in a row)", flush=True)
                if bad_in_row >= cfg.max_bad_steps:
                    good = saved_ckpt.name if saved_ckpt else "none yet"
                    raise KodalleError(
                        f"stopped at step {step}: {bad_in_row} non-finite losses in a row "
                        f"(--max-bad-steps {cfg.max_bad_steps}); the last good checkpoint is "
                        f"{good}. Try a lower --lr, --grad-clip, or --precision fp32/bf16"
                    )
            else:
                values = logged.tolist()
                last_loss = values[0]
                entry = {"step": step, "loss": values[0], "lr": lr,
                         **dict(zip(parts_sum, values[1:], strict=True)),
                         **{k: float(v) for k, v in (extra or {}).items()}}
                history.append(entry)
                if step % cfg.log_every == 0 or step == max_steps or step == 1:
                    elapsed = max(time.perf_counter() - window_t, 1e-9)
                    sps, tps = window_samples / elapsed, window_tokens / elapsed
                    window_t, window_samples, window_tokens = time.perf_counter(), 0, 0
                    metrics.write(step, "train", {**{k: v for k, v in entry.items()
                                                     if k != "step"},
                                                  "grad_norm": float(norm),
                                                  "samples_per_s": sps, "tokens_per_s": tps})
                    bar.update(bar_task, info=(
                        f"loss {values[0]:.4f}  lr {lr:.2e}  {sps:.1f} samples/s  "
                        f"{tps:.0f} tok/s"))
            bar.update(bar_task, completed=step)

            _kill_hook("KODALLE_TEST_KILL_AT_STEP", step)
            if dist.main and cfg.eval_every > 0 and (step % cfg.eval_every == 0
                                                     or step == max_steps):
                model.eval()
                with torch.no_grad(), autocast(device, dtype):
                    metrics.write(step, "val", task.evaluate(model, step))
            if dist.main and cfg.sample_every > 0 and step % cfg.sample_every == 0:
                model.eval()
                with torch.no_grad():
                    task.sample(model, step, out / "samples")
            if step % cfg.save_every == 0 or step == max_steps:
                saved_ckpt = save(step) or saved_ckpt
    return TrainResult(step=step, last_loss=last_loss, checkpoint=saved_ckpt,
                       bad_steps=state["bad_steps_total"], history=history)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
