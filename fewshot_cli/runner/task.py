"""What the runner asks of an experiment: its model, one training step, one evaluation, its state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class BackoffKnob:
    """A knob the runner may shrink on OOM: halved down to `floor`; with `accumulate`, gradient accumulation
    doubles so the effective size stays the same."""

    name: str
    floor: int
    accumulate: bool = True


@dataclass
class RunContext:
    """What the runner hands a task: where it runs and how to speak to the log."""

    device: torch.device
    seed: int
    run_dir: Path | None
    data: Path | None = None
    emit: Callable[..., None] = field(default=lambda event, **fields: None)
    #: a `runner.distributed.Distributed` under torchrun with several processes, else None
    distributed: Any = None


class Task(ABC):
    """One experiment as the runner drives it. A command module subclasses this and nothing else of the runner.

    The runner calls, in order: `__init__` (build data and model; raise BadInput for bad data), then per step
    `train_step(step)`, `evaluate("val", step)` when `validate_now(step)`, `state_dict()` at checkpoints, and at
    the end `evaluate("test", step)` then `finish(metrics)`. Evaluation runs under `torch.inference_mode()` with
    `model.eval()`; the task returns plain floats, never tensors.
    """

    #: knobs the runner shrinks, in this order, when a step runs out of memory
    backoff_knobs: ClassVar[tuple[BackoffKnob, ...]] = ()
    #: the module whose train/eval mode the runner switches
    model: nn.Module

    def __init__(self, cfg: Any, ctx: RunContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.accumulation = 1

    @abstractmethod
    def total_steps(self) -> int:
        """How many training steps the run has."""

    @abstractmethod
    def train_step(self, step: int) -> dict[str, float]:
        """One training step (an episode, or a batch); returns at least `loss`, as floats."""

    @abstractmethod
    def evaluate(self, phase: str, step: int) -> dict[str, float]:
        """Validation (`val`) or the final test (`test`) metrics, accumulated in bounded memory."""

    def validate_now(self, step: int) -> bool:
        every = getattr(self.cfg, "val_every", 0)
        return bool(every) and step % every == 0 and step < self.total_steps()

    def set_knob(self, name: str, value: int, accumulation: int) -> None:
        """Apply an OOM back-off: the knob's new (per-micro-step) value and the gradient accumulation."""
        setattr(self.cfg, name, value)
        self.accumulation = accumulation

    # ------------------------------------------------------------------ data parallel (no-ops in one process)

    def micro_steps(self) -> int:
        """How many micro-steps one step's work is split into across all ranks: the gradient accumulation, and at
        least one per rank."""
        group = self.ctx.distributed
        return max(self.accumulation, group.world_size if group is not None else 1)

    def my_share(self, parts: list[Any]) -> list[Any]:
        """This rank's micro-steps of a step's `micro_steps()` parts: parts rank, rank + N, ..."""
        group = self.ctx.distributed
        return parts if group is None else parts[group.rank::group.world_size]

    def sync_gradients(self) -> None:
        """Sum the gradients of every rank's micro-steps; call after the last backward, before clipping or
        stepping the optimizer. Loss weights stay those of the whole step (a micro-step's share of it)."""
        if self.ctx.distributed is not None:
            self.ctx.distributed.sync_gradients(self.model)

    def all_sum(self, figures: dict[str, float]) -> dict[str, float]:
        """Figures that add up across ranks (share-weighted losses, counts), summed over all ranks."""
        group = self.ctx.distributed
        return dict(figures) if group is None else group.sum(figures)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model.state_dict()}
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """Write the command's own output files into the run directory; may add metrics."""
        return metrics

    def plan_phases(self) -> dict[str, Callable[[], Any]]:
        """Each phase's one representative step, for the memory planner to trace under fake tensors."""
        return {"train": lambda: self.train_step(1)}

    def plan_extra_bytes(self) -> dict[str, dict[str, int]]:
        """The command's own memory terms that tracing does not see, per phase: {phase: {name: bytes}}."""
        return {}


@dataclass(frozen=True)
class Command:
    """An experiment command as the CLI sees it: its name, config, presets per preset name, and its Task."""

    name: str
    help: str
    config: type
    presets: dict[str, dict[str, Any]]
    task: type[Task]
    #: the metric a results table shows first
    primary_metric: str
    #: knobs `--preset auto` and the planner may walk, largest first, in this order
    plan_knobs: tuple[str, ...] = ()
    #: knob values `fewshot demo` uses to run the command briefly at the `cpu` preset
    demo: dict[str, Any] = field(default_factory=dict)
    #: called with the command-line knob values before torch touches the device (e.g. MPS environment)
    prepare: Callable[[dict[str, Any]], None] | None = None
