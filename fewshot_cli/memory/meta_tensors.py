"""Meta tensors for the planner's traced steps: shapes and dtypes with no storage, at the cost of the ops' own meta
kernels (no fake-tensor machinery: torch's FakeTensorMode loads its dynamo package, a second on a CPU)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any
from unittest.mock import patch

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from fewshot_cli.memory.torch_private import TorchDispatchMode, tree_map

META = torch.device("meta")
aten = torch.ops.aten


class NotTraceable(RuntimeError):
    """A step whose bytes on meta tensors could differ from its bytes on the CPU: the planner traces it on fake
    tensors instead."""


class MetaTensors(TorchDispatchMode):
    """Every op made while entered runs on meta tensors: a real tensor it is given (the data a step reads, a
    module's constant) is replaced by a meta tensor of its shape, strides and dtype (once per tensor), and an op
    that makes a tensor on a device (`torch.zeros(..., device="cpu")`, `x.to("cpu", torch.half)`) makes it on the
    meta device.

    Made to give the same bytes as fake CPU tensors (`tests/test_step_tracker.py` holds them equal on every
    command's trace), so three things a CPU tensor would do otherwise are handled: `x.to("cpu")` (or `x.cpu()`) with
    nothing but the device changing, a no-op on a CPU tensor, returns `x` itself rather than a copy; autocast, which
    does not apply to meta tensors, and attention's choice of kernel, which is the device's, raise NotTraceable. Python
    code that reads a tensor's device or type sees the meta device: where that changes the step, it may fail
    (torchvision's `ToTensor` tests `isinstance(x, torch.ByteTensor)`), and `memory.plan.trace` then traces the
    step on fake tensors, or it may go another way, which is why every command is traced both ways in the tests."""

    def __init__(self) -> None:
        super().__init__()
        self._made = WeakIdKeyDictionary()  # real tensor -> its meta tensor, which lives as long as it does

    def __enter__(self) -> MetaTensors:
        self._patches = ExitStack()
        try:
            self._patches.enter_context(patch.object(torch.autocast, "__enter__", _refused(torch.autocast.__enter__)))
            self._patches.enter_context(patch.object(F, "scaled_dot_product_attention", _attention))
            self._patches.enter_context(patch.object(torch.Tensor, "to", _staying(torch.Tensor.to)))
            self._patches.enter_context(patch.object(torch.Tensor, "cpu", _staying(torch.Tensor.cpu)))
            return super().__enter__()
        except BaseException:
            self._patches.close()
            raise

    def __exit__(self, *args: Any) -> None:
        try:
            super().__exit__(*args)
        finally:
            self._patches.close()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is aten._local_scalar_dense.default and not args[0].is_meta:  # a real tensor's value: it has one
            return func(*args, **(kwargs or {}))
        args, kwargs = tree_map(self._meta, (args, dict(kwargs or {})))
        if "device" in kwargs or any(arg.name == "device" for arg in func._schema.arguments):
            kwargs["device"] = META
        return func(*args, **kwargs)

    def _meta(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.is_meta:
            return value
        meta = self._made.get(value)
        if meta is None:
            meta = self._made[value] = (
                torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=META,
                                    requires_grad=value.requires_grad)
                if value.layout == torch.strided else value.to(META))
        return meta


def _refused(enter: Any) -> Any:
    """autocast's `__enter__`, raising NotTraceable where it would switch autocast on: it would not apply to meta
    tensors (a dispatch mode sees no autocast, so this is where it is caught)."""

    def refused(self: torch.autocast) -> Any:
        if self._enabled:
            raise NotTraceable(f"autocast to {self.fast_dtype} does not apply to meta tensors")
        return enter(self)

    return refused


def _attention(*args: Any, **kwargs: Any) -> Any:
    """`F.scaled_dot_product_attention` on meta tensors: its kernel is the device's choice (on the CPU a fused one,
    on meta tensors the unfused maths, whose scores matrix the CPU never holds), so it is refused."""
    raise NotTraceable("attention's kernel is the device's choice, and meta tensors have no device")


def _staying(move: Any) -> Any:
    """`Tensor.to` or `Tensor.cpu`, returning a meta tensor itself where only the device would change, to the CPU:
    what it does for a CPU tensor, with no op (a copy would be counted as new bytes)."""

    def staying(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.is_meta and _to_cpu_only(self, args, kwargs):
            return self
        return move(self, *args, **kwargs)

    return staying


def _to_cpu_only(tensor: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether `tensor.to(*args, **kwargs)` (or `.cpu`) names no device but the CPU, no other dtype, no copy and
    no new memory format."""
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, str | torch.device):
            device = arg
        elif isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, torch.Tensor):
            device, dtype = arg.device, arg.dtype
    flags = [arg for arg in args if isinstance(arg, bool)]  # non_blocking, then copy
    copy = flags[1] if len(flags) > 1 else kwargs.get("copy", False)
    return ((device is None or torch.device(device).type in ("cpu", "meta")) and dtype in (None, tensor.dtype)
            and not copy and kwargs.get("memory_format") in (None, torch.preserve_format))
