"""Memory probes cheap enough for every step, OOM recognition and the clean-up after one."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import sys
import time
from pathlib import Path

import psutil
import torch

MiB = 1024 * 1024
_PROCESS = psutil.Process(os.getpid())
# std::bad_alloc is what C++ code in torch raises when `new` fails
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "mps backend out of memory",
                "std::bad_alloc")
# all oneDNN says when it cannot build a kernel, whether an allocation failed or the kernel is unsupported
_ONEDNN_FAILED = "could not create a primitive"


_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def probe(device: torch.device) -> dict[str, float]:
    """`rss_mb` always, and on Linux `rss_peak_mb`, the peak since the last probe; with data-loading workers alive,
    their summed PSS and the PSS of this process plus them; CUDA allocated/reserved and their peaks since the last
    probe; MPS allocated and driver memory."""
    mem = {"rss_mb": round(_PROCESS.memory_info().rss / MiB, 2)}
    peak = rss_peak_bytes(reset=True)
    if peak is not None:
        mem["rss_peak_mb"] = round(peak / MiB, 2)
    mem.update(workers_memory())
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


def workers_memory() -> dict[str, float]:
    """`workers_pss_mb`: the proportional set size summed over this process's worker processes (pages they share
    with it or each other counted once in all), and `total_pss_mb`: this process's PSS plus theirs, the series
    leaks are judged on. Nothing without workers, or where PSS cannot be read (it needs /proc/PID/smaps)."""
    return _WORKERS.read()


class _WorkersPss:
    """PSS costs a page-table walk (measured 18-21 ms for a process with torch loaded, 3.5 GB of address space),
    so it is read again only after 50 times its last cost (at most 2% of the time), or when the workers change."""

    def __init__(self) -> None:
        self.value: dict[str, float] = {}
        self.pids: set[int] = set()
        self.next_at = 0.0

    def read(self) -> dict[str, float]:
        # the workers DataLoader started, without scanning every process of the machine
        pids = {child.pid for child in multiprocessing.active_children() if child.pid is not None}
        now = time.perf_counter()
        if pids and (pids != self.pids or now >= self.next_at):
            try:
                workers = sum(_pss(pid) for pid in pids)
                self.value = {"workers_pss_mb": round(workers / MiB, 2),
                              "total_pss_mb": round((_pss(os.getpid()) + workers) / MiB, 2)}
            except (psutil.AccessDenied, AttributeError, OSError):  # no PSS on this system
                self.value = {}
            self.next_at = time.perf_counter() + 50 * (time.perf_counter() - now)
        self.pids = pids
        return dict(self.value) if pids else {}


def _pss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_full_info().pss
    except psutil.NoSuchProcess:  # a worker that just ended
        return 0


_WORKERS = _WorkersPss()


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
    which freed tensors stay in the heap: the process then holds 18-43% more than its live tensors, unplanned
    (results/plan_accuracy.md). Every CPU run does this, so that the run a user starts is the run the plan
    describes. Under an address-space limit glibc's per-thread arenas (64 MiB of address space each) are capped at
    two, as `memory.limits.ADDRESS_SPACE_RESERVE` was measured."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        _RETURNED.append(bool(libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)))
        if memory_headroom() != float("inf"):
            libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc
        pass


def freed_memory_returned() -> bool:
    """Whether this process gives freed CPU tensors back to the system (`return_freed_memory` took effect), as a
    CPU plan assumes; without it a run's resident set exceeds the plan (results/plan_accuracy.md)."""
    return any(_RETURNED)


_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
_RETURNED: list[bool] = []  # mallopt's answers in this process (1: done)


def is_oom(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, MPS's RuntimeError and the CPU allocator's failure all count; oneDNN's failure to
    build a kernel counts when memory is short (and then turns oneDNN off: see `_onednn_out_of_memory`)."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error).lower()
    if _ONEDNN_FAILED in text:
        return _onednn_out_of_memory()
    return any(m in text for m in _OOM_MARKERS)


def _onednn_out_of_memory() -> bool:
    """Whether oneDNN's "could not create a primitive" is taken for an allocation failure: true when the process
    runs under an address-space limit or the system's commit limit (the only limits under which an allocation
    fails on Linux rather than the process being killed). How close to the limit it was says nothing: the
    allocation that failed may be a convolution's workspace of hundreds of MiB (measured on an AMD EPYC: triplet-
    train's 128-frame clips at 192 px failed with more than 64 MiB still free). With no limit it is a kernel
    oneDNN does not support, and an error.

    Such a failure is sticky: oneDNN's kernel assembler (Xbyak) keeps its error for the thread, so every kernel
    built later fails the same way, whatever the memory (measured: a convolution of 8 channels still failed with
    the address-space limit lifted, and ran in a new thread). oneDNN is therefore turned off for the rest of the
    process: the retried step runs on torch's own CPU kernels, which allocate through torch's allocator."""
    if memory_headroom() == float("inf"):
        return False
    torch.backends.mkldnn.enabled = False
    return True


def memory_headroom() -> float:
    """Bytes this process can still map before an allocation fails: below its RLIMIT_AS soft limit and, under
    strict overcommit (vm.overcommit_memory=2), below the system's commit limit; infinite with neither."""
    room = float("inf")
    try:
        import resource  # not on Windows

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            room = soft - _PROCESS.memory_info().vms
        if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "2":
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            commit = (int(info["CommitLimit"].split()[0]) - int(info["Committed_AS"].split()[0])) * 1024
            room = min(room, commit)
    except (ImportError, OSError, KeyError, ValueError):
        pass
    return room


def release(device: torch.device) -> None:
    """Give back what a failed step held: collect garbage, then empty the device's cache."""
    gc.collect()
    empty_cache(device)


def empty_cache(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back to the driver (CUDA, MPS); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
