"""The one device-aware training loop: open, train (steps, validation, checkpoints), test, finish."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fewshot_cli.errors import BadInput, CannotWrite, Interrupted, RunFailed
from fewshot_cli.memory.guard import MemoryGuard
from fewshot_cli.memory.measure import MiB, is_oom, probe, release
from fewshot_cli.runner.checkpoint import save_checkpoint, save_json
from fewshot_cli.runner.command import Command
from fewshot_cli.runner.config import Resolved
from fewshot_cli.runner.distributed import Distributed, StepFailedElsewhere
from fewshot_cli.runner.evaluation import EvaluationTask
from fewshot_cli.runner.input_wait import InputWait
from fewshot_cli.runner.leaks import LeakDetector
from fewshot_cli.runner.opening import Log, Run, RunOptions, open_run
from fewshot_cli.runner.progress import Progress
from fewshot_cli.runner.task import Task, step_seed


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


def run(command: Command, resolved: Resolved, opts: RunOptions) -> dict[str, float]:
    """Run a command's task to its end and return the final metrics (written to `metrics.json`).

    Under torchrun every rank runs this; rank 0 alone writes the run directory."""
    opened = open_run(command, resolved, opts)
    if not opened.main:  # another torchrun rank: it trains and tests in step with rank 0, which reports
        _train(opened)
        return _test(opened, opened.task.total_steps())
    try:
        if command.evaluation_only:
            metrics = _test(opened, 0)
        else:
            _train(opened)
            metrics = _test(opened, opened.task.total_steps())
        save_json(opened.run_dir / "metrics.json", metrics)
    except Interrupted:
        _end(opened, status="interrupted")
        raise
    except (KeyboardInterrupt, SystemExit):
        _end(opened, status="interrupted")
        raise Interrupted() from None
    except BaseException as err:  # noqa: BLE001 - every failure is logged before it leaves
        message = str(err) or type(err).__name__
        _end(opened, status="failed", error=f"{type(err).__name__}: {message}")
        if isinstance(err, RunFailed | BadInput):
            raise
        raise RunFailed(f"{command.name} failed: {type(err).__name__}: {message}") from err
    opened.log.write("run_end", status="completed", metrics=metrics)
    opened.log.close()
    return metrics


def _train(opened: Run) -> None:
    """Every training step from the first to run, each followed where due by validation and a checkpoint; the
    train phase's plan check at the end."""
    task, log, group = opened.task, opened.log, opened.opts.distributed
    total, rest_mb, knobs_changed = task.total_steps(), opened.rest_mb, {}
    leaks, waits, stop = LeakDetector.for_run(total), InputWait(), _StopFlag()
    bar = Progress(total, opened.first_step - 1, enabled=opened.main and not opened.opts.quiet,
                   label=opened.command.name)
    with stop.installed(), bar:
        for step in range(opened.first_step, total + 1):
            phase = task.step_phase(step)
            if phase != opened.training_phase:  # a phase ended (pre-training): its plan check
                _plan_check(opened, opened.training_phase)
                opened.training_phase = phase
            if task.ctx.guard is not None:
                _stop_before_the_kill(task.ctx.guard, task, step, opened.checkpoint_path, knobs_changed, log, group)
            torch.manual_seed(step_seed(opened.opts.seed, step))
            started = time.perf_counter()
            figures = _step_with_backoff(task, step, log, knobs_changed)
            mem, ranks, worst = _step_memory(opened, rest_mb)
            rest_mb, stopping = mem["rss_mb"], stop.signal is not None
            if group is not None:  # SIGTERM on any rank stops every rank after this same step
                stopping = group.any(stopping)
            step_s = round(time.perf_counter() - started, 4)
            log.write("step", phase=phase, step=step, **figures, step_s=step_s, mem=mem, **ranks)
            opened.check.observe(phase, mem)
            waits.add(figures, step_s)
            for verdict in leaks.observe(step, worst):
                log.write("leak_warning", series=verdict.series, growth_mb=verdict.growth_mb,
                          window_steps=verdict.window_steps, step=step)
            bar.update(step, figures.get("loss"), worst["rss_mb"], waits.share)
            if task.validate_now(step):
                rest_mb = _evaluate_logged(opened, "val", step)[1]["rss_mb"]
            if (step % task.cfg.checkpoint_every == 0 or step == total or stopping) and opened.main:
                _checkpoint(task, step, opened.checkpoint_path, knobs_changed, log)
            if stopping:
                raise Interrupted()
        input_bound = waits.verdict(task.cfg.workers)
        if input_bound is not None:
            log.write("input_bound", **input_bound)
            bar.note(input_bound["advice"])
    _plan_check(opened, opened.training_phase)


def _step_memory(opened: Run, rest_mb: float) -> tuple[dict[str, float], dict[str, Any], dict[str, float]]:
    """A step's memory: this process's probe (its rise told to the guard), under torchrun every rank's as
    `mem_ranks`, and the worst rank's figures, which leaks are judged on."""
    mem = probe(opened.opts.device)
    if opened.task.ctx.guard is not None:
        opened.task.ctx.guard.rose((mem.get("rss_peak_mb", mem["rss_mb"]) - rest_mb) * MiB)
    if opened.opts.distributed is None:
        return mem, {}, mem
    mems = opened.opts.distributed.gather(mem)
    return mem, {"mem_ranks": mems}, {**mem, **{k: max(m.get(k, 0.0) for m in mems) for k in mem}}


def _test(opened: Run, step: int) -> dict[str, float]:
    """The test evaluation at `step` (0: an evaluation-only run), then the task's own files."""
    metrics, _ = _evaluate_logged(opened, "test", step)
    return opened.task.finish(metrics)


def _evaluate_logged(opened: Run, phase: str, step: int) -> tuple[dict[str, float], dict[str, float]]:
    """One evaluation, its `eval` event and its plan check; its metrics and its closing probe."""
    metrics = _evaluate(opened.task, phase, step)
    mem = probe(opened.opts.device)
    opened.log.write("eval", phase=phase, step=step, **metrics, mem=mem)
    opened.check.observe_evaluation(phase, mem)
    _plan_check(opened, phase)
    return metrics, mem


def _plan_check(opened: Run, phase: str) -> None:
    """The plan check of the phase just ended (none where it has no plan or saw no probe)."""
    fields = opened.check.end(phase)
    if fields is not None:
        opened.log.write("plan_check", **fields)


def _end(opened: Run, **fields: Any) -> None:
    """A stopped run checks the training it did, then writes `run_end` where the disk still allows it: the run's own
    error is the one to report."""
    try:
        _plan_check(opened, opened.training_phase)
        opened.log.write("run_end", **fields)
        opened.log.close()
    except CannotWrite:
        pass


def _stop_before_the_kill(guard: MemoryGuard, task: Task, step: int, path: Path, knobs: dict[str, int],
                          log: Log, group: Distributed | None) -> None:
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


def _checkpoint(task: Task, step: int, path: Path, knobs: dict[str, int], log: Log) -> None:
    save_checkpoint(path, {"step": step, "task": task.state_dict(), "knobs": dict(knobs),
                           "accumulation": task.accumulation,
                           "accumulations": {name: task.accumulation_of(name) for name in knobs}})
    log.write("checkpoint", step=step, path=str(path))


def _evaluate(task: Task | EvaluationTask, phase: str, step: int) -> dict[str, float]:
    task.model.eval()
    try:
        with torch.inference_mode():
            return task.evaluate(phase, step)
    finally:
        task.model.train()


def _step_with_backoff(task: Task, step: int, log: Log, knobs_changed: dict[str, int]
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


def _back_off(task: Task, step: int, log: Log, knobs_changed: dict[str, int], message: str) -> None:
    knobs, phase = task.backoff_knobs_at(step), task.step_phase(step)
    for knob in knobs:
        value = getattr(task.cfg, knob.name)
        if value // 2 >= knob.floor:
            new, accumulation = value // 2, task.accumulation_of(knob.name)
            accumulation = accumulation * 2 if knob.accumulate else accumulation
            task.set_knob(knob.name, new, accumulation)
            if task.ctx.guard is not None:
                task.ctx.guard.backed_off(phase)
            knobs_changed[knob.name] = new
            log.write("oom_backoff", phase=phase, step=step, knob=knob.name,
                      **{"from": value, "to": new}, grad_accumulation=accumulation, error=message)
            return
    floors = ", ".join(f"{k.name}={getattr(task.cfg, k.name)} (floor {k.floor})" for k in knobs)
    raise RunFailed(f"out of memory at step {step} with every back-off knob at its floor ({floors or 'none'}); "
                    f"lower the configuration or raise --memory-budget. Last error: {message}")

