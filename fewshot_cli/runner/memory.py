"""Memory probes cheap enough for every step, OOM recognition and the clean-up after one."""

from __future__ import annotations

import gc
import os

import psutil
import torch

MiB = 1024 * 1024
_PROCESS = psutil.Process(os.getpid())
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "mps backend out of memory")


def probe(device: torch.device) -> dict[str, float]:
    """`rss_mb` always; CUDA allocated/reserved/peak since the last probe; MPS allocated and driver memory."""
    mem = {"rss_mb": round(_PROCESS.memory_info().rss / MiB, 2)}
    if device.type == "cuda":
        mem["cuda_allocated_mb"] = round(torch.cuda.memory_allocated(device) / MiB, 2)
        mem["cuda_reserved_mb"] = round(torch.cuda.memory_reserved(device) / MiB, 2)
        mem["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / MiB, 2)
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "mps":
        mem["mps_allocated_mb"] = round(torch.mps.current_allocated_memory() / MiB, 2)
        mem["mps_driver_mb"] = round(torch.mps.driver_allocated_memory() / MiB, 2)
    return mem


def is_oom(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, MPS's RuntimeError and the CPU allocator's failure all count."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MARKERS)


def release(device: torch.device) -> None:
    """Give back what a failed step held: collect garbage, then empty the device's cache."""
    gc.collect()
    empty_cache(device)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
