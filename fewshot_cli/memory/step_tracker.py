"""The planner's memory tracker: the live bytes of each kind (parameters, gradients, optimizer state, activations,
temporaries) through one traced step, and their split at the step's peak."""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from fewshot_cli.memory.torch_private import (
    TorchDispatchMode,
    active_fake_mode,
    current_graph_task_id,
    is_traceable_wrapper_subclass,
    tree_leaves,
)

#: the kinds a storage is counted under, as torch's MemTracker names them (plan._KINDS turns them into plan lines)
PARAM, BUFFER, GRAD, ACT, TEMP, OPT, OTH = "PARAM", "BUFFER", "GRAD", "ACT", "TEMP", "OPT", "OTH"
KINDS = (PARAM, BUFFER, GRAD, ACT, TEMP, OPT, OTH)
TOTAL = "Total"


class StepTracker(TorchDispatchMode):
    """Counts every storage an op makes while the tracker is entered, under a kind: made inside an optimizer's step,
    optimizer state; made in the backward pass, a temporary; else an activation. What existed before comes in
    through `track_external`: a module's parameters, their gradients and its buffers, an optimizer's state, a
    tensor (`OTH`). A storage counts from its first op to its release (a weak reference to it), at its bytes (a
    resize counted); after each op, the live bytes per kind are kept where their total is the highest yet
    (`get_tracker_snapshot("peak")`). An optimizer's step ends by counting its state, which it may have made.

    The bookkeeping of torch's MemTracker (in torch.distributed's tools), to the byte (tests/test_step_tracker.py),
    without what the planner does not read: its per-module statistics, which refuse a module called twice in one
    step and hook every module call and its backward, and the rest of torch.distributed's tools package, which
    loads with it (its FSDP tracker and runtime estimator). Snapshots are
    `{device: {kind: bytes, "Total": bytes}}`."""

    def __init__(self) -> None:
        super().__init__()
        self._storages: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> _Counted
        self._current: dict[torch.device, dict[str, int]] = {}
        self._peak: dict[torch.device, dict[str, int]] = {}
        self._in_optimizer = False
        self._handles: list[Any] = []
        self._resize = torch.UntypedStorage.resize_
        self._fake_mode: Any = None

    def track_external(self, *external: nn.Module | torch.optim.Optimizer | torch.Tensor | None) -> None:
        """Count what exists before the step: modules (parameters, their gradients, buffers), optimizers (their
        state) and tensors."""
        for obj in external:
            if isinstance(obj, torch.Tensor):
                self._count(obj, OTH, relabel=True)
            elif isinstance(obj, nn.Module):
                for param in obj.parameters():
                    self._count(param, PARAM, relabel=True)
                    if param.grad is not None:
                        self._count(param.grad, GRAD, relabel=True)
                for buffer in obj.buffers():
                    self._count(buffer, BUFFER, relabel=True)
            elif isinstance(obj, torch.optim.Optimizer):
                self._count_state(obj)
            elif obj is not None:
                raise TypeError(f"cannot track a {type(obj).__name__}: only modules, optimizers and tensors")

    def get_tracker_snapshot(self, type: str = "current") -> dict[torch.device, dict[str, int]]:  # noqa: A002
        """The live bytes per device and kind now (`current`) or at the highest total so far (`peak`)."""
        if type not in ("current", "peak"):
            raise ValueError(f"a snapshot is 'current' or 'peak', not {type!r}")
        snapshot = self._current if type == "current" else self._peak
        return {device: dict(kinds) for device, kinds in snapshot.items()}

    def __enter__(self) -> StepTracker:
        self._fake_mode = active_fake_mode()  # ops made by another fake mode (shape propagation) are not counted
        self._handles = [register_optimizer_step_pre_hook(self._optimizer_starts),
                         register_optimizer_step_post_hook(self._optimizer_ends)]
        tracker, resize = self, self._resize

        @functools.wraps(resize)
        def resize_(storage: torch.UntypedStorage, size: int) -> None:  # a dispatch mode does not see it
            resize(storage, size)
            tracker._resized(storage)

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        self._peak = self.get_tracker_snapshot()
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*args)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if active_fake_mode() is self._fake_mode:
            kind = OPT if self._in_optimizer else TEMP if current_graph_task_id() != -1 else ACT
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self._count(tensor, kind)
            for device, kinds in self._current.items():
                if kinds[TOTAL] > self._peak.get(device, {}).get(TOTAL, 0):
                    self._peak[device] = dict(kinds)
        return out

    def _optimizer_starts(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_optimizer = True

    def _optimizer_ends(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._count_state(optimizer)
        self._in_optimizer = False

    def _count_state(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self._count(value, OPT, relabel=True)

    def _count(self, tensor: torch.Tensor, kind: str, relabel: bool = False) -> None:
        """Count `tensor`'s storages under `kind` where they are new; `relabel`: one counted already moves to
        `kind` (a tensor the caller knows to be a parameter, a gradient, optimizer state); else it keeps its kind
        and only a change of its size is counted."""
        for storage in _storages(tensor):
            counted = self._storages.get(storage)
            if counted is None:
                counted = self._storages[storage] = _Counted(kind, storage.nbytes(), tensor.device)
                counted.reference = weakref.ref(storage, functools.partial(self._released, counted))
                self._add(counted.device, kind, counted.size)
            elif relabel and counted.kind != kind:
                self._add(counted.device, counted.kind, -counted.size)
                self._add(counted.device, kind, counted.size)
                counted.kind = kind
            else:
                self._resized(storage)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        counted = self._storages.get(storage)
        if counted is not None and counted.size != storage.nbytes():
            self._add(counted.device, counted.kind, storage.nbytes() - counted.size)
            counted.size = storage.nbytes()

    def _released(self, counted: _Counted, _reference: Any) -> None:
        self._add(counted.device, counted.kind, -counted.size)

    def _add(self, device: torch.device, kind: str, size: int) -> None:
        if not size:
            return
        kinds = self._current.setdefault(device, {**dict.fromkeys(KINDS, 0), TOTAL: 0})
        kinds[kind] += size
        kinds[TOTAL] += size
        if kinds[TOTAL] == 0:
            del self._current[device]


class _Counted:
    """A counted storage: its kind, its bytes, the device its tensor is on and the weak reference that uncounts it."""

    __slots__ = ("kind", "size", "device", "reference")

    def __init__(self, kind: str, size: int, device: torch.device) -> None:
        self.kind, self.size, self.device = kind, size, device
        self.reference: Any = None


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding `tensor`'s bytes: its own, or its inner tensors' for a wrapper subclass."""
    pending, found = [tensor], []
    while pending:
        item = pending.pop()
        if is_traceable_wrapper_subclass(item):
            names, _ = item.__tensor_flatten__()
            pending.extend(inner for inner in (getattr(item, name) for name in names)
                           if isinstance(inner, torch.Tensor))
        else:
            found.append(item.untyped_storage())
    return found
