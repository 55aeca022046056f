"""What the runner asks of an experiment: its model, one training step, one evaluation, its state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from fewshot_cli.memory.guard import MemoryGuard
from fewshot_cli.runner.faults import Faults
from fewshot_cli.runner.micro import Accumulation

if TYPE_CHECKING:
    from fewshot_cli.data.loader import Feed


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
    #: a `memory.guard.MemoryGuard` where the run is held to a limit the kernel enforces by killing, else None
    guard: MemoryGuard | None = None
    #: weights that are not at hand may be left random: their values change no tensor's size (a traced copy)
    random_weights: bool = False
    #: read the data in this process, without loader workers or caches (a traced copy: worker processes cannot
    #: carry fake tensors, and a cache would hold what the plan's cache lines count already)
    in_process: bool = False
    #: the faults a test asked for (`runner.faults.Faults`), read once at launch; None in a normal run
    faults: Faults | None = None


class Task(ABC):
    """One experiment as the runner drives it. A command module subclasses this and nothing else of the runner.

    The runner calls, in order: `__init__` (build data and model; raise BadInput for bad data), `prefetch(first
    step)` (starts `feed`), then per step `train_step(step)`, `evaluate("val", step)` when `validate_now(step)`,
    `state_dict()` at checkpoints, and at the end `evaluate("test", step)` then `finish(metrics)`. Evaluation runs
    under `torch.inference_mode()` with `model.eval()`; the task returns plain floats, never tensors. A training
    step is the command's own loop over `accumulate(step, parts)`; `my_share` and `all_sum` split and add up work
    across torchrun's ranks. The planner calls `plan_phases` and `plan_extra_bytes` instead
    (docs/internals/writing-a-command.md).
    """

    #: knobs the runner shrinks, in this order, when a step runs out of memory
    backoff_knobs: ClassVar[tuple[BackoffKnob, ...]] = ()
    #: the module whose train/eval mode the runner switches; its state is checkpointed as `model`
    model: nn.Module
    #: the task's optimizer, learning-rate scheduler and --amp loss scaler (`runner.precision.grad_scaler`), where it
    #: has them: checkpointed as `optimizer`, `scheduler` and `scaler`, and followed by the planner (the optimizer's
    #: state)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    #: data-parallel on CUDA, BatchNorm normalises over every rank's share of a batch (a batch is one part);
    #: episodic tasks leave it off, since each episode is a part of its own
    sync_batchnorm: ClassVar[bool] = False
    #: data-parallel, the model may leave some parameters without a gradient in a step's last micro-step, so
    #: DistributedDataParallel looks for them after each synchronised forward; a task that sets it says which
    find_unused_parameters: ClassVar[bool] = False
    _ddp: Any = None
    #: what the task loaded as pretrained weights (each `models.weights.Pretrained.record`), for config.json
    loaded_weights: tuple[dict[str, Any], ...] = ()
    #: the task's training batches keyed (step, part), where it reads through a loader: started by `prefetch`
    feed: Feed | None = None

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

    def step_phase(self, step: int) -> str:
        """The training phase step `step` belongs to, as its `step` event, its plan check and its back-offs name it:
        `train`, or `pretrain` for a command whose first steps pre-train (mahalanobis-train's --pretrain-epochs)."""
        return "train"

    def backoff_knobs_at(self, step: int) -> tuple[BackoffKnob, ...]:
        """The knobs an OOM in step `step` may shrink, in order: `backoff_knobs` unless the step's phase has its own."""
        return self.backoff_knobs

    def accumulation_of(self, name: str) -> int:
        """The micro-steps per part the back-off knob `name` sets now: `accumulation` unless a phase of the task
        keeps its own (its knob's `set_knob` then sets it)."""
        return self.accumulation

    def validate_now(self, step: int) -> bool:
        every = self.cfg.val_every
        return bool(every) and step % every == 0 and step < self.total_steps()

    def set_knob(self, name: str, value: int, accumulation: int) -> None:
        """Apply an OOM back-off: the knob's new (per-micro-step) value and the gradient accumulation."""
        setattr(self.cfg, name, value)
        self.accumulation = accumulation

    @property
    def workers(self) -> int:
        """The loader worker processes this run starts: `--workers`, or none where it reads in process."""
        return 0 if self.ctx.in_process else getattr(self.cfg, "workers", 0)

    def cache_limit(self, limit: int) -> int:
        """A data cache's bound (bytes or items) in this run: `limit`, or 0 where it reads in process."""
        return 0 if self.ctx.in_process else limit

    def prefetch(self, step: int) -> None:
        """Called once before training's first step (`step`; after a resume, the step it resumes at): the task's
        `feed` starts there, so that its workers read the first episodes while the run sets up (the plan check,
        the run directory) instead of while the first step waits."""
        if self.feed is not None:
            self.feed.start((step, 0))

    def wrap_data_parallel(self) -> None:
        """Called by the runner under torchrun, once the model is built and any checkpoint loaded."""
        group = self.ctx.distributed
        if group is not None:
            self._ddp = group.wrap(self.model, self.sync_batchnorm, self.find_unused_parameters)

    @property
    def ddp_or_model(self) -> nn.Module:
        """What a training step calls for its model's forward: the model under DistributedDataParallel in a
        data-parallel run (a forward there is what joins the last micro-step's backward to the gradient
        all-reduce), else the model itself."""
        return self._ddp if self._ddp is not None else self.model

    def _training_state(self) -> dict[str, Any]:
        """The declared parts a checkpoint holds beside the model, by their checkpoint keys (None where unset)."""
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of the task: the model's, optimizer's, scheduler's and loss scaler's states."""
        held = {"model": self.model, **self._training_state()}
        return {name: part.state_dict() for name, part in held.items() if part is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for name, part in self._training_state().items():
            if part is not None and name in state:
                part.load_state_dict(state[name])

    def finish(self, metrics: dict[str, float]) -> dict[str, float]:
        """Write the command's own output files into the run directory; may add metrics."""
        return metrics

    def plan_phases(self) -> dict[str, Callable[[], Any]]:
        """Each phase's one representative step, for the memory planner to trace under fake tensors."""
        return {"train": lambda: self.train_step(1)}

    def plan_tracked(self, phase: str) -> tuple[Any, ...]:
        """The modules and optimizers whose parameters, gradients and state the planner counts in `phase`."""
        return (self.model, self.optimizer)

    def plan_extra_bytes(self) -> dict[str, dict[str, int]]:
        """The command's own memory terms that tracing does not see, per phase: {phase: {name: bytes}}."""
        return {}

    def plan_notes(self) -> dict[str, dict[str, str]]:
        """Per phase, a few words on what a plan line holds: {phase: {name: note}} (`train and val caches, 2 x 256
        MiB`). A model the planner built without reading its weights says so in its `planned_from`."""
        return {}

    # ------------------------------------------------------------------ what a command calls

    def accumulate(self, step: int, parts: int) -> Accumulation:
        """Step `step`'s gradient over its `parts` parts, for the command's own loop: `with self.accumulate(step,
        parts) as grads: for j in grads.parts(): for piece in grads.micro_steps(pieces): ... grads.backward(loss,
        **figures)`; `grads.sums` then holds the figures summed over the step (see `runner.micro.Accumulation`)."""
        return Accumulation(self.model, step, step_seed(self.ctx.seed, step), parts, self.ctx.distributed, self._ddp,
                            self.ctx.guard, self.ctx.faults, self.step_phase(step))

    def my_share(self, items: list[Any]) -> list[Any]:
        """This rank's share of a list (items rank, rank + N, ...); the whole list in one process."""
        group = self.ctx.distributed
        return items if group is None else items[group.rank::group.world_size]

    def all_sum(self, figures: dict[str, float]) -> dict[str, float]:
        """Figures that add up across ranks (counts, sums), summed over all ranks."""
        group = self.ctx.distributed
        return dict(figures) if group is None else group.sum(figures)
