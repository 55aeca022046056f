"""torch's private parts that fewshot uses, imported here alone: a torch that moves one fails here, naming it."""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
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
    # the planner's memory tracker (memory.step_tracker): the fake mode a traced op runs under (an op of another,
    # nested one only propagates shapes), whether autograd is running a backward pass (-1: not), and the tensor
    # subclasses that hold their bytes in inner tensors
    "active_fake_mode": ("torch._guards", "active_fake_mode"),
    "current_graph_task_id": ("torch._C", "_current_graph_task_id"),
    "is_traceable_wrapper_subclass": ("torch.utils._python_dispatch", "is_traceable_wrapper_subclass"),
    # the base of BatchNorm1d/2d/3d, their lazy forms and SyncBatchNorm
    "BatchNorm": ("torch.nn.modules.batchnorm", "_BatchNorm"),
    # a mode that sees every aten op (the planner's oneDNN copies), and the flattening of an op's outputs
    "TorchDispatchMode": ("torch.utils._python_dispatch", "TorchDispatchMode"),
    "tree_leaves": ("torch.utils._pytree", "tree_leaves"),
    "tree_map": ("torch.utils._pytree", "tree_map"),
    # the decorator torch marks its own functions with (an optimizer's add_param_group, state_dict, ...) so that
    # torch.compile does not trace into them; it imports torch._dynamo the first time such a function runs
    "disable_dynamo": ("torch._compile", "_disable_dynamo"),
    # the decorator of an optimizer's step (grad mode as `differentiable` says), which imports torch._dynamo to mark
    # a graph break, a no-op outside torch.compile
    "use_grad_for_differentiable": ("torch.optim.optimizer", "_use_grad_for_differentiable"),
}


#: where the functions a meta-tensor trace runs are that torch marks with `_disable_dynamo` (see `defer_dynamo`):
#: its optimizers and the Python meta kernels and decompositions of its ops (batch norm's, torch._refs' elementwise
#: ops); each would import torch._dynamo on its first call
META_TRACE_PACKAGES = ("torch.optim", "torch._refs", "torch._prims", "torch._prims_common", "torch._decomp")


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


def defer_dynamo(*packages: str) -> int:
    """Let the functions torch marks with `_disable_dynamo` in the loaded modules of `packages` (`torch.optim`: the
    module and its submodules, their functions and their classes' methods, and the functions those wrap, as
    `_wrapping` finds them) run without importing torch._dynamo
    (seconds, with the sympy it loads: as long as `import torch` on a CPU), for as long as nothing else imports it.
    Building an optimizer runs one (`add_param_group`), as do its `zero_grad` and `state_dict`; and an optimizer's
    `step` (torch's `_use_grad_for_differentiable`) imports it to mark a graph break: every training run would load
    dynamo before its first step, and again in it, for them alone.

    The same calls, the same results: `torch._dynamo.disable(fn)` changes only what happens under a frame dynamo
    evaluates, and no frame is evaluated by dynamo before torch._dynamo is imported (torch.compile imports it
    first). Each marked function gets, where torch caches its disabled form (the attribute `__dynamo_disable` of the
    function it wraps), a stand-in that calls that function itself while torch._dynamo is not loaded, and once it
    is, makes torch's disabled form, caches it in torch's place and calls it, as torch would have. Returns how many
    functions it covered; a torch whose decorators work otherwise gets none (nothing changes, dynamo loads as it
    did). An optimizer class's `step` is covered the same way (`_eager_step`) where no instance of it was made yet
    (the first one wraps its class's step with its hooks)."""
    code = getattr(load("disable_dynamo")(lambda: None), "__code__", None)  # every marked function's wrapper
    if code is None or not {"fn", "recursive"} <= set(code.co_freevars):
        return 0
    step_code = getattr(load("use_grad_for_differentiable")(lambda: None), "__code__", None)
    covered = 0
    for owner in _owners(packages):
        step = vars(owner).get("step")
        if isinstance(owner, type) and step is not None and getattr(step, "__code__", None) is step_code \
                and hasattr(step, "__wrapped__"):
            owner.step = _eager_step(step)
            covered += 1
        for value in list(vars(owner).values()):
            for marked in _wrapping(getattr(value, "__func__", value)):  # a staticmethod or classmethod: its function
                if getattr(marked, "__code__", None) is not code:
                    continue
                cells = dict(zip(code.co_freevars, (cell.cell_contents for cell in marked.__closure__), strict=True))
                fn = cells["fn"]
                if getattr(fn, "__dynamo_disable", None) is None:
                    setattr(fn, "__dynamo_disable", _on_demand(fn, cells["recursive"]))
                    covered += 1
    return covered


def _wrapping(value: Any) -> list[Any]:
    """`value` and the functions it wraps, as far as 8 deep: those its closure holds and its `__wrapped__`
    (functools.wraps): torch marks some of its functions under other decorators (torch._refs' elementwise ops)."""
    found: list[Any] = []
    pending, seen = [(value, 0)], set()
    while pending:
        item, depth = pending.pop()
        if id(item) in seen or not callable(item):
            continue
        seen.add(id(item))
        found.append(item)
        if depth < 8:
            inner = [cell.cell_contents for cell in getattr(item, "__closure__", None) or ()
                     if _filled(cell) and isinstance(cell.cell_contents, types.FunctionType)]
            wrapped = getattr(item, "__wrapped__", None) if isinstance(item, types.FunctionType) else None
            pending += [(f, depth + 1) for f in (*inner, *([wrapped] if wrapped is not None else []))]
    return found


def _filled(cell: Any) -> bool:
    """Whether a closure cell holds a value yet (a cell of a name assigned later in its function does not)."""
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _owners(packages: tuple[str, ...]) -> list[Any]:
    """The loaded modules of `packages` (each and its submodules), and the classes each of them defines."""
    modules = [m for name, m in list(sys.modules.items()) if m is not None
               and any(name == p or name.startswith(p + ".") for p in packages)]
    classes = [v for m in modules for v in list(vars(m).values())
               if isinstance(v, type) and v.__module__ == m.__name__]
    return [*modules, *classes]


def _on_demand(fn: Callable[..., Any], recursive: bool) -> Callable[..., Any]:
    """`fn` itself while torch._dynamo is not loaded; torch's `torch._dynamo.disable(fn)` once it is."""

    def call(*args: Any, **kwargs: Any) -> Any:
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None:
            return fn(*args, **kwargs)
        disabled = dynamo.disable(fn, recursive, wrapping=False)
        setattr(fn, "__dynamo_disable", disabled)  # torch's own cache: from now on torch calls it directly
        return disabled(*args, **kwargs)

    return call


def _eager_step(marked: Callable[..., Any]) -> Callable[..., Any]:
    """An optimizer's step as torch's `_use_grad_for_differentiable` makes it (`marked`), less its import of
    torch._dynamo while that is not loaded: grad mode as the optimizer's `differentiable` default says during the
    step, restored after it. Its two `torch._dynamo.graph_break()` calls do nothing outside torch.compile; once
    torch._dynamo is loaded, torch's own wrapper runs."""
    func = marked.__wrapped__

    @functools.wraps(func)
    def step(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" in sys.modules:
            return marked(*args, **kwargs)
        import torch  # loaded already: a step runs on an optimizer

        previous = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(args[0].defaults["differentiable"])
            return func(*args, **kwargs)
        finally:
            torch.set_grad_enabled(previous)

    return step
