"""Opening a run: its directory, its task (restored on resume), config.json, the log and the plan check."""

from __future__ import annotations

import copy
import importlib.util
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

import fewshot_cli
from fewshot_cli.errors import BadInput, CannotWrite
from fewshot_cli.memory import check as plancheck
from fewshot_cli.memory.check import TRAINING_PHASES, PlanCheck
from fewshot_cli.memory.guard import MemoryGuard
from fewshot_cli.memory.limits import Limit
from fewshot_cli.memory.measure import probe
from fewshot_cli.runner import rundir
from fewshot_cli.runner.checkpoint import load_checkpoint
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import Resolved
from fewshot_cli.runner.distributed import Distributed, agreed
from fewshot_cli.runner.evaluation import EvaluationTask
from fewshot_cli.runner.faults import Faults
from fewshot_cli.runner.log import RunLog, read_log
from fewshot_cli.runner.task import RunContext, Task
from fewshot_cli.runner.tensorboard import TensorBoardLog


@dataclass
class LaunchRecord:
    """What config.json records of the launch beside the knobs."""

    #: the run directory or config.json `--config` copied the knobs from
    from_config: str | None = None
    #: the command's description of the data on disk (`{"data_format": ...}`; `Command.describe_data`)
    data: dict[str, Any] = field(default_factory=dict)
    #: the plan the run was fitted to (`memory.plan.fit`; None where it could not be made)
    plan: dict[str, Any] | None = None
    #: the number of torchrun processes; None in one process
    world_size: int | None = None

    def record(self) -> dict[str, Any]:
        from_config = {"from_config": self.from_config} if self.from_config is not None else {}
        world_size = {"world_size": self.world_size} if self.world_size is not None else {}
        return {**from_config, **self.data, "plan": self.plan, **world_size}


@dataclass
class RunOptions:
    """What a run needs besides its config."""

    device: torch.device
    seed: int = 0
    out: Path = Path("runs")
    name: str | None = None
    data: Path | None = None
    resume: Path | None = None
    budget_bytes: int | None = None
    quiet: bool = False
    #: TensorBoard curves go to TENSORBOARD/RUN_NAME as the run logs them
    tensorboard: Path | None = None
    #: set under torchrun with several processes: only rank 0 writes the run directory
    distributed: Distributed | None = None
    #: the limit the run is held to (`memory.devices.memory_limit`); a killing one is guarded
    limit: Limit | None = None
    #: the faults a test asked for (`runner.faults.Faults.requested`, read at launch); None in a normal run
    faults: Faults | None = None
    #: what the launcher records of itself in config.json; None for a run started without it
    launch: LaunchRecord | None = None


@dataclass
class Run:
    """An opened run, as the loop takes it: every rank has one; rank 0's alone writes."""

    command: Command
    opts: RunOptions
    task: Task | EvaluationTask
    log: Log
    run_dir: Path
    #: the first training step to run: 1, or on resume the step after the checkpoint's
    first_step: int
    #: each phase's plan against its measured peak; on other ranks it has no plan, so it never checks
    check: PlanCheck
    #: the resident set (MiB) as the loop starts; the probe that read it reset the CUDA peak
    rest_mb: float
    #: the training phase of the step last run (`Task.step_phase`), whose plan check comes when it ends
    training_phase: str = "train"

    @property
    def main(self) -> bool:
        return self.opts.distributed is None or self.opts.distributed.is_main

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def emit(self, event: str, **fields: Any) -> None:
        """An event of the task's own; a memory probe among its fields (extraction progress) belongs to the
        evaluation it happens in."""
        self.log.write(event, **fields)
        if isinstance(fields.get("mem"), dict):
            self.check.hold(fields["mem"])


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision_version(), "fewshot": fewshot_cli.__version__}


def torchvision_version() -> str:
    """`torchvision.__version__` (`0.29.1+cu130`: the package metadata's lacks the build), read from its
    version.py where torchvision is not loaded yet: importing it loads torch's dynamo, which a run that uses no
    torchvision would pay for at its start."""
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")  # finds the package without running its __init__
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            try:
                found = re.search(r"^__version__ = ['\"]([^'\"]+)['\"]", (Path(folder) / "version.py").read_text(),
                                  re.MULTILINE)
            except OSError:
                continue
            if found:
                return found.group(1)
    import torchvision  # where its version.py cannot be read: the package's own attribute

    return torchvision.__version__


class _NoLog:
    """What ranks other than 0 write to: nothing."""

    def write(self, event: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


#: where a run's events go: rank 0's log (and TensorBoard's), nowhere on other ranks
Log = RunLog | TensorBoardLog | _NoLog


class _Held:
    """The task's events until the run's log exists."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.run: Run | None = None

    def emit(self, event: str, **fields: Any) -> None:
        if self.run is None:
            self.events.append((event, fields))
        else:
            self.run.emit(event, **fields)

    def opened(self, run: Run) -> None:
        self.run = run
        for event, fields in self.events:
            run.emit(event, **fields)


def open_run(command: Command, resolved: Resolved, opts: RunOptions) -> Run:
    """Everything before the first step: the run directory (checked on every rank, named by rank 0), the task
    (restored on resume), config.json and the log; a run directory that cannot be written is bad input."""
    group = opts.distributed
    main = group is None or group.is_main
    run_dir = agreed(group, lambda: prepare_run_dir(opts, command) if main else None)
    if group is not None:  # the default name holds rank 0's clock
        run_dir = group.broadcast(run_dir)
    plan = opts.launch.plan if opts.launch is not None else None
    held = _Held()
    baseline_mb = plancheck.start(opts.device)  # the resident set before the model is built
    task, start_step, elapsed_offset = agreed(group, lambda: _start(command, resolved, opts, held.emit, run_dir,
                                                                    plancheck.recorded(run_dir, plan)))
    if not command.evaluation_only:
        task.prefetch(start_step + 1)
    if opts.resume is None:
        config = {"command": command.name, "preset": resolved.preset, "knobs": resolved.record(),
                  "seed": opts.seed, "device": str(opts.device), "data": str(opts.data) if opts.data else None,
                  "memory_budget_bytes": opts.budget_bytes, "versions": versions(),
                  "machine_memory_bytes": psutil.virtual_memory().total,
                  "memory_limit": opts.limit.record() if opts.limit is not None else None,
                  "weights": list(task.loaded_weights),
                  **(opts.launch.record() if opts.launch is not None else {})}
        agreed(group, lambda: rundir.claim(run_dir, config) if main else None)
    if group is not None:
        task.wrap_data_parallel()  # DistributedDataParallel starts every rank from rank 0's model
    run = Run(command, opts, task, _NoLog(), run_dir, start_step + 1, PlanCheck(opts.device, {}, baseline_mb),
              rest_mb=0.0)
    if main:
        task.ctx.run_dir = run_dir
        run.check.predicted_mb = _recorded_plan(command, resolved, opts.device, run_dir, plan).get("predicted_mb", {})
        _open_log(run, resolved, elapsed_offset, held)
    else:
        held.opened(run)
    run.rest_mb = probe(opts.device)["rss_mb"]  # also resets the CUDA peak so the first phase's peak is its own
    return run


def _start(command: Command, resolved: Resolved, opts: RunOptions, emit: Callable[..., None], run_dir: Path,
           plan: dict[str, Any] | None) -> tuple[Task, int, float]:
    """The task, the step its checkpoint holds (0 for a new run) and the log's elapsed time so far."""
    task = build_task(command, resolved, opts, emit, plan)
    start_step, elapsed_offset = 0, 0.0
    if opts.resume is not None:
        if (run_dir / "metrics.json").exists():
            raise BadInput(f"{run_dir} already completed; there is nothing to resume.")
        main = opts.distributed is None or opts.distributed.is_main
        past = read_log(run_dir / "log.jsonl") if main and (run_dir / "log.jsonl").exists() else []
        elapsed_offset = past[-1]["elapsed_s"] if past else 0.0
        # every rank reads the one checkpoint: it holds no rank's own state, so any number of ranks resumes it
        if (run_dir / "checkpoint.pt").exists():
            start_step = _restore(task, run_dir / "checkpoint.pt")
    return task, start_step, elapsed_offset


def _open_log(run: Run, resolved: Resolved, elapsed_offset: float, held: _Held) -> None:
    """The run's log, opened with `run_start` and the task's events so far; before the first step, one that
    cannot be written is bad input."""
    try:
        run.log = RunLog(run.run_dir / "log.jsonl", elapsed_offset)
        if run.opts.tensorboard is not None:
            run.log = TensorBoardLog(run.opts.tensorboard / run.run_dir.name, run.log)
        run.log.write("run_start", command=run.command.name, config=resolved.record(),
                      resumed_from_step=run.first_step - 1,
                      pid=os.getpid(), host=platform.node())  # so a report can tell a killed run from a running one
        held.opened(run)
    except CannotWrite as err:
        if run.opts.resume is None:
            rundir.release(run.run_dir)
        raise BadInput(str(err)) from None


def build_task(command: Command, resolved: Resolved, opts: RunOptions, emit: Callable[..., None],
               plan: dict[str, Any] | None = None) -> Task:
    torch.manual_seed(opts.seed)
    guard = MemoryGuard.for_limit(opts.limit) if opts.limit is not None else None
    if guard is not None and plan:
        guard.follow_plan(plan["predicted_mb"], None if plan["fits"] else _planner(command, resolved, opts.device))
    ctx = RunContext(device=opts.device, seed=opts.seed, run_dir=None, data=opts.data, emit=emit,
                     distributed=opts.distributed, guard=guard, faults=opts.faults)
    return command.task(resolved.config, ctx)


def _planner(command: Command, resolved: Resolved, device: torch.device) -> Callable[[str], float]:
    """A phase's plan (MiB) for the run's configuration as it is now, for the guard of a run forced over its limit.
    Training's back-offs split an episode into micro-steps without changing it: an evaluation is planned with their
    knobs as the run began. The tracing leaves the run's random state and autograd mode as they were."""
    from fewshot_cli.memory import plan  # the planner's tracing machinery: loaded only for a forced run

    began = copy.deepcopy(resolved.config)

    def predict(phase: str) -> float:
        now = copy.copy(resolved)
        now.config = copy.deepcopy(resolved.config)
        if phase not in TRAINING_PHASES:
            for knob in command.task.backoff_knobs:
                setattr(now.config, knob.name, getattr(began, knob.name))
        with torch.random.fork_rng(), torch.inference_mode(False), torch.enable_grad():
            return plan.record(plan.plan_run(command, now, device, None))["predicted_mb"][phase]

    return predict


def _recorded_plan(command: Command, resolved: Resolved, device: torch.device, run_dir: Path,
                   launched: dict[str, Any] | None) -> dict[str, Any]:
    """The plan a run was started with (the launcher's, or config.json's on resume), or, for a run started without
    one, a plan made now ({} where none can be made)."""
    record = plancheck.recorded(run_dir, launched)
    if record is None:
        from fewshot_cli.memory import plan  # the planner's tracing machinery: only for a run launched unplanned

        record = plan.checked_record(command, resolved, device)
    return record or {}


def prepare_run_dir(opts: RunOptions, command: Command) -> Path:
    if opts.resume is not None:
        return opts.resume
    name = opts.name or f"{command.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    run_dir = opts.out / name
    if run_dir.exists():
        raise BadInput(f"Run directory {run_dir} already exists; pass --resume {run_dir} or another --name.")
    return run_dir


def _restore(task: Task, path: Path) -> int:
    """Load a checkpoint into the task and return its step; one that cannot be read is bad input."""
    try:
        state = load_checkpoint(path)
        task.load_state_dict(state["task"])
        for name, value in state.get("knobs", {}).items():
            task.set_knob(name, value, state.get("accumulations", {}).get(name, state.get("accumulation", 1)))
        return int(state["step"])
    except Exception as err:  # noqa: BLE001 - truncated, not a checkpoint, or another run's: all one answer
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInput(f"--resume {path.parent}: {path.name} cannot be read ({type(err).__name__}: {cause}); "
                       "start a new run instead.") from err
