"""The one device-aware training loop: steps, validation, test, memory probes, back-off, leaks, checkpoints."""

from __future__ import annotations

import copy
import os
import platform
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torchvision

import fewshot_cli
from fewshot_cli.errors import BadInput, CannotWrite, Interrupted, RunFailed
from fewshot_cli.memory import check as plancheck
from fewshot_cli.memory.check import CheckedLog, PlanCheck
from fewshot_cli.memory.guard import MemoryGuard
from fewshot_cli.memory.limits import Limit
from fewshot_cli.memory.measure import MiB, is_oom, probe, release
from fewshot_cli.runner import rundir
from fewshot_cli.runner.checkpoint import load_checkpoint, save_checkpoint, save_json
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import Resolved
from fewshot_cli.runner.distributed import Distributed, StepFailedElsewhere, agreed
from fewshot_cli.runner.evaluation import EvaluationTask
from fewshot_cli.runner.faults import Faults
from fewshot_cli.runner.input_wait import InputWait
from fewshot_cli.runner.leaks import LeakDetector
from fewshot_cli.runner.log import RunLog, read_log
from fewshot_cli.runner.progress import Progress
from fewshot_cli.runner.task import RunContext, Task, step_seed
from fewshot_cli.runner.tensorboard import TensorBoardLog


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


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "fewshot": fewshot_cli.__version__}


class _NoLog:
    """What ranks other than 0 write to: nothing."""

    def write(self, event: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request honoured between steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextmanager
    def installed(self):
        handlers = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum


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
        if phase != "train":
            for knob in command.task.backoff_knobs:
                setattr(now.config, knob.name, getattr(began, knob.name))
        with torch.random.fork_rng(), torch.inference_mode(False), torch.enable_grad():
            return plan.record(plan.plan_run(command, now, device, None))["predicted_mb"][phase]

    return predict


def _recorded_plan(command: Command, resolved: Resolved, device: torch.device, run_dir: Path,
                   extra_config: dict[str, Any] | None) -> dict[str, Any]:
    """The plan a run was started with (config.json's on resume), or, for a run started without one, a plan made
    now ({} where none can be made)."""
    record = plancheck.recorded(run_dir, extra_config)
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


def run(command: Command, resolved: Resolved, opts: RunOptions, extra_config: dict[str, Any] | None = None
        ) -> dict[str, float]:
    """Run a command's task to its end and return the final metrics (written to `metrics.json`).

    Under torchrun every rank runs this; rank 0 alone writes the run directory."""
    group = opts.distributed
    main = group is None or group.is_main
    run_dir = agreed(group, lambda: prepare_run_dir(opts, command) if main else None)
    if group is not None:  # the default name holds rank 0's clock
        run_dir = group.broadcast(run_dir)
    pending: list[tuple[str, dict[str, Any]]] = []  # events the task emits before the log exists
    log: RunLog | _NoLog | None = None

    def emit(event: str, **fields: Any) -> None:
        if log is None:
            pending.append((event, fields))
        else:
            log.write(event, **fields)

    checkpoint_path = run_dir / "checkpoint.pt"
    baseline_mb = plancheck.start(opts.device)  # the resident set before the model is built

    def start() -> tuple[Task, int, float]:
        task = build_task(command, resolved, opts, emit, plancheck.recorded(run_dir, extra_config))
        start_step, elapsed_offset = 0, 0.0
        if opts.resume is not None:
            if (run_dir / "metrics.json").exists():
                raise BadInput(f"{run_dir} already completed; there is nothing to resume.")
            past = read_log(run_dir / "log.jsonl") if main and (run_dir / "log.jsonl").exists() else []
            elapsed_offset = past[-1]["elapsed_s"] if past else 0.0
            # every rank reads the one checkpoint: it holds no rank's own state, so any number of ranks resumes it
            if checkpoint_path.exists():
                start_step = _restore(task, checkpoint_path)
        return task, start_step, elapsed_offset

    task, start_step, elapsed_offset = agreed(group, start)
    if not command.evaluation_only:
        task.prefetch(start_step + 1)
    if opts.resume is None:
        config = {"command": command.name, "preset": resolved.preset, "knobs": resolved.record(),
                  "seed": opts.seed, "device": str(opts.device), "data": str(opts.data) if opts.data else None,
                  "memory_budget_bytes": opts.budget_bytes, "versions": versions(),
                  "machine_memory_bytes": psutil.virtual_memory().total,
                  "memory_limit": opts.limit.record() if opts.limit is not None else None,
                  "weights": list(task.loaded_weights),
                  **(extra_config or {})}
        agreed(group, lambda: rundir.claim(run_dir, config) if main else None)
    if group is not None:
        task.wrap_data_parallel()  # DistributedDataParallel starts every rank from rank 0's model
        if not main:
            log = _NoLog()
            metrics = _loop(task, command, log, opts, checkpoint_path, start_step)
            return metrics

    task.ctx.run_dir = run_dir
    check = PlanCheck(opts.device, _recorded_plan(command, resolved, opts.device, run_dir, extra_config)
                      .get("predicted_mb", {}), baseline_mb)
    try:  # before the first step, a run directory that cannot be written is bad input
        log = CheckedLog(RunLog(run_dir / "log.jsonl", elapsed_offset), check)
        if opts.tensorboard is not None:
            log = TensorBoardLog(opts.tensorboard / run_dir.name, log)
        log.write("run_start", command=command.name, config=resolved.record(), resumed_from_step=start_step,
                  pid=os.getpid(), host=platform.node())  # so a report can tell a killed run from a running one
        for event, fields in pending:
            log.write(event, **fields)
    except CannotWrite as err:
        if opts.resume is None:
            rundir.release(run_dir)
        raise BadInput(str(err)) from None
    try:
        if command.evaluation_only:
            metrics = _evaluate_once(task, log, opts)
        else:
            metrics = _loop(task, command, log, opts, checkpoint_path, start_step)
        save_json(run_dir / "metrics.json", metrics)
    except Interrupted:
        _end(log, status="interrupted")
        raise
    except (KeyboardInterrupt, SystemExit):
        _end(log, status="interrupted")
        raise Interrupted() from None
    except BaseException as err:  # noqa: BLE001 - every failure is logged before it leaves
        message = str(err) or type(err).__name__
        _end(log, status="failed", error=f"{type(err).__name__}: {message}")
        if isinstance(err, RunFailed | BadInput):
            raise
        raise RunFailed(f"{command.name} failed: {type(err).__name__}: {message}") from err
    log.write("run_end", status="completed", metrics=metrics)
    log.close()
    return metrics


def _restore(task: Task, path: Path) -> int:
    """Load a checkpoint into the task and return its step; one that cannot be read is bad input."""
    try:
        state = load_checkpoint(path)
        task.load_state_dict(state["task"])
        for name, value in state.get("knobs", {}).items():
            task.set_knob(name, value, state.get("accumulation", 1))
        return int(state["step"])
    except Exception as err:  # noqa: BLE001 - truncated, not a checkpoint, or another run's: all one answer
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInput(f"--resume {path.parent}: {path.name} cannot be read ({type(err).__name__}: {cause}); "
                       "start a new run instead.") from err


def _end(log: RunLog | _NoLog, **fields: Any) -> None:
    """Write `run_end` where the disk still allows it: the run's own error is the one to report."""
    try:
        log.write("run_end", **fields)
        log.close()
    except CannotWrite:
        pass


def _loop(task: Task, command: Command, log: RunLog | _NoLog, opts: RunOptions, checkpoint_path: Path,
          start_step: int) -> dict[str, float]:
    device, cfg, group = opts.device, task.cfg, opts.distributed
    main = group is None or group.is_main
    total = task.total_steps()
    leaks = LeakDetector.for_run(total)
    every = cfg.checkpoint_every
    stop = _StopFlag()
    knobs_changed: dict[str, int] = {}
    waits = InputWait()
    guard = task.ctx.guard
    rest_mb = probe(device)["rss_mb"]  # also resets the CUDA peak so the first step's peak is its own
    with stop.installed(), Progress(total, start_step, enabled=main and not opts.quiet, label=command.name) as bar:
        for step in range(start_step + 1, total + 1):
            if guard is not None:
                _stop_before_the_kill(guard, task, step, checkpoint_path, knobs_changed, log, group)
            torch.manual_seed(step_seed(opts.seed, step))
            started = time.perf_counter()
            figures = _step_with_backoff(task, step, log, knobs_changed)
            mem = probe(device)
            if guard is not None:
                guard.rose((mem.get("rss_peak_mb", mem["rss_mb"]) - rest_mb) * MiB)
            rest_mb = mem["rss_mb"]
            ranks: dict[str, Any] = {}
            stopping = stop.signal is not None
            if group is not None:
                mems = group.gather(mem)
                ranks["mem_ranks"] = mems
                stopping = group.any(stopping)  # SIGTERM on any rank stops every rank after this same step
                # leaks are judged on the worst rank
                mem = {**mem, **{k: max(m.get(k, 0.0) for m in mems) for k in mem}}
            step_s = round(time.perf_counter() - started, 4)
            log.write("step", phase="train", step=step, **figures, step_s=step_s,
                      mem=mems[0] if group is not None else mem, **ranks)
            waits.add(figures, step_s)
            for verdict in leaks.observe(step, mem):
                log.write("leak_warning", series=verdict.series, growth_mb=verdict.growth_mb,
                          window_steps=verdict.window_steps, step=step)
            bar.update(step, figures.get("loss"), mem["rss_mb"], waits.share)
            if task.validate_now(step):
                metrics = _evaluate(task, "val", step)
                mem = probe(device)
                rest_mb = mem["rss_mb"]
                log.write("eval", phase="val", step=step, **metrics, mem=mem)
            if (step % every == 0 or step == total or stopping) and main:
                _checkpoint(task, step, checkpoint_path, knobs_changed, log)
            if stopping:
                raise Interrupted()
        input_bound = waits.verdict(cfg.workers)
        if input_bound is not None:
            log.write("input_bound", **input_bound)
            bar.note(input_bound["advice"])
    metrics = _evaluate(task, "test", total)
    log.write("eval", phase="test", step=total, **metrics, mem=probe(device))
    return task.finish(metrics)


def _evaluate_once(task: EvaluationTask, log: RunLog, opts: RunOptions) -> dict[str, float]:
    """An evaluation-only run: no steps, no checkpoint; the test evaluation once, then the task's own files."""
    probe(opts.device)  # resets the CUDA peak so the evaluation's peak is its own
    metrics = _evaluate(task, "test", 0)
    log.write("eval", phase="test", step=0, **metrics, mem=probe(opts.device))
    return task.finish(metrics)


def _stop_before_the_kill(guard: MemoryGuard, task: Task, step: int, path: Path, knobs: dict[str, int],
                          log: RunLog | _NoLog, group: Distributed | None) -> None:
    """Between steps, where memory held would leave the next step no room under a killing limit: a checkpoint of
    the steps done, then the run fails with one sentence instead of being killed."""
    why = guard.stop()
    if not (group.any(why is not None) if group is not None else why is not None):
        return
    why = why or "another rank's memory reached its limit"
    done = step - 1
    if done > 0 and (group is None or group.is_main):
        _checkpoint(task, done, path, knobs, log)
    kept = f"stopped with a checkpoint at step {done}" if done > 0 else "stopped before the first step"
    raise RunFailed(f"{why}; {kept}: free memory or find what grows (fewshot memreport {path.parent}), then "
                    f"continue with --resume {path.parent}")


def _checkpoint(task: Task, step: int, path: Path, knobs: dict[str, int], log: RunLog | _NoLog) -> None:
    save_checkpoint(path, {"step": step, "task": task.state_dict(), "knobs": dict(knobs),
                           "accumulation": task.accumulation})
    log.write("checkpoint", step=step, path=str(path))


def _evaluate(task: Task | EvaluationTask, phase: str, step: int) -> dict[str, float]:
    task.model.eval()
    try:
        with torch.inference_mode():
            return task.evaluate(phase, step)
    finally:
        task.model.train()


def _step_with_backoff(task: Task, step: int, log: RunLog | _NoLog, knobs_changed: dict[str, int]
                       ) -> dict[str, Any]:
    """Run one step; on OOM release memory, shrink the first knob above its floor, and try the step again.
    Data-parallel, every rank backs off together: `Task.accumulate` tells the others at the gradient sum."""
    while True:
        try:
            if task.ctx.faults is not None:
                task.ctx.faults.leak(task.ctx.device)
            return task.train_step(step)
        except StepFailedElsewhere as err:
            oom_message = str(err)
        except Exception as err:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not is_oom(err):
                raise
            oom_message = str(err).splitlines()[0]
        release(task.ctx.device)  # outside the except block, so the traceback's frames are gone
        _back_off(task, step, log, knobs_changed, oom_message)


def _back_off(task: Task, step: int, log: RunLog | _NoLog, knobs_changed: dict[str, int], message: str) -> None:
    for knob in task.backoff_knobs:
        value = getattr(task.cfg, knob.name)
        if value // 2 >= knob.floor:
            new = value // 2
            accumulation = task.accumulation * 2 if knob.accumulate else task.accumulation
            task.set_knob(knob.name, new, accumulation)
            if task.ctx.guard is not None:
                task.ctx.guard.backed_off("train")
            knobs_changed[knob.name] = new
            log.write("oom_backoff", phase="train", step=step, knob=knob.name, **{"from": value, "to": new},
                      grad_accumulation=accumulation, error=message)
            return
    floors = ", ".join(f"{k.name}={getattr(task.cfg, k.name)} (floor {k.floor})" for k in task.backoff_knobs)
    raise RunFailed(f"out of memory at step {step} with every back-off knob at its floor ({floors or 'none'}); "
                    f"lower the configuration or raise --memory-budget. Last error: {message}")

