"""The machine a run is on (`fewshot env`) and every command's presets side by side (`fewshot presets`)."""

from __future__ import annotations

from typing import Any

import psutil
import torch

from fewshot_cli.memory.devices import memory_limit, memory_limits
from fewshot_cli.memory.limits import size_text
from fewshot_cli.runner.opening import versions


def environment() -> dict[str, Any]:
    info: dict[str, Any] = dict(versions())
    info["cpu_count"] = psutil.cpu_count()
    info["ram_bytes"] = psutil.virtual_memory().total
    info["cuda_devices"] = [{"index": i, "name": torch.cuda.get_device_name(i),
                             "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    info["mps_available"] = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    devices = [torch.device("cpu"), *(torch.device("cuda", i) for i in range(len(info["cuda_devices"])))]
    info["memory_limits"] = {str(device): [limit.record() for limit in memory_limits(device)] for device in devices}
    limit, _ = memory_limit(torch.device("cpu"))
    info["memory_limit_cpu"] = f"{size_text(limit.bytes)}: {limit.text}"
    return info


def render_presets(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    out = []
    for command, presets in table.items():
        names = list(presets)
        knobs = sorted({k for values in presets.values() for k in values})
        width = max(len(n) for n in [*names, *(str(v) for values in presets.values() for v in values.values())]) + 2
        out.append(f"{command}")
        out.append("  " + f"{'knob':<24}" + "".join(f"{n:>{width}}" for n in names))
        for k in knobs:
            out.append("  " + f"{k:<24}" + "".join(f"{str(presets[n].get(k, '')):>{width}}" for n in names))
        out.append("")
    return "\n".join(out)
