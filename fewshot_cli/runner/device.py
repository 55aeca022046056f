"""Device resolution: `--device` to a torch device, and the preset that suits it."""

from __future__ import annotations

import re

import torch

from fewshot_cli.errors import BadInput
from fewshot_cli.memory.devices import device_memory_bytes
from fewshot_cli.runner.config import cuda_preset


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


def device_preset(device: torch.device) -> str:
    """The preset that suits a device: by kind, and for CUDA by its memory."""
    if device.type == "mps":
        return "mps"
    if device.type == "cuda":
        return cuda_preset(device_memory_bytes(device))
    return "cpu"


def describe(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"device": str(device), "memory_bytes": device_memory_bytes(device)}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info
