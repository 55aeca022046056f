"""torch's private parts that fewshot uses, imported here alone: a torch that moves one fails here, naming it."""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: the name fewshot uses -> (torch module, name there). Each is imported on first use, so a module that needs only
#: one of them (a model's BatchNorm test) does not load torch.distributed for the memory tracker.
PRIVATE = {
    # fake tensors: the planner's steps run on tensors that carry shapes and dtypes but no storage
    "FakeTensor": ("torch._subclasses.fake_tensor", "FakeTensor"),
    "FakeTensorMode": ("torch._subclasses.fake_tensor", "FakeTensorMode"),
    # what fake tensors raise where a value, or an output's shape, would come from the data
    "DataDependentOutputException": ("torch._subclasses.fake_tensor", "DataDependentOutputException"),
    "DynamicOutputShapeException": ("torch._subclasses.fake_tensor", "DynamicOutputShapeException"),
    # the per-kind memory tracker (parameters, gradients, optimizer state, activations) the planner reads
    "MemTracker": ("torch.distributed._tools.mem_tracker", "MemTracker"),
    "MemRefType": ("torch.distributed._tools.mem_tracker", "_MemRefType"),
    # the base of BatchNorm1d/2d/3d, their lazy forms and SyncBatchNorm
    "BatchNorm": ("torch.nn.modules.batchnorm", "_BatchNorm"),
    # a mode that sees every aten op (the planner's oneDNN copies), and the flattening of an op's outputs
    "TorchDispatchMode": ("torch.utils._python_dispatch", "TorchDispatchMode"),
    "tree_leaves": ("torch.utils._pytree", "tree_leaves"),
}
#: MemTracker's per-module hooks the planner's tracker switches off (plan.StepTracker overrides them by name)
MEM_TRACKER_HOOKS = ("_pre_fw_hook", "_post_fw_hook", "_pre_bw_hook", "_post_bw_hook")


class TorchMoved(ImportError):
    """A private torch symbol fewshot uses is not where this module expects it."""


def load(name: str) -> Any:
    """The symbol fewshot calls `name`, imported from torch now; TorchMoved, in one sentence, if torch moved it."""
    module, attribute = PRIVATE[name]
    try:
        return getattr(import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        import torch  # torch's version for the message only, where the import already failed

        raise TorchMoved(f"torch {torch.__version__} has no {module}.{attribute} (fewshot's {name}): torch moved or "
                         f"removed it; point PRIVATE[{name!r}] in fewshot_cli/memory/torch_private.py at its new place."
                         ) from err


def __getattr__(name: str) -> Any:
    if name not in PRIVATE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = load(name)
    return value
