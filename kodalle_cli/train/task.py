"""What the shared trainer (:mod:`.trainer`) trains, and the settings it trains it with:
:class:`Task` (subclassed by the DALLE, VQGAN and reranker tasks) and :class:`TrainerConfig`
(which :meth:`Task.make_optimizer` reads). Checkpoints (:mod:`.checkpoint`) and the loop both
take a Task; neither imports the other for it.

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
    task.evaluate(model, step)            -> {name: float}, rank 0 only (every rank under
                                          FSDP: call the model's forward), under no_grad
                                          and eval mode (e.g. validation loss); default {}
    task.sample(model, step, out_dir)     rank 0 only, e.g. a PNG grid in out_dir; returns
                                          the grid's path (logged as an image to the --log
                                          dashboards) or None. Default none (not called
                                          under FSDP)
    task.shard_units(model)               FSDP: the submodules sharded one by one (e.g. the
                                          transformer blocks) before the whole model; each
                                          must be entered through its forward. Default []
    task.after_step(model, step, optimizer)  after each optimizer step taken (finite loss),
                                          `step` counted after it: task-owned updates (a
                                          second optimizer such as a GAN discriminator's,
                                          codebook restarts). Returns {name: float|tensor}
                                          logged with the step's metrics, or None
    task.save_extra(ckpt_dir) / task.load_extra(ckpt_dir)   more files in a checkpoint
                                          (e.g. that second optimizer); load_extra is called
                                          on resume, after the weights and the optimizer
    task.epoch_samples                    samples per epoch (for --epochs), or None
    task.data_metrics                     {name: number} about the data (bad samples skipped),
                                          written to metrics.csv (split "data", step 0)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from kodalle_cli.configs import DalleTrainConfig


class Task:
    """What is trained. See the module docstring for the contract."""

    model: nn.Module
    epoch_samples: int | None = None
    data_metrics: dict = {}  # {name: number} about the data, e.g. bad samples skipped

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
        # fused AdamW on CUDA and on the CPU: one pass over each tensor (on 2 CPU cores a
        # step over multilingual-e5-small's 96M-value token table takes 0.05 s instead of
        # the default foreach kernels' 0.8 s)
        fused = cfg.device_type in ("cuda", "cpu")
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

    def sample(self, model: nn.Module, step: int, out_dir: Path) -> Path | None:
        return None

    def after_step(self, model: nn.Module, step: int, optimizer) -> dict | None:
        return None

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return []

    def save_extra(self, ckpt_dir: Path) -> None:
        return None

    def load_extra(self, ckpt_dir: Path) -> None:
        return None


@dataclass
class TrainerConfig:
    """The loop's settings. :meth:`from_options` takes them by name from a command's config.
    A setting the loop shares with `kodalle train` has that command's default (its one place:
    :class:`~kodalle_cli.configs.DalleTrainConfig`, with its help); the VQGAN and the reranker
    give their own values."""

    out: Path
    lr: float = DalleTrainConfig.lr
    weight_decay: float = DalleTrainConfig.weight_decay
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = DalleTrainConfig.schedule  # cosine | constant (after warm-up)
    warmup_steps: int = DalleTrainConfig.warmup_steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_steps: int | None = DalleTrainConfig.max_steps
    epochs: float | None = DalleTrainConfig.epochs
    batch_size: int = DalleTrainConfig.batch_size  # per rank, per micro-step
    grad_accum: int = DalleTrainConfig.grad_accum
    grad_clip: float = DalleTrainConfig.grad_clip  # 0: no clipping
    precision: str = DalleTrainConfig.precision
    device: str = DalleTrainConfig.device
    compile: bool = DalleTrainConfig.compile
    strategy: str = DalleTrainConfig.strategy  # ddp | fsdp (see kodalle_cli.train.dist)
    seed: int = DalleTrainConfig.seed
    save_every: int = DalleTrainConfig.save_every
    keep_last: int = DalleTrainConfig.keep_last
    eval_every: int = DalleTrainConfig.eval_every
    sample_every: int = DalleTrainConfig.sample_every
    log_every: int = DalleTrainConfig.log_every
    log: tuple[str, ...] = ("csv",)  # --log: csv and the dashboards (train/loggers.py)
    max_bad_steps: int = DalleTrainConfig.max_bad_steps
    resume: bool = DalleTrainConfig.resume  # also implied by an existing checkpoint in `out`
    progress: bool = DalleTrainConfig.progress
    memory_hint: str = "--batch-size (with --grad-accum to keep the effective batch)"
    device_type: str = field(default="cpu", init=False)

    def __post_init__(self):
        self.log = tuple(self.log)

    @classmethod
    def from_options(cls, options, **overrides) -> TrainerConfig:
        """The settings ``options`` (a command's config) has under the loop's names, with
        ``overrides`` on top."""
        taken = {f.name: getattr(options, f.name) for f in fields(cls)
                 if f.init and hasattr(options, f.name)}
        return cls(**{**taken, **overrides})
