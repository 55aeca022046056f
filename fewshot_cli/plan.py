"""Memory planning: trace one real step of each phase under fake tensors and add the device's own terms."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from typing import Any
from unittest.mock import patch

import psutil
import torch
from torch import nn

from fewshot_cli.errors import BadInput
from fewshot_cli.memory.limits import Limit, size_text
from fewshot_cli.onednn_copies import ConvCopies
from fewshot_cli.runner import faults
from fewshot_cli.runner.config import Resolved
from fewshot_cli.runner.device import device_memory_bytes
from fewshot_cli.runner.task import Command, RunContext
from fewshot_cli.torch_private import FakeTensor, FakeTensorMode, MemTracker

MiB = 1024**2
MARGIN = 0.10  # the planner keeps 10% of the budget free
#: the device's own terms that tracing the program cannot see. The CUDA ones are read from real runs of the five
#: commands at `--preset t4 --memory-budget 15GiB` (benchmarks/gpu_check.py on an H100, torch 2.11, CUDA 13; its
#: "CUDA terms" table in results/gpu_check.md lists each command's figures), medians across the commands:
#: the context and the kernels and libraries loaded, outside the caching allocator (device in use less reserved)
CUDA_CONTEXT = 771 * MiB
#: cuBLAS/cuDNN workspaces and other allocations the trace does not see (peak allocated less traced): the median
#: over the five commands' t4 runs on an H100 once host-side lines were no longer counted as traced
CUDA_WORKSPACES = 118 * MiB
#: the caching allocator's rounding and split blocks: peak reserved over peak allocated, less one
CUDA_ALLOCATOR = 0.161
#: the CPU's term, read from the short runs of benchmarks/plan_accuracy.py (results/plan_accuracy.md) on Linux,
#: glibc, with freed tensors returned to the system (`runner.memory.return_freed_memory`, every CPU run): what
#: a run's first steps add to the process besides tensors (oneDNN/MKL kernels and thread pools; with training,
#: autograd's engine and its threads), the gap left at the first ten configurations once oneDNN's convolution
#: copies and the optimizer state of later steps are planned; that gap does not grow with the configuration
#: (ResNet-12 at 84 px: a real step's peak is the traced one plus the copies to within 0.3%)
CPU_RUNTIME = {"training": int(29.5 * MiB), "inference": 13 * MiB}
#: what an evaluation in bf16 autocast after bf16 training adds on the CPU beyond its tensors (oneDNN's bf16
#: kernels and their scratch): read from the two `--amp` rows of results/plan_accuracy.md, 9.8 and 14.5 MiB
CPU_BF16_EVALUATION = 12 * MiB
MPS_OVERHEAD = 1.15  # the MPS allocator's heaps round up; measured overhead factor
#: plan lines a command declares for memory the host holds whatever the device (batches its loader's workers
#: prefetch, caches of decoded frames): on CUDA or MPS they are the machine's memory, not the device's
HOST_LINES = ("loader_prefetch", "prefetched_episodes", "frame_cache", "episode_uint8", "image_cache",
              "kept_train_batch")
#: traced lines of the CPU's own libraries: oneDNN's copies around a convolution (CUDA's are in its workspaces)
CPU_LINES = ("onednn_copies",)
#: per device type, plan lines that a run's own measure of its phases does not see: the CUDA context lies outside
#: the caching allocator, host lines outside any device's allocator, and the CPU's start-up resident set is there
#: before the run builds its model (the check subtracts it)
OUTSIDE_THE_MEASURE = {"cpu": ("startup_baseline",), "cuda": ("cuda_context", *HOST_LINES), "mps": HOST_LINES}
#: the device each preset is made for and its memory, so a plan for it can be made from any machine
PRESET_DEVICES = {"t4": ("cuda", int(15.89 * 1024**3)), "a100": ("cuda", 80 * 1024**3),
                  "h100": ("cuda", 80 * 1024**3), "mps": ("mps", int(47.74 * 1024**3))}
_KINDS = {"PARAM": "parameters", "BUFFER": "buffers", "GRAD": "gradients", "OPT": "optimizer_state",
          "ACT": "activations", "TEMP": "temporaries", "OTH": "other"}


class StepTracker(MemTracker):
    """torch's MemTracker without its per-module statistics, which refuse a module called twice in one step
    (support and query through one backbone, evaluation in batches); the per-kind peaks are all we read."""

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        pass

    def _post_fw_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
        pass

    def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
        pass

    def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
        pass


def _module_to_on_cpu(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """Planning builds on the CPU, where moving a module is a no-op, as is changing its parameters' layout (their
    bytes stay the same); fake parameters cannot be swapped in place."""
    targets = [a for a in (*args, *kwargs.values()) if a is not None and not isinstance(a, torch.memory_format)]
    if all(isinstance(a, str | torch.device) and torch.device(a).type == "cpu" for a in targets):
        return module
    return _MODULE_TO(module, *args, **kwargs)


_MODULE_TO = nn.Module.to


def _fake_scalars():
    """Reading a value out of a fake tensor (a logged loss, an optimizer's step count, a fallback check) gives one
    (False for a truth test): planning follows shapes, and a command's shapes come from its config, not its data."""
    stack = ExitStack()
    for name, zero in (("item", 1), ("__float__", 1.0), ("__int__", 1), ("__bool__", False), ("tolist", 1)):
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, _original=original, _zero=zero) -> Any:
            return _zero if isinstance(self, FakeTensor) else _original(self, *args)

        stack.enter_context(patch.object(torch.Tensor, name, read))
    return stack


def _fake() -> ExitStack:
    stack = ExitStack()
    stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
    stack.enter_context(patch.object(nn.Module, "to", _module_to_on_cpu))
    stack.enter_context(_fake_scalars())
    return stack


def trace(command: Command, config: Any, seed: int = 0, fake: bool = True,
          observe: Callable[[str, str], None] | None = None) -> dict[str, dict[str, int]]:
    """Per phase, the bytes of each kind at that phase's peak: with `fake`, nothing is allocated for real; without,
    the same steps run for real on the CPU under the same tracker (to check the prediction)."""
    cfg = copy.deepcopy(config)
    for name in ("weights", "init"):  # the values of the weights change no tensor's size: trace none
        if hasattr(cfg, name):
            setattr(cfg, name, None)
    phases: dict[str, dict[str, int]] = {}
    task_class = command.task  # imported before fake mode: a module's own tensors (constants) must be real
    with _fake() if fake else ExitStack(), patch.object(faults, "in_micro_step", lambda cfg: None):
        torch.manual_seed(seed)
        task = task_class(cfg, RunContext(device=torch.device("cpu"), seed=seed, run_dir=None))
        extra = task.plan_extra_bytes()
        for phase, step in task.plan_phases().items():
            tracker = StepTracker()
            tracker.track_external(*(m for m in (task.model, getattr(task, "optimizer", None)) if m is not None))
            train = phase == "train"
            task.model.train(train)
            if observe is not None:
                observe(phase, "start")
            copies = ConvCopies(tracker)
            with tracker, copies, (nullcontext() if train else torch.inference_mode()):
                step()
            if observe is not None:
                observe(phase, "end")
            components = _by_kind(tracker.get_tracker_snapshot("peak"))
            if copies.peak > sum(components.values()):  # a convolution's copies rise above the tensors' peak
                components["onednn_copies"] = copies.peak - sum(components.values())
            if train and task.total_steps() > 1:  # the traced step is the first; from the second on, the
                # optimizer's state is live throughout the step
                state = _by_kind(tracker.get_tracker_snapshot("current")).get("optimizer_state", 0)
                components["optimizer_state"] = max(components.get("optimizer_state", 0), state)
            components.update(extra.get(phase, {}))
            phases[phase] = components
    return phases


def _by_kind(snapshot: dict[Any, dict[Any, int]]) -> dict[str, int]:
    """A MemTracker snapshot's bytes per plan line, summed over devices."""
    components: dict[str, int] = {}
    for per_device in snapshot.values():
        for kind, size in per_device.items():
            name = _KINDS.get(str(kind).split(".")[-1])
            if name and size:
                components[name] = components.get(name, 0) + int(size)
    return components


def target(preset: str, device_name: str) -> tuple[torch.device, int | None]:
    """The device a plan is for and its nominal memory: an explicit --device if it is here (None: its memory is
    what `runner.device.memory_limit` finds), else the preset's device."""
    from fewshot_cli.runner.device import resolve_device

    name = (device_name or "auto").lower()
    if name == "auto" and preset in PRESET_DEVICES:
        kind, memory = PRESET_DEVICES[preset]
        return torch.device(kind), memory
    try:
        device = resolve_device(name)
    except BadInput:
        if name.split(":")[0] not in ("cuda", "mps"):
            raise
        device = torch.device(name)  # planning for a device that is not on this machine
        return device, PRESET_DEVICES.get(preset, PRESET_DEVICES["t4" if device.type == "cuda" else "mps"])[1]
    return device, None


def device_terms(device: torch.device, components: dict[str, int], baseline: int = 0,
                 training: bool = True, bf16_evaluation: bool = False) -> dict[str, int]:
    """The plan lines that tracing cannot see, for the device the plan is for."""
    traced = sum(v for k, v in components.items() if device.type == "cpu" or k not in HOST_LINES)
    if device.type == "cuda":
        return {"cuda_context": CUDA_CONTEXT, "cuda_workspaces": CUDA_WORKSPACES,
                "cuda_allocator": int((traced + CUDA_WORKSPACES) * CUDA_ALLOCATOR)}
    if device.type == "mps":
        return {"mps_allocator": int(traced * (MPS_OVERHEAD - 1))}
    terms = {"cpu_runtime": CPU_RUNTIME["training" if training else "inference"]
             + (CPU_BF16_EVALUATION if bf16_evaluation else 0)}
    return {**terms, "startup_baseline": baseline} if baseline else terms


#: where each of the device's own plan lines comes from, printed beside it
TERM_NOTES = {
    "cuda_context": "context and loaded kernels, outside the allocator: measured on an H100, results/gpu_check.md",
    "cuda_workspaces": "cuBLAS/cuDNN workspaces: peak allocated less traced, measured, results/gpu_check.md",
    "cuda_allocator": f"caching allocator's rounding and split blocks: {CUDA_ALLOCATOR:.1%} of traced and workspaces, "
                      "reserved over allocated measured, results/gpu_check.md",
    "mps_allocator": f"MPS heaps' rounding: {MPS_OVERHEAD - 1:.0%}, not yet measured",
    "onednn_copies": "oneDNN's layout copies around a convolution, from its shapes: measured, "
                     "fewshot_cli/onednn_copies.py",
    "startup_baseline": "this process's resident set before any model: interpreter, torch, libraries",
    "cpu_runtime": "kernels, thread pools and autograd's engine a run's first steps load (and with --amp, "
                   "bf16 evaluation's kernels): measured, results/plan_accuracy.md",
}


def startup_baseline(device: torch.device) -> int:
    """On the CPU, what the process holds before a run builds its model (the interpreter, torch and the libraries
    it loaded), measured now; a CPU budget is the whole process's."""
    return psutil.Process().memory_info().rss if device.type == "cpu" else 0


def plan_run(command: Command, resolved: Resolved, device: torch.device, budget: int | None,
             limit_text: str | None = None) -> dict[str, Any]:
    """The contract's plan report: per phase its components and peak, the budget (the limit the run is held to,
    named by `limit_text`), and whether it fits."""
    budget = budget or device_memory_bytes(device)
    for name in getattr(command.task, "plan_libraries", ()):  # loaded lazily by a phase: the baseline counts them
        importlib.import_module(name)
    baseline = startup_baseline(device)  # before tracing, which loads more of torch
    phases = {}
    traced = trace(command, resolved.config)
    for phase, components in traced.items():
        components = {k: v for k, v in components.items() if device.type == "cpu" or k not in CPU_LINES}
        bf16_evaluation = "train" in traced and phase != "train" and bool(getattr(resolved.config, "amp", False))
        components = {**components, **device_terms(device, components, baseline, "train" in traced,
                                                   bf16_evaluation)}
        phases[phase] = {"peak_bytes": sum(components.values()), "components": components}
    peak = max((p["peak_bytes"] for p in phases.values()), default=0)
    return {"command": command.name, "device": str(device), "budget_bytes": budget, "peak_bytes": peak,
            "limit": limit_text or "the device's memory", "usable_bytes": int(budget * (1 - MARGIN)),
            "phases": phases, "fits": peak <= budget * (1 - MARGIN)}


def fit(command: Command, resolved: Resolved, device: torch.device, limit: Limit, force: bool = False
        ) -> dict[str, Any] | None:
    """Every new run's plan against the limit it is held to: with `--preset auto`, the largest configuration that
    fits; otherwise a plan over the limit is bad input (unless `force`). The record config.json keeps, or None
    where the command's steps cannot be traced and nothing asked for a plan (the run goes on, unchecked)."""
    try:
        report = (_choose(command, resolved, device, limit) if resolved.preset == "auto"
                  else plan_run(command, resolved, device, limit.bytes, limit.text))
    except BadInput:
        raise
    except Exception:  # noqa: BLE001 - a plan nobody asked for never stops a run
        if resolved.preset == "auto" or limit.source == "budget":
            raise
        return None
    if not report["fits"] and not force:
        raise BadInput(refusal(command, resolved, report, limit) + "\n" + render(report))
    return record(report)


def checked_record(command: Command, resolved: Resolved, device: torch.device) -> dict[str, Any] | None:
    """The plan a resumed run whose config.json has none checks itself against; None where the command's steps
    cannot be traced."""
    try:
        return record(plan_run(command, resolved, device, None))
    except Exception:  # noqa: BLE001 - a plan nobody asked for never stops a run
        return None


def refusal(command: Command, resolved: Resolved, report: dict[str, Any], limit: Limit) -> str:
    """The one sentence a plan over its limit is refused with: the limit, its source, the need, what to lower."""
    phase = max(report["phases"], key=lambda p: report["phases"][p]["peak_bytes"])
    knobs = [k for k in command.plan_knobs if resolved.sources.get(k) != "planner"] or list(command.plan_knobs)
    lower = ", ".join(f"--{k.replace('_', '-')}" for k in knobs) or "the configuration"
    return (f"The plan does not fit: {limit.text} is {size_text(limit.bytes)}, and the plan needs "
            f"{size_text(report['peak_bytes'])} at its peak ({phase}) with {MARGIN:.0%} kept free; lower {lower} "
            f"(--preset auto picks what fits), or pass --force to run anyway and back off.")


def record(report: dict[str, Any]) -> dict[str, Any]:
    """What a run keeps of its plan (in config.json): the verdict and, per phase, the peak its own measure sees."""
    from fewshot_cli.runner.plancheck import predicted_mb

    return {"peak_bytes": report["peak_bytes"], "budget_bytes": report["budget_bytes"], "fits": report["fits"],
            "predicted_mb": {phase: round(mb, 2) for phase, mb in predicted_mb(report).items()}}


def _choose(command: Command, resolved: Resolved, device: torch.device, limit: Limit) -> dict[str, Any]:
    """Start every planner knob the user did not set at its largest preset value; shrink them in declared order.
    Returns the plan of the configuration chosen (each configuration is traced once)."""
    cfg = resolved.config
    free = [k for k in command.plan_knobs if resolved.sources.get(k) not in ("cli", "config")]
    floors = {k.name: k.floor for k in command.task.backoff_knobs}
    for name in free:
        largest = max(p.get(name, getattr(cfg, name)) for p in command.presets.values())
        resolved.set(name, largest, "planner", "largest preset value")
    report = plan_run(command, resolved, device, limit.bytes, limit.text)
    for name in free:
        floor = floors.get(name, 32 if name == "image_size" else 1)
        while not report["fits"] and getattr(cfg, name) // 2 >= floor:
            value = getattr(cfg, name) // 2
            resolved.set(name, value, "planner", f"halved until the plan fits {limit.text}, "
                         f"{size_text(limit.bytes)} less {MARGIN:.0%}")
            report = plan_run(command, resolved, device, limit.bytes, limit.text)
        if report["fits"]:
            break
    return report


def render(report: dict[str, Any]) -> str:
    """The plan as a text table, one block per phase."""
    lines = [f"plan for {report['command']} on {report['device']}"]
    for phase, entry in report["phases"].items():
        lines.append(f"  {phase}")
        for name, size in sorted(entry["components"].items(), key=lambda kv: -kv[1]):
            note = f"  ({TERM_NOTES[name]})" if name in TERM_NOTES else ""
            lines.append(f"    {name:<22}{size / MiB:>14,.1f} MiB{note}")
        lines.append(f"    {'peak':<22}{entry['peak_bytes'] / MiB:>14,.1f} MiB")
    usable, peak = report["usable_bytes"], report["peak_bytes"]
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines.append(f"  limit: {report.get('limit', 'the budget')}")
    lines.append(f"  budget {report['budget_bytes'] / MiB:,.0f} MiB (usable {usable / MiB:,.0f} MiB): {verdict}, "
                 f"{abs(usable - peak) / MiB:,.0f} MiB {'to spare' if report['fits'] else 'over'}")
    return "\n".join(lines) + "\n"

