"""Several processes for the shared trainer: the rank a process is (:class:`Dist`), setting
up the process group from torchrun's environment, and the strategy that spreads the model
over the ranks (:func:`make_strategy`): DDP replicates it (:class:`DDPStrategy`), FSDP2
shards it (:class:`FSDPStrategy`). The trainer calls only the strategy's methods, so there
is no ``if fsdp`` in the loop; :func:`unwrap` finds the module inside the wrappers."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from kodalle_cli.device import pick_device


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

    def close(self) -> None:
        """Destroy the process group before the interpreter exits: left to teardown, gloo's
        threads can abort a finished rank ("terminate called without an active exception")."""
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on any rank (every rank gets the same answer: e.g. a
        Ctrl-C that reached only some ranks stops all of them after the same step)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` averaged over the ranks, in place."""
        if self.enabled:
            torch.distributed.all_reduce(tensor)
            tensor /= self.world_size
        return tensor


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: NCCL on GPUs, gloo on the CPU."""
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


def wrap(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks, else itself."""
    if not dist.enabled:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's gradient norm) as the full plain tensor; other tensors as they are.
    Collective for a DTensor: call it on every rank."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# ---- strategies: how the model is spread over the ranks --------------------------------------
STRATEGIES = ("ddp", "fsdp")


class DDPStrategy:
    """The model replicated on every rank (DistributedDataParallel when there are several):
    gradients all-reduced on the last micro-batch, checkpoints from rank 0's own copy.
    ``model.safetensors`` holds ``state_dict()``; ``optimizer.pt`` the optimizer's
    ``state_dict()`` (parameters keyed by their index)."""

    name = "ddp"
    forward_on_all_ranks = False  # evaluation runs on rank 0 alone
    previews = True  # rank 0 may sample preview grids from the model

    def __init__(self, dist: Dist, device: torch.device):
        self.dist, self.device = dist, device

    def shard(self, model: nn.Module, units: list[nn.Module]) -> nn.Module:
        """Before the optimizer is made: the model whose parameters it gets."""
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """What the loss calls (its forward)."""
        return wrap(model, self.dist, self.device)

    def no_sync(self, train_model: nn.Module):
        """A context for a micro-batch whose gradients are not synchronised yet."""
        return train_model.no_sync() if self.dist.enabled else contextlib.nullcontext()

    def model_state(self, model: nn.Module) -> dict | None:
        """The full weights (CPU) on rank 0, None on the others. Call it on every rank."""
        if not self.dist.main:
            return None
        return {k: v.detach().to("cpu").contiguous()
                for k, v in unwrap(model).state_dict().items()}

    def optimizer_state(self, model: nn.Module, optimizer) -> dict | None:
        """What ``optimizer.pt`` holds, on rank 0 (None on the others); every rank calls it."""
        return optimizer.state_dict() if self.dist.main else None

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


class FSDPStrategy(DDPStrategy):
    """The model sharded over the ranks with FSDP2 (``fully_shard``): each unit (a
    transformer block, from :meth:`Task.shard_units`) and then the root hold 1/world of the
    parameters, gradients and optimizer state, all-gathered for a unit's forward and
    backward and reduce-scattered after it. For models too big for one GPU.

    Checkpoints are the same files as DDP's, gathered on every rank and written by rank 0:
    ``model.safetensors`` the full weights (the same keys, so ``kodalle sample`` and a DDP
    run read it), ``optimizer.pt`` the full optimizer state keyed by parameter name
    (``get_optimizer_state_dict(..., full_state_dict=True)``), which resumes on any number
    of ranks but only under ``--strategy fsdp``. Every forward is a collective, so
    evaluation runs on every rank and no preview grids are sampled during training."""

    name = "fsdp"
    forward_on_all_ranks = True
    previews = False

    def shard(self, model: nn.Module, units: list[nn.Module]) -> nn.Module:
        if not self.dist.enabled:  # one process: nothing to shard over
            return model
        from torch.distributed.fsdp import fully_shard

        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, train_model: nn.Module):
        if not self.dist.enabled:
            return contextlib.nullcontext()
        return _fsdp_no_sync(unwrap(train_model))

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # one process (no process group): the state is whole already, and loading a "full"
        # state dict would need a process group
        return StateDictOptions(full_state_dict=self.dist.enabled, **kw)

    def model_state(self, model: nn.Module) -> dict | None:
        if not self.dist.enabled:
            return super().model_state(model)
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(unwrap(model), options=self._options(cpu_offload=True))
        return {k: v.contiguous() for k, v in sd.items()} if self.dist.main else None

    def optimizer_state(self, model: nn.Module, optimizer) -> dict | None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        sd = get_optimizer_state_dict(
            unwrap(model), optimizer,
            options=self._options(cpu_offload=self.dist.enabled))
        return sd if self.dist.main else None

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, optim_state_dict=state,
                                 options=self._options())


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    """FSDP2's no_sync: gradients stay unsharded and unreduced until the last micro-batch."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def make_strategy(name: str, dist: Dist, device: torch.device) -> DDPStrategy:
    """``ddp`` or ``fsdp`` (see :data:`STRATEGIES`)."""
    strategies = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}
    if name not in strategies:
        from kodalle_cli.errors import UsageError

        raise UsageError(f"--strategy {name}: choose one of {', '.join(STRATEGIES)}")
    return strategies[name](dist, device)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)
