"""A device's memory, the limits a run on it is held to, and the per-process CUDA cap."""

from __future__ import annotations

import psutil
import torch

from fewshot_cli.errors import BadInput
from fewshot_cli.memory.limits import Limit, host_limits, size_text, tightest
from fewshot_cli.memory.terms import CUDA_CONTEXT


def device_memory_bytes(device: torch.device) -> int:
    """Total memory the device offers: the card's for CUDA, the machine's RAM for CPU and MPS (unified)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory())
    return int(psutil.virtual_memory().total)


def memory_limits(device: torch.device, budget: int | None = None) -> list[Limit]:
    """Every bound on the memory a run on `device` may use, each with its source: on the CPU the machine's
    available memory, a memory cgroup and the address-space limit; on CUDA the card's memory and, on a shared card,
    what the other processes leave of it; on MPS the recommended maximum; and `--memory-budget`."""
    if device.type == "cpu":
        found = host_limits()
    elif device.type == "cuda":
        total = device_memory_bytes(device)
        found = [Limit(total, "device", f"{torch.cuda.get_device_name(device)}'s memory")]
        free, _ = torch.cuda.mem_get_info(device)
        # this process's own context is in use already; the plan counts it (cuda_context)
        others = total - free - torch.cuda.memory_reserved(device) - CUDA_CONTEXT
        if others > 256 * 1024**2:
            found.append(Limit(total - others, "device_free",
                               f"this card's memory less the {size_text(others)} other processes hold"))
    else:
        found = [Limit(device_memory_bytes(device), "device", "the MPS device's recommended maximum")]
    if budget is not None:
        found.append(Limit(budget, "budget", "--memory-budget"))
    return found


def memory_limit(device: torch.device, budget: int | None = None) -> tuple[Limit, list[Limit]]:
    """The limit a run on `device` is held to, and every bound found; a budget above another limit is bad input."""
    found = memory_limits(device, budget)
    system = tightest([limit for limit in found if limit.source != "budget"])
    if budget is not None and budget > system.bytes:
        raise BadInput(f"--memory-budget {size_text(budget)} is above {system.text}, {size_text(system.bytes)}; "
                       "give at most that, or leave --memory-budget out.")
    return tightest(found), found


def cap_memory(device: torch.device, budget_bytes: int) -> None:
    """On CUDA, cap this process to the budget, so a big card proves a run fits a small one."""
    if device.type == "cuda":
        fraction = min(1.0, budget_bytes / device_memory_bytes(device))
        torch.cuda.set_per_process_memory_fraction(fraction, device)
