"""Fault injection for testing the runner end to end through the CLI: the faults a test asks for, read once when a
run is launched (from environment variables) into the run's context. A normal run has none (`RunContext.faults`
is None), and nothing in its steps reads the environment.

FEWSHOT_SIMULATE_OOM="KNOB>N": a training step's micro-steps raise an out-of-memory error while the knob is above N
  (with FEWSHOT_SIMULATE_OOM_RANK="R" under torchrun, on rank R only); "PHASE:KNOB>N" (PHASE `val` or `test`):
  each part of that evaluation raises instead, while its knob is above N; "pretrain:KNOB>N": the micro-steps of
  pre-training's steps (mahalanobis-train's --pretrain-epochs) raise.
FEWSHOT_SIMULATE_LEAK_MB="N": every training step keeps N MiB alive for the rest of the run, on the run's device.
FEWSHOT_SIMULATE_SLOW_READ_S="S": every image the data loader reads takes S seconds longer (an input-bound run).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Faults:
    """The faults asked for: an out-of-memory error in `oom_phase` while the run's knob `oom_knob` is above
    `oom_above`, `leak_mb` kept alive per training step, `slow_read_s` added to each image read. The simulated
    error is torch's own `OutOfMemoryError`, so it takes the path a real one takes (`is_oom`, release, back-off)."""

    knobs: Any = None  # the run's config, whose knob `oom_knob` is read as back-off changes it
    oom_phase: str = "train"
    oom_knob: str | None = None
    oom_above: int = 0
    leak_mb: float = 0.0
    slow_read_s: float = 0.0
    kept: list[torch.Tensor] = field(default_factory=list, repr=False)

    @classmethod
    def requested(cls, environ: Mapping[str, str], knobs: Any, rank: int = 0) -> Faults | None:
        """The faults the FEWSHOT_SIMULATE_* variables of `environ` ask of this rank; None where none."""
        rule = environ.get("FEWSHOT_SIMULATE_OOM", "")
        oom_rank = environ.get("FEWSHOT_SIMULATE_OOM_RANK")
        if oom_rank is not None and int(oom_rank) != rank:
            rule = ""
        faults = cls(knobs, leak_mb=float(environ.get("FEWSHOT_SIMULATE_LEAK_MB", "0") or 0),
                     slow_read_s=float(environ.get("FEWSHOT_SIMULATE_SLOW_READ_S", "0") or 0))
        if rule:
            phase, _, condition = rule.rpartition(":")
            name, above = condition.split(">")
            faults.oom_phase, faults.oom_knob, faults.oom_above = phase or "train", name.strip(), int(above)
        return faults if faults.oom_knob or faults.leak_mb or faults.slow_read_s else None

    def oom(self, phase: str) -> None:
        """In a micro-step (`train`) or an evaluation part: raise while the knob is above its bound."""
        if self.oom_knob is None or phase != self.oom_phase:
            return
        if getattr(self.knobs, self.oom_knob) > self.oom_above:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {self.oom_knob} above {self.oom_above})")

    def leak(self, device: torch.device | str = "cpu") -> None:
        """Before a training step: keep `leak_mb` more alive."""
        if self.leak_mb:
            self.kept.append(torch.ones(int(self.leak_mb * 1024 * 1024 / 4), device=device))

    def read(self) -> None:
        """As the data loader reads an image (in whichever process reads it)."""
        if self.slow_read_s:
            time.sleep(self.slow_read_s)

    def __getstate__(self) -> dict[str, Any]:  # a loader's worker needs the read delay only
        return {**self.__dict__, "kept": [], "knobs": None}
