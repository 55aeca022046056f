"""`--amp`, in one place: each device's autocast dtype, the autocast context, and the loss scaling fp16 needs."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype for --amp on this device, or None for full precision: bf16 on CPUs and on GPUs that
    compute in it (compute capability 8 and up), fp16 on older GPUs (a T4) and on MPS."""
    if not amp:
        return None
    if device.type == "cuda":  # emulated bf16 (a T4's) is slower than float32: fp16 there
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16


def autocast(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to `dtype` on this device type; with None, a context that changes nothing."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling where fp16's small gradients would underflow; for bf16 and float32 a scaler that passes the
    loss and the optimiser's step through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
