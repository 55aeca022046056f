"""What the runner asks of an evaluation-only experiment: its model, one evaluation, its output files."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from fewshot_cli.runner.task import BackoffKnob, RunContext


class EvaluationTask(ABC):
    """An experiment with no training: the runner builds it, calls `evaluate("test", 0)` once under
    `torch.inference_mode()` with `model.eval()`, then `finish(metrics)`. There are no steps, so no optimizer, no
    checkpoint and no validation; a `--resume` builds it again and evaluates again (a task that caches its work,
    as embed-classify's embedding store does, picks up where it stopped). It runs in one process."""

    #: none: an evaluation backs off with `runner.backoff.evaluation_part` on its own result-neutral knob
    backoff_knobs: ClassVar[tuple[BackoffKnob, ...]] = ()
    #: the module whose eval mode the runner sets
    model: nn.Module
    #: what the task loaded as pretrained weights (each `models.weights.Pretrained.record`), for config.json
    loaded_weights: tuple[dict[str, Any], ...] = ()

    def __init__(self, cfg: Any, ctx: RunContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.accumulation = 1  # what `evaluation_part`'s `oom_backoff` event reports: no gradient accumulation

    @abstractmethod
    def evaluate(self, phase: str, step: int) -> dict[str, float]:
        """The test metrics (`phase` is `test`, `step` 0), accumulated in bounded memory; floats, never tensors."""

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """Write the command's own output files into the run directory; may add metrics."""
        return metrics

    @abstractmethod
    def plan_phases(self) -> dict[str, Callable[[], Any]]:
        """The `test` phase's one representative forward, for the memory planner to trace under fake tensors."""

    def plan_extra_bytes(self) -> dict[str, dict[str, int]]:
        """The command's own memory terms that tracing does not see, per phase: {phase: {name: bytes}}."""
        return {}
