"""Memory probes cheap enough for every step, OOM recognition and the clean-up after one."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from pathlib import Path

import psutil
import torch

MiB = 1024 * 1024
_PROCESS = psutil.Process(os.getpid())
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "mps backend out of memory")


_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def probe(device: torch.device) -> dict[str, float]:
    """`rss_mb` always, and on Linux `rss_peak_mb`, the peak since the last probe; CUDA allocated/reserved and
    their peaks since the last probe; MPS allocated and driver memory."""
    mem = {"rss_mb": round(_PROCESS.memory_info().rss / MiB, 2)}
    peak = rss_peak_bytes(reset=True)
    if peak is not None:
        mem["rss_peak_mb"] = round(peak / MiB, 2)
    if device.type == "cuda":
        mem["cuda_allocated_mb"] = round(torch.cuda.memory_allocated(device) / MiB, 2)
        mem["cuda_reserved_mb"] = round(torch.cuda.memory_reserved(device) / MiB, 2)
        mem["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / MiB, 2)
        mem["cuda_reserved_peak_mb"] = round(torch.cuda.max_memory_reserved(device) / MiB, 2)
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "mps":
        mem["mps_allocated_mb"] = round(torch.mps.current_allocated_memory() / MiB, 2)
        mem["mps_driver_mb"] = round(torch.mps.driver_allocated_memory() / MiB, 2)
    return mem


def rss_peak_bytes(reset: bool = False) -> int | None:
    """The process's peak resident set (Linux's VmHWM) since start or the last reset; None where there is none.
    Writing 5 to /proc/self/clear_refs resets that peak to the current resident set."""
    try:
        line = next(x for x in _STATUS.read_text().splitlines() if x.startswith("VmHWM:"))
        peak = int(line.split()[1]) * 1024
        if reset:
            _CLEAR_REFS.write_text("5")
    except (OSError, StopIteration, ValueError):
        return None
    return peak


def return_freed_memory(device: torch.device) -> None:
    """On the CPU under glibc, give every tensor of 128 KiB or more its own mapping, returned to the system when the
    tensor is freed. glibc's default raises that threshold (up to 32 MiB) whenever such a block is freed, after
    which freed tensors stay in the heap: the process then holds 20-70% more than its live tensors, unplanned
    (results/plan_accuracy.md); with the threshold fixed, the resident set follows the plan, at a cost in time
    (freed pages are mapped and zeroed afresh), so the runner does this only under a memory budget."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc
        pass


_M_MMAP_THRESHOLD = -3


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
