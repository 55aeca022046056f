"""Memory planning: trace one real step of each phase on meta (or fake) tensors and add the device's own terms."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import textwrap
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest.mock import patch

import psutil
import torch
from torch import nn

from fewshot_cli.errors import BadInput
from fewshot_cli.memory.check import TRAINING_PHASES, predicted_mb
from fewshot_cli.memory.devices import device_memory_bytes
from fewshot_cli.memory.limits import Limit, host_limits, size_text, tightest
from fewshot_cli.memory.measure import MiB
from fewshot_cli.memory.meta_tensors import MetaTensors
from fewshot_cli.memory.onednn import ConvCopies
from fewshot_cli.memory.onednn import in_use as onednn_in_use
from fewshot_cli.memory.step_tracker import StepTracker
from fewshot_cli.memory.terms import CPU_LINES, HOST_LINES, TERM_NOTES, TERM_TAGS, device_terms
from fewshot_cli.memory.torch_private import META_TRACE_PACKAGES, FakeTensor, FakeTensorMode, defer_dynamo

if TYPE_CHECKING:
    from fewshot_cli.runner.command import Command
    from fewshot_cli.runner.config import Resolved

MARGIN = 0.10  # the planner keeps 10% of the budget free

#: the device each preset is made for and its memory, so a plan for it can be made from any machine
PRESET_DEVICES = {"t4": ("cuda", int(15.89 * 1024**3)), "a100": ("cuda", 80 * 1024**3),
                  "h100": ("cuda", 80 * 1024**3), "mps": ("mps", int(47.74 * 1024**3))}
_KINDS = {"PARAM": "parameters", "BUFFER": "buffers", "GRAD": "gradients", "OPT": "optimizer_state",
          "ACT": "activations", "TEMP": "temporaries", "OTH": "other"}


@contextmanager
def meta_tensors() -> Iterator[None]:
    """Meta tensors for the block (`memory.meta_tensors`), with the reads of a value and the module moves a traced
    step needs; every patch is undone when the block ends, also when it raises."""
    with MetaTensors(), _moves_on_cpu(), _fake_reads(lambda tensor: tensor.is_meta):
        yield


@contextmanager
def fake_tensors() -> Iterator[None]:
    """torch's fake CPU tensors for the block, with the same reads and moves as `meta_tensors`."""
    with FakeTensorMode(allow_non_fake_inputs=True), _moves_on_cpu(), \
            _fake_reads(lambda tensor: isinstance(tensor, FakeTensor)):
        yield


@contextmanager
def _moves_on_cpu() -> Iterator[None]:
    """Planning builds on the CPU, where moving a module is a no-op, as is changing its parameters' layout (their
    bytes stay the same); fake parameters cannot be swapped in place."""
    original = nn.Module.to

    def to(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        targets = [a for a in (*args, *kwargs.values()) if a is not None and not isinstance(a, torch.memory_format)]
        if all(isinstance(a, str | torch.device) and torch.device(a).type == "cpu" for a in targets):
            return module
        return original(module, *args, **kwargs)

    with patch.object(nn.Module, "to", to):
        yield


@contextmanager
def _fake_reads(is_fake: Callable[[torch.Tensor], bool]) -> Iterator[None]:
    """Reading a value out of a traced tensor (`is_fake`: a meta or a fake one; a logged loss, an optimizer's step
    count, a fallback check) gives one (False for a truth test): planning follows shapes, and a command's shapes
    come from its config, not its data."""
    with ExitStack() as stack:  # a patch that fails to apply undoes those applied before it
        for name, zero in (("item", 1), ("__float__", 1.0), ("__int__", 1), ("__bool__", False), ("tolist", 1)):
            original = getattr(torch.Tensor, name)

            def read(self: torch.Tensor, *args: Any, _original=original, _zero=zero) -> Any:
                return _zero if is_fake(self) else _original(self, *args)

            stack.enter_context(patch.object(torch.Tensor, name, read))
        yield


#: how a step is traced: `meta` tries meta tensors and falls back to fake ones where the step cannot run on them
TENSORS = ("meta", "fake", "real")


def trace(command: Command, config: Any, seed: int = 0, tensors: str = "meta", notes: dict[str, Any] | None = None
          ) -> dict[str, dict[str, int]]:
    """Per phase, the bytes of each kind at that phase's peak. `tensors`: `meta` (the default) traces on meta
    tensors, nothing allocated, and where the step cannot run on them or could differ (`MetaTensors`: autocast, so
    any config with `amp` on, attention, code that reads a tensor's device) on torch's fake CPU tensors, the same
    bytes at about twice the time and with torch's dynamo loaded; `fake`, fake tensors alone; `real`, the same steps
    for real on the CPU under the same tracker (to check the prediction). `notes`, where given, receives the task's
    `plan_notes` (`lines`), what a model built without its weights came from (`planned_from`) and the tensors it
    was traced on (`traced_on`)."""
    if tensors not in TENSORS:
        raise ValueError(f"a step is traced on {', '.join(TENSORS)} tensors, not {tensors!r}")
    if tensors == "meta" and getattr(config, "amp", False):  # autocast does not apply to meta tensors: the trace
        tensors = "fake"  # would fail at its first autocast, after building the task
    if tensors == "meta":
        defer_dynamo("fewshot_cli.memory", *META_TRACE_PACKAGES)  # the modes' first op, the meta kernels
        try:
            return _trace(command, config, seed, meta_tensors, notes, "meta")
        except BadInput:
            raise
        except Exception:  # noqa: BLE001 - the step cannot run on meta tensors: on fake ones it can
            tensors = "fake"
    return _trace(command, config, seed, fake_tensors if tensors == "fake" else nullcontext, notes, tensors)


def _trace(command: Command, config: Any, seed: int, context: Callable[[], Any], notes: dict[str, Any] | None,
           tensors: str) -> dict[str, dict[str, int]]:
    cfg = copy.deepcopy(config)
    for name in ("weights", "init"):  # the values of the weights change no tensor's size: trace none
        if hasattr(cfg, name):
            setattr(cfg, name, None)
    phases: dict[str, dict[str, int]] = {}
    command.task  # noqa: B018 - imported before tracing: a module's own tensors (constants) must be real
    with context():
        torch.manual_seed(seed)
        task = command.traced_task(cfg, seed)
        extra = task.plan_extra_bytes()
        if notes is not None:
            notes["lines"] = task.plan_notes() if hasattr(task, "plan_notes") else {}
            notes["planned_from"] = getattr(task.model, "planned_from", None)
            notes["traced_on"] = tensors
        for phase, step in task.plan_phases().items():
            tracker = StepTracker()
            tracked = (task.plan_tracked(phase) if hasattr(task, "plan_tracked")
                       else (task.model, getattr(task, "optimizer", None)))
            tracker.track_external(*(m for m in tracked if m is not None))
            train = phase in TRAINING_PHASES
            task.model.train(train)
            copies = ConvCopies(tracker)
            with tracker, copies, (nullcontext() if train else torch.inference_mode()):
                step()
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


#: the environment variable naming the folder of traced plans (`off`: no cache)
CACHE_ENV = "FEWSHOT_PLAN_CACHE"
#: the layout of a cached trace; a new one invalidates every file of the old
CACHE_FORMAT = 1


def cache_dir() -> Path | None:
    """Where traced plans are kept: $FEWSHOT_PLAN_CACHE, else $XDG_CACHE_HOME/fewshot/plans (~/.cache/...); None
    when $FEWSHOT_PLAN_CACHE is `off` (or 0, no, false)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "no", "false"):
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fewshot" / "plans"


def cached_trace(command: Command, config: Any, notes: dict[str, Any]) -> dict[str, dict[str, int]]:
    """`trace(command, config)` (fake tensors, seed 0), taken from the cache where the same trace was made before
    (`trace_key`: everything a trace depends on), else traced and kept. A trace is the same bytes whenever its key
    is: it follows shapes, which come from the config and the code, never from the data, the weights or the
    machine's memory (what the machine adds, the device's lines and the start-up baseline, is not cached). A model
    planned from files outside the key (`planned_from`: a Hugging Face config) is traced every time. A cache that
    cannot be read or written is passed by: the plan is traced."""
    folder = cache_dir()
    path = folder / f"{trace_key(command, config)}.json" if folder is not None else None
    if path is not None:
        kept = _read_kept(path)
        if kept is not None:
            notes.update(kept["notes"])
            return kept["phases"]
    traced = trace(command, config, notes=notes)
    if path is not None and notes.get("planned_from") is None:
        _keep(path, {"format": CACHE_FORMAT, "command": command.name, "phases": traced,
                     "notes": {"lines": notes.get("lines", {}), "planned_from": None}})
    return traced


def trace_key(command: Command, config: Any) -> str:
    """What a trace depends on, hashed: the command, every knob's value (less the weights, which `trace` leaves
    out), fewshot's code, torch's, torchvision's and python's versions, whether CPU convolutions go through oneDNN
    (its copies are a line) and torch's default dtype."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    for name in ("weights", "init"):
        if name in values:
            values[name] = None
    try:
        vision = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        vision = None
    modules = sorted({command.task_path.partition(":")[0], type(config).__module__})  # a plugin's code too
    described = {"format": CACHE_FORMAT, "command": command.name, "config": values, "code": _code_hash(),
                 "command_code": {name: _module_hash(name) for name in modules},
                 "torch": torch.__version__, "torchvision": vision, "python": platform.python_version(),
                 "onednn": onednn_in_use(), "dtype": str(torch.get_default_dtype())}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()[:32]


@functools.cache
def _code_hash() -> str:
    """The sha256 of fewshot's own source files (each one's path and bytes): any change to the code is a new key."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _module_hash(name: str) -> str | None:
    """The sha256 of a module's source file (a command registered from outside fewshot: its task and config), None
    where it has none to read."""
    spec = importlib.util.find_spec(name)
    try:
        return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest() if spec and spec.origin else None
    except OSError:
        return None


def _read_kept(path: Path) -> dict[str, Any] | None:
    """A kept trace, or None where there is none or it is not one (then it is traced again and rewritten)."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("format") != CACHE_FORMAT:
        return None
    phases, notes = kept.get("phases"), kept.get("notes")
    if not isinstance(phases, dict) or not isinstance(notes, dict) or not all(
            isinstance(lines, dict) and all(isinstance(v, int) for v in lines.values()) for lines in phases.values()):
        return None
    return {"phases": phases, "notes": {"lines": notes.get("lines") or {}, "planned_from": None}}


def _keep(path: Path, kept: dict[str, Any]) -> None:
    """Write a trace atomically (a reader never sees half a file); a folder that cannot be written is passed by."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(kept))
        os.replace(partial, path)
    except OSError:
        pass


def _by_kind(snapshot: dict[Any, dict[Any, int]]) -> dict[str, int]:
    """A StepTracker snapshot's bytes per plan line, summed over devices."""
    components: dict[str, int] = {}
    for per_device in snapshot.values():
        for kind, size in per_device.items():
            name = _KINDS.get(kind)
            if name and size:
                components[name] = components.get(name, 0) + int(size)
    return components


#: where the other lines come from, shown under --verbose
LINE_SOURCES = {
    "parameters": "traced: the model's parameters",
    "buffers": "traced: the model's buffers (batch-norm statistics, constants)",
    "gradients": "traced: the parameters' gradients",
    "optimizer_state": "traced: the optimizer's state (Adam's two moments), live from the second step on",
    "activations": "traced: what the step keeps for backward or holds at its peak, under fake tensors",
    "temporaries": "traced: tensors the step frees before it ends",
    "image_cache": "decoded images a loader keeps for reuse: --image-cache-mb per loader, split among its "
                   "--workers, bounded by the images the run has read by then; training validates with a loader "
                   "of its own, so its phase holds two caches (the command's plan_extra_bytes)",
    "loader_prefetch": "batches the loaders' --workers hold ready, the prefetch factor per worker "
                       "(fewshot_cli/data/loader.py)",
    "evaluation_features": "features an evaluation keeps across its episodes (the command's plan_extra_bytes)",
}
#: knobs besides a command's `plan_knobs` that decide a peak: a plan's header names those the command has
HEADER_KNOBS = ("backbone", "model", "image_size", "n_way", "k_shot", "n_query", "batch_size",
                "triplet_batch_size", "proposals_top_k", "pretrain_epochs", "pretrain_batch_size", "amp",
                "checkpoint_activations", "workers", "image_cache_mb")
#: switches that lower a peak: a plan over its limit says whether each alone would fit
SAVING_SWITCHES = ("amp", "checkpoint_activations")
_SOURCES = {"cli": "given", "config": "--config", "planner": "planner"}
WIDTH = 80  # a plan's lines fit a terminal of 80 columns


def startup_baseline(device: torch.device) -> int:
    """On the CPU, what the process holds before a run builds its model (the interpreter, torch and the libraries
    it loaded), measured now; a CPU budget is the whole process's."""
    return psutil.Process().memory_info().rss if device.type == "cpu" else 0


def plan_run(command: Command, resolved: Resolved, device: torch.device, budget: int | None,
             limit_text: str | None = None, host: Limit | None = None) -> dict[str, Any]:
    """The contract's plan report: per phase its lines and peak, the limit the run is held to (`budget`, named by
    `limit_text`) and whether it fits. On CUDA and MPS the host's lines (loaders' caches and batches, this process)
    are a section of their own against the host's limit (`host`; default: the tightest of `host_limits`):
    `phases[P]` holds the device's lines and `phases[P]["host"]` the host's. On the CPU there is one section, the
    host's. `fits`: every section does."""
    budget = budget or device_memory_bytes(device)
    for name in getattr(command.task, "plan_libraries", ()):  # loaded lazily by a phase: the baseline counts them
        importlib.import_module(name)
    baseline = startup_baseline(device)  # before tracing, which loads more of torch
    host_baseline = psutil.Process().memory_info().rss if device.type != "cpu" else 0
    notes: dict[str, Any] = {}
    traced = cached_trace(command, resolved.config, notes)
    phases = {}
    for phase, components in traced.items():
        components = {k: v for k, v in components.items() if device.type == "cpu" or k not in CPU_LINES}
        bf16_evaluation = ("train" in traced and phase not in TRAINING_PHASES
                           and bool(getattr(resolved.config, "amp", False)))
        components = {**components, **device_terms(device, components, baseline, "train" in traced,
                                                   bf16_evaluation)}
        phases[phase] = _split(device, components, host_baseline)
    main = "host" if device.type == "cpu" else "device"
    sections = {main: _verdict(phases, budget, limit_text or "the device's memory")}
    if device.type != "cpu":
        host = host or tightest(host_limits())
        sections["host"] = _verdict({p: e["host"] for p, e in phases.items()}, host.bytes, host.text)
    first = sections[main]
    return {"command": command.name, "device": str(device), "preset": resolved.preset,
            "knobs": header_knobs(command, resolved), "planned_from": notes.get("planned_from"),
            "notes": notes.get("lines", {}), "budget_bytes": budget, "peak_bytes": first["peak_bytes"],
            "limit": first["limit"], "usable_bytes": first["usable_bytes"], "phases": phases, "sections": sections,
            "fits": all(section["fits"] for section in sections.values())}


def _split(device: torch.device, components: dict[str, int], host_baseline: int) -> dict[str, Any]:
    """One phase's lines: on the CPU all in one; elsewhere the device's, with the host's under `host`."""
    if device.type == "cpu":
        return {"peak_bytes": sum(components.values()), "components": components}
    on_host = {k: v for k, v in components.items() if k in HOST_LINES}
    on_host["startup_baseline"] = host_baseline
    on_device = {k: v for k, v in components.items() if k not in HOST_LINES}
    return {"peak_bytes": sum(on_device.values()), "components": on_device,
            "host": {"peak_bytes": sum(on_host.values()), "components": on_host}}


def _verdict(phases: dict[str, dict[str, Any]], budget: int, limit_text: str) -> dict[str, Any]:
    """A section's peak over its phases against its limit, with the planner's margin kept free."""
    phase = max(phases, key=lambda p: phases[p]["peak_bytes"]) if phases else None
    peak = phases[phase]["peak_bytes"] if phase else 0
    usable = int(budget * (1 - MARGIN))
    return {"limit": limit_text, "budget_bytes": budget, "usable_bytes": usable, "peak_bytes": peak,
            "peak_phase": phase, "fits": peak <= usable}


def header_knobs(command: Command, resolved: Resolved) -> dict[str, dict[str, Any]]:
    """The knobs that decide the peak, in the order a header names them, each with its value and source."""
    names = [*command.plan_knobs, *(k for k in HEADER_KNOBS if k not in command.plan_knobs)]
    cfg = resolved.config
    pretrains = bool(getattr(cfg, "pretrain_epochs", 0))  # pre-training's knobs matter only where it runs
    return {k: {"value": getattr(cfg, k), "source": resolved.sources.get(k, "default")}
            for k in names if hasattr(cfg, k) and (pretrains or not k.startswith("pretrain_"))}


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
    name, section = _failing(report)
    on_host = name == "host" and len(report["sections"]) > 1
    text, size = (section["limit"], section["budget_bytes"]) if on_host else (limit.text, limit.bytes)
    knobs = [k for k in command.plan_knobs if resolved.sources.get(k) != "planner"] or list(command.plan_knobs)
    lower = ", ".join(f"--{_option(k)}" for k in knobs) or "the configuration"
    return (f"The plan does not fit: {'host memory: ' if on_host else ''}{text} is {size_text(size)}, and the plan "
            f"needs {size_text(section['peak_bytes'])} at its peak ({section['peak_phase']}) with {MARGIN:.0%} kept "
            f"free; lower {lower} (--preset auto picks what fits), or pass --force to run anyway and back off.")


def advice(command: Command, resolved: Resolved, device: torch.device, limit: Limit, report: dict[str, Any]
           ) -> str:
    """The one sentence a plan over its limit ends with: what it needs of what, the knobs `--preset auto` would
    choose (planned on a copy: `resolved` is left as it is), and whether each of `SAVING_SWITCHES` alone fits."""
    parts = [_shortfall(report)]
    if resolved.preset != "auto" and command.plan_knobs:
        trial = copy.deepcopy(resolved)
        trial.preset = "auto"
        chosen = _choose(command, trial, device, limit)
        changed = [k for k in command.plan_knobs if getattr(trial.config, k) != getattr(resolved.config, k)]
        if chosen["fits"] and changed:
            parts.append("--preset auto would run with " + " ".join(
                f"--{_option(k)} {_value(getattr(trial.config, k))}" for k in changed))
        elif not chosen["fits"]:
            parts.append("--preset auto finds no configuration that fits")
    elif resolved.preset == "auto":
        chosen = [f"--{_option(k)} {_value(getattr(resolved.config, k))}" for k in command.plan_knobs
                  if resolved.sources.get(k) == "planner"]
        if chosen:
            parts.append(f"--preset auto went down to {' '.join(chosen)}")
    for switch in SAVING_SWITCHES:
        if getattr(resolved.config, switch, True) is False:
            trial = copy.deepcopy(resolved)
            trial.set(switch, True, "cli")
            tried = plan_run(command, trial, device, limit.bytes, limit.text)
            _, worst = _failing(tried)
            verdict = "fits" if tried["fits"] else "does not fit"
            parts.append(f"--{_option(switch)} alone {verdict} ({size_text(worst['peak_bytes'])} at its peak)")
    return "; ".join(parts) + "."


def _failing(report: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The section furthest over (or least under) its usable memory, and its name."""
    return max(report["sections"].items(), key=lambda kv: kv[1]["peak_bytes"] / max(1, kv[1]["usable_bytes"]))


def _shortfall(report: dict[str, Any]) -> str:
    """`The plan does not fit: needs X at its peak (train) of Y usable (LIMIT less 10%)`, per section over."""
    said = []
    for name, section in report["sections"].items():
        if not section["fits"]:
            where = "host memory " if name == "host" and len(report["sections"]) > 1 else ""
            said.append(f"{where}needs {size_text(section['peak_bytes'])} at its peak ({section['peak_phase']}) of "
                        f"{size_text(section['usable_bytes'])} usable ({section['limit']} less {MARGIN:.0%})")
    return "The plan does not fit: " + ", and ".join(said)


def _option(knob: str) -> str:
    return knob.replace("_", "-")


def _value(value: Any) -> str:
    """A knob's value as a command line writes it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def record(report: dict[str, Any]) -> dict[str, Any]:
    """What a run keeps of its plan (in config.json): the verdict and, per phase, the peak its own measure sees."""
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


def render(report: dict[str, Any], verbose: bool = False) -> str:
    """The plan as text of at most 80 columns: a header (command, device, preset, the knobs that decide the peak),
    then one section per memory (the device's, and on CUDA and MPS the host's), each its phases' lines against its
    own limit and its verdict. `verbose` adds each line's source under it."""
    lines = _header(report)
    sections = report["sections"]
    for name, section in sections.items():
        on_host = name == "host" and len(sections) > 1
        title = "host memory" if name == "host" else f"device memory ({report['device']})"
        lines += _wrap(f"{title}: {section['limit']}, {size_text(section['budget_bytes'])}, {MARGIN:.0%} kept free",
                       "", "  ")
        for phase, entry in report["phases"].items():
            part = entry["host"] if on_host else entry
            notes = report.get("notes", {}).get(phase, {})
            lines.append(f"  {phase}")
            for line, size in sorted(part["components"].items(), key=lambda kv: -kv[1]):
                lines.append(_line(line, size, notes.get(line) or TERM_TAGS.get(line, "")))
                source = TERM_NOTES.get(line) or LINE_SOURCES.get(line)
                if verbose and source:
                    lines += _wrap(f"source: {source}", "      ", "        ")
            lines.append(f"    {'peak':<20}{part['peak_bytes'] / MiB:>12,.1f} MiB")
        lines += _wrap(_section_verdict(section), "  ", "    ")
    return "\n".join(lines) + "\n"


def _header(report: dict[str, Any]) -> list[str]:
    """What the plan is for: command, device, preset and the knobs that decide its peak, with their sources."""
    lines = [f"plan for {report['command']} on {report['device']}, preset {report.get('preset')}"]
    preset = report.get("preset")
    sources = {**_SOURCES, "preset": preset if preset and preset != "auto" else "preset"}
    items = [f"--{_option(k)} {_value(v['value'])} ({sources.get(v['source'], v['source'])})"
             for k, v in report.get("knobs", {}).items()]
    row = "  knobs:"
    for i, item in enumerate(items):
        item += "," if i < len(items) - 1 else ""
        if len(row) + 1 + len(item) > WIDTH:
            lines.append(row)
            row = "        "
        row += " " + item
    lines.append(row)
    if report.get("planned_from"):
        lines += _wrap(f"model: planned from {report['planned_from']}", "  ", "    ")
    return lines


def _line(name: str, size: int, tag: str) -> str:
    """One plan line, its tag cut to fit 80 columns."""
    text = f"    {name:<20}{size / MiB:>12,.1f} MiB"
    if tag:
        room = WIDTH - len(text) - 2
        text += "  " + (tag if len(tag) <= room else tag[:room - 3] + "...")
    return text


def _section_verdict(section: dict[str, Any]) -> str:
    usable, peak = section["usable_bytes"], section["peak_bytes"]
    if section["fits"]:
        return (f"fits: peak {size_text(peak)} ({section['peak_phase']}) of {size_text(usable)} usable, "
                f"{size_text(usable - peak)} to spare")
    return (f"does NOT fit: peak {size_text(peak)} ({section['peak_phase']}) of {size_text(usable)} usable, "
            f"{size_text(peak - usable)} over")


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False,
                         break_long_words=False) or [first]
