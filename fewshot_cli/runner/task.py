"""What the runner asks of an experiment: its model, one training step, one evaluation, its state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from fewshot_cli.errors import RunFailed
from fewshot_cli.runner import faults
from fewshot_cli.runner.command import Command as Command  # declared without torch; imported here as before
from fewshot_cli.runner.distributed import StepFailedElsewhere
from fewshot_cli.runner.memory import is_oom

P = TypeVar("P")


def step_seed(seed: int, step: int) -> int:
    """The torch seed of one training step: a pure function of (seed, step), so resume replays exactly."""
    return int(np.random.SeedSequence([seed, 77, step]).generate_state(1)[0])


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
    #: data-parallel on CUDA, BatchNorm normalises over every rank's share of a batch (a batch is one part);
    #: episodic tasks leave it off, since each episode is a part of its own
    sync_batchnorm: ClassVar[bool] = False
    _ddp: Any = None
    #: what the task loaded as pretrained weights (each `models.weights.Pretrained.record`), for config.json
    loaded_weights: tuple[dict[str, Any], ...] = ()

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

    # ------------------------------------------------------------------ one step's gradients, in one process or many

    def accumulate(self, step: int, parts: int, micro_steps: Callable[[int], Sequence[P]],
                   compute: Callable[[int, P], tuple[torch.Tensor, dict[str, float]]]) -> dict[str, float]:
        """Accumulate step `step`'s gradient over its `parts` parts (episodes, or a batch's rank shares).

        Part j's work is `micro_steps(j)` (the gradient accumulation's slices of it); `compute(j, m)` returns a
        micro-step's loss, already weighted by its share of the whole step, and figures that add up (weighted
        losses, counts). Returns those figures summed over the step. Part j draws its random numbers from
        `step_seed(seed, step) + j`, and with several parts each starts from the step's BatchNorm running
        statistics, which end as the mean of the parts' (a part's result does not depend on the others).

        Data-parallel, rank r computes parts r, r + N, ... under DistributedDataParallel, which sums the gradients
        across ranks in the last micro-step's backward; the figures and statistics are summed likewise, so N ranks
        give one process's step. A rank out of memory still meets the all-reduce, and every rank then raises
        StepFailedElsewhere, so all of them back off together."""
        group, ddp = self.ctx.distributed, self._ddp
        mine = self.my_share(list(range(parts)))
        stats = _RunningStats(self.model) if parts > 1 or group is not None else None
        figures: dict[str, float] = {}
        synced = in_synced_backward = False
        failure: str | None = None
        try:
            for position, j in enumerate(mine):
                torch.manual_seed(step_seed(self.ctx.seed, step) + j)
                if stats is not None:
                    stats.restore()
                work = list(micro_steps(j))
                for k, item in enumerate(work):
                    last = position == len(mine) - 1 and k == len(work) - 1
                    with nullcontext() if ddp is None or last else ddp.no_sync():
                        faults.in_micro_step(self.cfg)
                        loss, values = compute(j, item) if ddp is None else ddp(compute, j, item)
                        in_synced_backward = ddp is not None and last
                        loss.backward()
                        synced = in_synced_backward
                    for name, value in values.items():
                        figures[name] = figures.get(name, 0.0) + float(value)
                if stats is not None:
                    stats.add()
        except Exception as err:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if stats is not None:  # a retried step starts from the statistics this one started from
                stats.restore()
            if group is None or not is_oom(err):
                raise
            if in_synced_backward:  # part of the all-reduce ran; the ranks cannot meet again in this step
                raise RunFailed(f"out of memory inside the gradient all-reduce of step {step} on rank "
                                f"{group.rank}; resume the run with a smaller configuration") from None
            failure = str(err).splitlines()[0]
        if group is not None:
            if not synced:  # no part here (a short last step), or out of memory: meet the all-reduce
                # with a zero gradient for the model's first parameter (the backbone's input layer, which every
                # part uses); the rest count as unused here and add nothing
                first = next(p for p in self.model.parameters() if p.requires_grad)
                ddp(lambda: first.sum() * 0.0).backward()
            if group.any(failure is not None):
                self.model.zero_grad(set_to_none=True)
                if stats is not None:
                    stats.restore()
                raise StepFailedElsewhere(failure or "another rank ran out of memory in this step")
            figures = group.sum(figures)
        if stats is not None:
            stats.merge(parts, group)
        return figures

    def my_share(self, items: list[Any]) -> list[Any]:
        """This rank's share of a list (items rank, rank + N, ...); the whole list in one process."""
        group = self.ctx.distributed
        return items if group is None else items[group.rank::group.world_size]

    def all_sum(self, figures: dict[str, float]) -> dict[str, float]:
        """Figures that add up across ranks (counts, sums), summed over all ranks."""
        group = self.ctx.distributed
        return dict(figures) if group is None else group.sum(figures)

    def wrap_data_parallel(self) -> None:
        """Called by the runner under torchrun, once the model is built and any checkpoint loaded."""
        group = self.ctx.distributed
        if group is not None:
            self._ddp = group.wrap(self.model, sync_batchnorm=self.sync_batchnorm)

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


class _RunningStats:
    """A model's buffers (BatchNorm running statistics and counters) over one step's parts: each part starts from
    the step's values; the step ends with the mean of the parts' statistics (summed in float64) and the counters
    one part leaves (every part counts alike)."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = list(model.buffers())
        self.start = [b.detach().clone() for b in self.buffers]
        self.total = [torch.zeros_like(b, dtype=torch.float64) if b.is_floating_point() else b.detach().clone()
                      for b in self.buffers]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, start in zip(self.buffers, self.start, strict=True):
                buffer.copy_(start)

    def add(self) -> None:
        for total, buffer in zip(self.total, self.buffers, strict=True):
            if buffer.is_floating_point():
                total.add_(buffer.detach())
            else:
                total.copy_(buffer.detach())

    def merge(self, parts: int, group: Any) -> None:
        if not self.buffers:
            return
        if group is not None:  # a rank with no part holds the start counters, never above the others'
            group.reduce_tensors([t for t in self.total if t.is_floating_point()], "sum")
            group.reduce_tensors([t for t in self.total if not t.is_floating_point()], "max")
        with torch.no_grad():
            for buffer, total in zip(self.buffers, self.total, strict=True):
                buffer.copy_(total / parts if buffer.is_floating_point() else total)
