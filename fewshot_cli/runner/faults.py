"""Fault injection for testing the runner end to end through the CLI (set by environment variables only).

FEWSHOT_SIMULATE_OOM="KNOB>N": a training step's micro-steps raise an out-of-memory error while the knob is above N
  (with FEWSHOT_SIMULATE_OOM_RANK="R" under torchrun, on rank R only); "PHASE:KNOB>N" (PHASE `val` or `test`):
  each part of that evaluation raises instead, while its knob is above N.
FEWSHOT_SIMULATE_LEAK_MB="N": every training step keeps N MiB alive for the rest of the run, on the run's device.
FEWSHOT_SIMULATE_SLOW_READ_S="S": every image the data loader reads takes S seconds longer (an input-bound run).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

_kept: list[torch.Tensor] = []


def in_micro_step(cfg: Any) -> None:
    _simulate_oom(cfg, "train")


def in_evaluation(cfg: Any, phase: str) -> None:
    _simulate_oom(cfg, phase)


def _simulate_oom(cfg: Any, phase: str) -> None:
    rule = os.environ.get("FEWSHOT_SIMULATE_OOM")
    rank = os.environ.get("FEWSHOT_SIMULATE_OOM_RANK")
    if rule and (rank is None or rank == os.environ.get("RANK", "0")):
        rule_phase, _, rule = rule.rpartition(":")
        name, limit = rule.split(">")
        if (rule_phase or "train") == phase and getattr(cfg, name.strip()) > int(limit):
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {name.strip()} above {limit})")


def before_step(cfg: Any, device: torch.device | str = "cpu") -> None:
    leak_mb = float(os.environ.get("FEWSHOT_SIMULATE_LEAK_MB", "0") or 0)
    if leak_mb:
        _kept.append(torch.ones(int(leak_mb * 1024 * 1024 / 4), device=device))


def in_read() -> None:
    delay = float(os.environ.get("FEWSHOT_SIMULATE_SLOW_READ_S", "0") or 0)
    if delay:
        time.sleep(delay)
