"""oneDNN's layout copies around a CPU convolution: memory no tensor holds, so a trace of tensors cannot see it."""

from __future__ import annotations

from typing import Any

import torch

from fewshot_cli.memory.torch_private import TorchDispatchMode, tree_leaves

aten = torch.ops.aten
#: the convolutions as a dispatch mode sees them: `convolution` under autograd, `convN` under inference mode
FORWARD = {aten.convolution.default, aten._convolution.default, aten.conv1d.default, aten.conv2d.default,
           aten.conv3d.default}
BACKWARD = {aten.convolution_backward.default}


def _bytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def copies_bytes(func: Any, args: tuple, out: Any) -> int:
    """The bytes oneDNN holds beyond the op's own tensors while it runs, from the shapes alone. Measured per
    convolution on the CPU (torch 2.14, oneDNN 3.12, AVX-512; the resident set's peak inside the op less the
    resident set after it, results/plan_accuracy.md): forward, its input and weights copied into the blocked
    layout or its output computed in one and copied out, max(input + weights, output), to within 1%; backward, the
    incoming gradient, the input and the weights copied, their sum, to within 10%."""
    if func in FORWARD:
        return max(_bytes(args[0]) + _bytes(args[1]), sum(_bytes(t) for t in tree_leaves(out)))
    if func in BACKWARD:
        return _bytes(args[0]) + _bytes(args[1]) + _bytes(args[2])
    return 0


def in_use() -> bool:
    """Whether CPU convolutions go through oneDNN here (torch built with it and not switched off)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


class ConvCopies(TorchDispatchMode):
    """Entered inside a StepTracker: after each convolution, the tracker's live bytes plus that op's copies; `peak`
    is the largest such sum, the step's peak had the copies been tensors."""

    def __init__(self, tracker: Any) -> None:
        super().__init__()
        self.tracker, self.peak = tracker, 0
        self.active = in_use()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.active and (func in FORWARD or func in BACKWARD):
            live = sum(size for snap in self.tracker.get_tracker_snapshot("current").values()
                       for kind, size in snap.items() if kind != "Total")  # each kind's bytes, not their total
            self.peak = max(self.peak, live + copies_bytes(func, args, out))
        return out
