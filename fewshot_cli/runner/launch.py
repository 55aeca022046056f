"""The one way a run starts: a command, its knob values and the shared options in, the final metrics out.

The CLI, `fewshot demo` and the benchmarks call `launch`; `fewshot plan` calls `plan_report`. Here live the rules
that turn options into a run: a new run's device, preset and budget, `--config`, `--resume` (and the device it
continues on), torchrun placement, fitting the plan to the budget, and the CUDA memory cap. Importing this module
imports no torch: `--help` stays fast."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewshot_cli.errors import BadInput
from fewshot_cli.memory.limits import Limit, parse_size
from fewshot_cli.models import pretrained
from fewshot_cli.runner import rerun
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import Resolved, preset_choices, resolve

if TYPE_CHECKING:
    import torch

    from fewshot_cli.runner.distributed import Distributed
    from fewshot_cli.runner.opening import RunOptions


def _option(default: Any, help: str, metavar: str | None = None) -> Any:
    """A shared option's field: its default, and what `--help` shows of it: its text (`{choices}` there: the
    command's presets) and its value's placeholder."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class LaunchOptions:
    """The options every experiment command shares, one field per option, declared with their `--help` text (the
    CLI's `--json` and `--debug` are how it reports, not part of the run, so they are not here)."""

    preset: str | None = _option(None, "one of {choices} (default: the device's own)", "NAME")
    device: str = _option("auto", "auto, cpu, cuda, cuda:N or mps", "DEV")
    data: Path | None = _option(None, "a dataset on disk (default: built-in synthetic data)", "PATH")
    seed: int = _option(0, "every random choice derives from it", "N")
    out: Path = _option(Path("runs"), "where run directories go", "DIR")
    name: str | None = _option(None, "the run directory's name (default: COMMAND-UTCSTAMP)", "NAME")
    resume: Path | None = _option(None, "continue the run in RUN_DIR from its checkpoint", "RUN_DIR")
    config: Path | None = _option(None, "start a new run with the knobs of RUN_DIR (or its config.json)", "RUN_DIR")
    memory_budget: str | None = _option(None, "e.g. 15GiB; refuse a plan over it, cap CUDA", "SIZE")
    force: bool = _option(False, "run even when the plan exceeds the budget")
    quiet: bool = _option(False, "no progress bar")
    tensorboard: Path | None = _option(None, "write live TensorBoard curves to DIR/RUN_NAME (needs "
                                       "fewshot[tensorboard])", "DIR")
    #: the options typed on the command line, as opposed to defaulted: `--resume` and `--config` compare those
    given: frozenset[str] = frozenset()


def launch(command: Command, knobs: dict[str, Any], options: LaunchOptions) -> dict[str, float] | None:
    """Run `command` to its end with these knob values (None: not given) and options; its final metrics, or None
    on a torchrun rank other than 0 (rank 0 alone writes the run directory and reports)."""
    from fewshot_cli.memory.torch_private import defer_dynamo  # loads torch, which --help must not
    from fewshot_cli.runner import distributed

    defer_dynamo("torch.optim")  # else torch's optimizers import its dynamo (seconds) before the first step
    group = distributed.from_env()  # under torchrun every rank runs this
    try:
        metrics = _run(command, knobs, options, group)
    finally:
        distributed.shutdown(group)
    return metrics if group is None or group.is_main else None


def _run(command: Command, knobs: dict[str, Any], options: LaunchOptions, group: Distributed | None
         ) -> dict[str, float]:
    from fewshot_cli.memory.devices import cap_memory  # loads torch, which --help must not
    from fewshot_cli.runner.distributed import agreed
    from fewshot_cli.runner.faults import Faults
    from fewshot_cli.runner.loop import run

    resolved, opts = agreed(group, lambda: _prepare(command, knobs, options, group))
    opts.faults = Faults.requested(os.environ, resolved.config, group.rank if group is not None else 0)
    if opts.budget_bytes:
        cap_memory(opts.device, opts.budget_bytes)
    return run(command, resolved, opts)


def _prepare(command: Command, knobs: dict[str, Any], options: LaunchOptions, group: Distributed | None
             ) -> tuple[Resolved, RunOptions]:
    """Everything checked before anything is written: every rank does it, and bad input on one is bad input on all."""
    from fewshot_cli.runner import tensorboard  # an optional extra: only --tensorboard needs it

    if group is not None and (command.evaluation_only or not command.data_parallel):
        raise BadInput(f"{command.name} runs in one process: start it with `fewshot {command.name}`, not "
                       f"under torchrun with {group.world_size} processes.")
    if options.resume is not None:
        resolved, opts = _resumed(command, knobs, options)
    else:
        resolved, opts = _new(command, knobs, options, group)
    if group is not None:
        opts.device, opts.distributed = group.place(opts.device), group
        opts.launch.world_size = group.world_size
    if options.tensorboard is not None:
        tensorboard.require()
        opts.tensorboard = Path(options.tensorboard)
    return resolved, opts


def _resumed(command: Command, knobs: dict[str, Any], options: LaunchOptions) -> tuple[Resolved, RunOptions]:
    """The recorded run, on its own device type unless `--device` names another."""
    from fewshot_cli.runner.device import resolve_device  # loads torch, which --help must not
    from fewshot_cli.runner.opening import LaunchRecord, RunOptions

    run_dir = Path(options.resume)
    resolved, record, device_name = rerun.resumed(command, run_dir, knobs, options)
    device = resolve_device(device_name)
    resolved.config.check_device(device.type)
    budget = record.get("memory_budget_bytes")
    return resolved, RunOptions(device=device, seed=record["seed"], resume=run_dir,
                                quiet=options.quiet, data=Path(record["data"]) if record.get("data") else None,
                                budget_bytes=budget, limit=held_to(device, budget), launch=LaunchRecord())


def _new(command: Command, knobs: dict[str, Any], options: LaunchOptions, group: Distributed | None
         ) -> tuple[Resolved, RunOptions]:
    """A new run (from `--config`'s record where given), its plan fitted to the budget or checked."""
    from fewshot_cli.memory import plan  # loads torch, which --help must not
    from fewshot_cli.runner.opening import LaunchRecord, RunOptions

    copied: set[str] = set()
    record = LaunchRecord()
    if options.config is not None:
        knobs, options, copied = rerun.from_config(command, Path(options.config), knobs, options)
        record.from_config = str(options.config)
    device, resolved, budget = resolve_new(command, knobs, options)
    resolved.sources.update(dict.fromkeys(copied, "config"))  # fixed: the planner leaves them alone
    if group is not None:
        device = group.place(device)
    record.data = _data_record(command, resolved, options.data)
    limit = held_to(device, budget, group)  # config.json records it as `memory_limit`
    record.plan = plan.fit(command, resolved, device, limit, force=options.force)
    return resolved, RunOptions(device=device, seed=options.seed, out=Path(options.out), name=options.name,
                                data=Path(options.data) if options.data else None, budget_bytes=budget,
                                quiet=options.quiet, limit=limit, launch=record)


def held_to(device: torch.device, budget: int | None, group: Distributed | None = None) -> Limit:
    """The limit a run is held to (`memory.devices.memory_limit`); under torchrun the ranks on one machine share the
    host's memory, so on the CPU each rank is held to its share."""
    from fewshot_cli.memory.devices import memory_limit  # loads torch, which --help must not

    limit, _ = memory_limit(device, budget)
    ranks = group.local_world_size if group is not None else 1
    if ranks > 1 and device.type == "cpu":
        limit = replace(limit, bytes=limit.bytes // ranks, text=f"{limit.text} shared by {ranks} ranks")
    return limit


def resolve_new(command: Command, knobs: dict[str, Any], options: LaunchOptions
                ) -> tuple[torch.device, Resolved, int | None]:
    """Device, preset and config of a new run, all checked before anything is written."""
    from fewshot_cli.runner.device import device_preset, resolve_device  # loads torch, which --help must not

    if command.prepare is not None:
        command.prepare(knobs)
    device = resolve_device(options.device)
    preset = options.preset or device_preset(device)
    if preset not in preset_choices(command.presets):
        raise BadInput(f"Unknown preset {preset!r}; choose one of {', '.join(preset_choices(command.presets))}.")
    budget = parse_size(options.memory_budget) if options.memory_budget else None
    if options.data is not None and not Path(options.data).exists():
        raise BadInput(f"--data {options.data} does not exist.")
    base_preset = device_preset(device) if preset == "auto" else preset
    resolved = resolve(command.config, command.presets, base_preset, knobs)
    resolved.preset = preset
    _settle_weights(resolved, options.data)
    resolved.config.check_device(device.type)
    return device, resolved, budget


def _settle_weights(resolved: Resolved, data: Path | None) -> None:
    """A preset's DEFAULT weights become none where they cannot apply; a command without `--weights` has none."""
    if hasattr(resolved.config, "weights"):
        pretrained.settle(resolved, data)


def plan_report(command: Command, knobs: dict[str, Any], options: LaunchOptions) -> dict[str, Any]:
    """`fewshot plan`: each phase's predicted peak for these knobs and options, and the earlier runs' checks. A plan
    needs no device: `--preset t4` on a laptop plans for a T4. A plan over its limit carries `advice`, the sentence
    saying what would make it fit."""
    from fewshot_cli.memory import plan  # loads torch, which --help must not
    from fewshot_cli.memory.check import earlier_checks
    from fewshot_cli.memory.devices import memory_limit

    preset = options.preset or "auto"
    device, nominal = _plan_target(preset, options.device)
    budget = parse_size(options.memory_budget) if options.memory_budget else None
    if nominal is None:  # a device of this machine: the limit a run here would be held to
        limit, _ = memory_limit(device, budget)
    else:
        limit = Limit(budget, "budget", "--memory-budget") if budget else Limit(nominal, "device",
                                                                                f"the {preset} device's memory")
    base = preset if preset in command.presets else _device_preset_name(device)
    resolved = resolve(command.config, command.presets, base, knobs)
    resolved.preset = preset
    _settle_weights(resolved, options.data)
    if preset == "auto":
        plan.fit(command, resolved, device, limit, force=True)
    report = plan.plan_run(command, resolved, device, limit.bytes, limit.text)
    if not report["fits"]:
        report["advice"] = plan.advice(command, resolved, device, limit, report)
    report.update(_data_record(command, resolved, options.data), data=str(options.data) if options.data else None)
    report["earlier_runs"] = earlier_checks(Path(options.out), command.name, resolved.record(), device)
    return report


def _data_record(command: Command, resolved: Resolved, data: Path | None) -> dict[str, Any]:
    """What config.json and the plan say of the data on disk (its layout), where the command describes it."""
    if command.describe_data is None:
        return {}
    return command.describe_data(resolved.config, Path(data) if data is not None else None)


def plan_text(report: dict[str, Any], verbose: bool = False) -> str:
    """A plan report as `fewshot plan` prints it; `verbose` adds each line's source."""
    from fewshot_cli.memory import plan  # loads torch, which --help must not
    from fewshot_cli.memory.check import render_earlier

    data = f"  data on disk: {report['data']}, layout {report.get('data_format')}" if report.get("data") else ""
    if report.get("test_data_format"):
        data += f"; test data layout {report['test_data_format']}"
    data += "\n" if data else ""
    return plan.render(report, verbose) + data + render_earlier(report["earlier_runs"])


def _device_preset_name(device: torch.device) -> str:
    """The preset of the device a plan is for (a CUDA device not on this machine: t4's)."""
    import torch  # loads torch, which --help must not

    from fewshot_cli.runner.device import device_preset  # loads torch too

    return device_preset(device) if device.type != "cuda" or torch.cuda.is_available() else "t4"


def _plan_target(preset: str, device_name: str) -> tuple[torch.device, int | None]:
    """The device a plan is for and its nominal memory: an explicit --device if it is here (None: its memory is
    what `memory.devices.memory_limit` finds), else the preset's device."""
    import torch  # torch only once a plan is asked for: --help stays torch-free

    from fewshot_cli.memory.plan import PRESET_DEVICES  # as torch: loaded only once a plan is asked for
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
