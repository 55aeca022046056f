"""Device resolution, device memory, sizes like `15GiB`, and the per-process CUDA cap."""

from __future__ import annotations

import re

import psutil
import torch

from fewshot_cli.errors import BadInput
from fewshot_cli.memory.limits import Limit, host_limits, size_text, tightest
from fewshot_cli.runner.config import cuda_preset

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'15GiB', '512MiB', '16GB', '1.5e9' to bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise BadInput(f"--memory-budget {text!r} is not a size; write it like 15GiB, 512MiB or 16GB.")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise BadInput(f"--memory-budget must be positive, not {text!r}.")
    return int(value)


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda, then mps, then cpu; an explicit device that is not there is a BadInput."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_available():
            raise BadInput("--device mps was asked for, but this machine has no usable Apple MPS device.")
        return torch.device("mps")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise BadInput(f"--device {name} was asked for, but torch sees no CUDA device on this machine.")
        index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise BadInput(f"--device {name} was asked for, but only {torch.cuda.device_count()} CUDA "
                           f"device(s) exist.")
        return torch.device("cuda", index)
    raise BadInput(f"Unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps.")


def device_memory_bytes(device: torch.device) -> int:
    """Total memory the device offers: the card's for CUDA, the machine's RAM for CPU and MPS (unified)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory())
    return int(psutil.virtual_memory().total)


def device_preset(device: torch.device) -> str:
    """The preset that suits a device: by kind, and for CUDA by its memory."""
    if device.type == "mps":
        return "mps"
    if device.type == "cuda":
        return cuda_preset(device_memory_bytes(device))
    return "cpu"


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
        from fewshot_cli.plan import CUDA_CONTEXT  # plan imports torch's tracing machinery: only on CUDA

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


def describe(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"device": str(device), "memory_bytes": device_memory_bytes(device)}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info
