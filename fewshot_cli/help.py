"""What `--help` shows of an option: its panel, and a knob's value at a preset, without torch."""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import shutil
import subprocess
import sys

from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import cuda_preset

RUN, DATA, MODEL, MEMORY = "Run", "Data and episodes", "Model", "Memory"
PANEL_ORDER = (RUN, DATA, MODEL, MEMORY)
#: the panel of an option by its name; a shared option not listed is a Run option, a knob not listed a Model one
#: (unless its field names a `panel`)
PANELS = {
    "data": DATA, "memory_budget": MEMORY, "force": MEMORY,
    "val_every": RUN, "val_episodes": RUN, "checkpoint_every": RUN, "cache_dir": RUN,
    "episodes": DATA, "episodes_per_step": DATA, "test_episodes": DATA, "epochs": DATA, "n_way": DATA,
    "k_shot": DATA, "n_query": DATA, "image_size": DATA, "workers": DATA, "clip_frames": DATA, "num_aug": DATA,
    "categories": DATA, "synthetic_classes": DATA, "dev_samples": DATA, "novel_classes": DATA,
    "batch_size": MEMORY, "triplet_batch_size": MEMORY, "checkpoint_activations": MEMORY, "amp": MEMORY,
    "frame_cache_size": MEMORY, "frame_cache_mb": MEMORY, "empty_cache_every": MEMORY, "mps_high_watermark": MEMORY,
}


#: `--amp`'s help, the same wherever a command has the knob (`runner.precision` applies it)
AMP_HELP = "mixed precision: bf16 on CPUs and on GPUs that compute in it, fp16 on older GPUs (a T4) and on MPS"


def option_panel(name: str) -> str:
    """The panel of a shared option (`--seed`, `--memory-budget`...)."""
    return PANELS.get(name, RUN)


def panel_rank(panel: str | None) -> int:
    """Where a panel comes in `--help`: Run, Data and episodes, Model, Memory, then any other."""
    return PANEL_ORDER.index(panel) if panel in PANEL_ORDER else len(PANEL_ORDER)


def knob_panel(field: dataclasses.Field) -> str:
    return field.metadata.get("panel") or PANELS.get(field.name, MODEL)


def knob_value(field: dataclasses.Field, command: Command, preset: str) -> object:
    """The value a run at `preset` gives the knob: the preset's, else the field's default."""
    return command.presets.get(preset, {}).get(field.name, field.default)


@functools.cache
def machine_preset() -> str:
    """The preset `--preset` defaults to on this machine, found without importing torch (about 1.5 s here):
    `mps` on Apple silicon, a CUDA card's by its memory as `nvidia-smi` reports it, else `cpu`."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mps"
    memory = _nvidia_memory_bytes()
    return cuda_preset(memory) if memory else "cpu"


def _nvidia_memory_bytes() -> int | None:
    """Memory of the first CUDA card this process may use, or None where there is none (or no nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    first = visible.split(",")[0].strip() if visible else "0"
    try:
        out = subprocess.run([smi, f"--id={first}", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None

