"""One training step's gradient, accumulated over its parts and micro-steps, in one process or many."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch import nn

from fewshot_cli.errors import RunFailed
from fewshot_cli.memory.guard import MemoryGuard
from fewshot_cli.memory.measure import is_oom
from fewshot_cli.runner.distributed import StepFailedElsewhere, zero_backward
from fewshot_cli.runner.faults import Faults

S = TypeVar("S")


class Accumulation:
    """A step's gradient over its `parts` parts (episodes, or a batch's rank shares), each in micro-steps. A command
    writes the loop and this object keeps the bookkeeping, as in

        with self.accumulate(step, parts=len(episodes)) as grads:
            for j in grads.parts():                      # this rank's parts, each seeded alike in any run
                for chunk in grads.micro_steps(chunks):  # the command's slices of part j
                    out = self.ddp_or_model(chunk)       # the model's forward (under DDP when data-parallel)
                    loss = ...                           # weighted by its share of the whole step
                    grads.backward(loss, loss=float(loss), correct=...)
        sums = grads.sums                                # the figures, summed over micro-steps and ranks

    Part j draws its random numbers from `seed + j` (the step's seed), and with several parts each starts from the
    step's BatchNorm running statistics, which end as the mean of the parts' (a part's result does not depend on
    the others). Data-parallel, rank r takes parts r, r + N, ...; DistributedDataParallel sums the gradients
    across ranks in the backward of this rank's last micro-step (`micro_steps` sets `require_backward_grad_sync`
    there alone, before its forward), the earlier ones accumulating locally; figures
    and statistics are summed likewise, so N ranks give one process's step. A rank out of memory, or with no part,
    still meets the all-reduce, and then every rank raises StepFailedElsewhere, so all of them back off together.
    The `with` block sees every exception of the loop's body, so this holds wherever in the step memory runs out."""

    def __init__(self, model: nn.Module, step: int, seed: int, parts: int, group: Any, ddp: Any,
                 guard: MemoryGuard | None = None, faults: Faults | None = None, phase: str = "train") -> None:
        self.model, self.step, self.seed, self.n_parts, self.phase = model, step, seed, parts, phase
        self.group, self.ddp, self.guard, self.faults = group, ddp, guard, faults
        self.mine = list(range(parts)) if group is None else list(range(parts))[group.rank::group.world_size]
        self.stats = _RunningStats(model) if parts > 1 or group is not None else None
        #: figures given to `backward`, summed over this rank's micro-steps (and over the ranks once the step ends)
        self.sums: dict[str, float] = {}
        self._last_part = self._last = False
        self._synced = self._in_synced_backward = False

    def __enter__(self) -> Accumulation:
        return self

    def parts(self) -> Iterator[int]:
        """This rank's parts j of the step, each seeded and started from the step's BatchNorm statistics."""
        for position, j in enumerate(self.mine):
            torch.manual_seed(self.seed + j)
            if self.stats is not None:
                self.stats.restore()
            self._last_part = position == len(self.mine) - 1
            yield j
            if self.stats is not None:
                self.stats.add()

    def micro_steps(self, slices: Sequence[S]) -> Iterator[S]:
        """A part's slices, one micro-step each: the last slice of this rank's last part syncs the gradients."""
        for k, piece in enumerate(slices):
            self._last = self._last_part and k == len(slices) - 1
            if self.faults is not None:
                self.faults.oom(self.phase)
            if self.guard is not None:
                self.guard.check(self.phase, "training" if self.phase == "train" else self.phase)
            if self.ddp is not None:
                self.ddp.require_backward_grad_sync = self._last  # the earlier micro-steps accumulate locally
            yield piece

    def backward(self, loss: torch.Tensor, /, **figures: float) -> None:
        """Add a micro-step's loss (weighted by its share of the whole step) to the gradient, and its figures (ones
        that add up: weighted losses, counts) to `sums`."""
        self._in_synced_backward = self.ddp is not None and self._last
        loss.backward()
        self._synced = self._in_synced_backward
        for name, value in figures.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
                 ) -> bool:
        failure: str | None = None
        if error is not None:
            if not isinstance(error, Exception):
                return False
            if self.stats is not None:  # a retried step starts from the statistics this one started from
                self.stats.restore()
            if self.group is None or not is_oom(error):
                return False
            if self._in_synced_backward:  # part of the all-reduce ran; the ranks cannot meet again in this step
                raise RunFailed(f"out of memory inside the gradient all-reduce of step {self.step} on rank "
                                f"{self.group.rank}; resume the run with a smaller configuration") from None
            failure = str(error).splitlines()[0]
        if self.group is not None:
            if not self._synced:  # no part here (a short last step), or out of memory: meet the all-reduce
                zero_backward(self.ddp)
            if self.group.any(failure is not None):
                self.model.zero_grad(set_to_none=True)
                if self.stats is not None:
                    self.stats.restore()
                raise StepFailedElsewhere(failure or "another rank ran out of memory in this step") from None
            self.sums = self.group.sum(self.sums)
        if self.stats is not None:
            self.stats.merge(self.n_parts, self.group)
        return False


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
