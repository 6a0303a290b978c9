"""Device and precision choice, in one place for every command."""

from __future__ import annotations

import contextlib

import torch

from kodalle_cli.errors import UsageError


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available")
    if name.split(":")[0] not in {"cpu", "cuda"}:
        raise UsageError(f"unknown --device {name!r} (auto|cpu|cuda)")
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that have it, fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision not in table:
        raise UsageError(f"unknown --precision {precision!r} (auto|bf16|fp16|fp32)")
    if table[precision] is torch.float16 and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return table[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for ``dtype`` (a no-op for fp32)."""
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
