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
    task.sample(model, step, out_dir)     rank 0 only, e.g. a PNG grid in out_dir; default
                                          none (not called under FSDP)
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


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

    def sample(self, model: nn.Module, step: int, out_dir: Path) -> None:
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
    strategy: str = "ddp"  # ddp | fsdp (see kodalle_cli.train.dist)
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
