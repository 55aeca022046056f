"""OOM back-off in evaluation: a part of an evaluation retried with its own knob halved, results unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fewshot_cli.errors import RunFailed
from fewshot_cli.memory.measure import is_oom, release
from fewshot_cli.runner.config import option_name

T = TypeVar("T")

#: the phases an evaluation runs in, as the runner names them
EVAL_PHASES = {"val": "validation", "test": "test evaluation"}


def evaluation_part(task: Any, phase: str, step: int, knob: str, part: Callable[[], T], floor: int = 1) -> T:
    """Run one part of an evaluation (a feature batch, an episode, a clip); on OOM release memory, halve the
    evaluation knob `knob` of `task.cfg` (down to `floor`), log `oom_backoff` and run the part again.

    The part must give the same result whatever the knob's value (it sets how much is scored at once, never
    what is scored), so that an evaluation's metrics do not depend on its back-offs. Below the floor the run
    fails with one sentence naming the phase and the knob; the training checkpoint stays for `--resume`."""
    while True:
        try:
            if task.ctx.faults is not None:
                task.ctx.faults.oom(phase)
            if task.ctx.guard is not None:
                task.ctx.guard.check(phase, EVAL_PHASES.get(phase, phase))
            return part()
        except Exception as err:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not is_oom(err):
                raise
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
        release(task.ctx.device)  # outside the except block, so the traceback's frames are gone
        _halve(task, phase, step, knob, floor, message)


def _halve(task: Any, phase: str, step: int, knob: str, floor: int, message: str) -> None:
    value = getattr(task.cfg, knob)
    if value // 2 < floor:
        where = EVAL_PHASES.get(phase, phase)
        raise RunFailed(
            f"out of memory in the {where} after step {step} with {knob}={value} at its floor ({floor}); the "
            f"training checkpoint is kept: free memory, then continue with --resume {task.ctx.run_dir or 'RUN_DIR'} "
            f"(--{option_name(knob)} may be given again, smaller). Last error: {message}")
    setattr(task.cfg, knob, value // 2)  # later evaluations of the run start from the smaller value
    if task.ctx.guard is not None:
        task.ctx.guard.backed_off(phase)
    task.ctx.emit("oom_backoff", phase=phase, step=step, knob=knob, **{"from": value, "to": value // 2},
                  grad_accumulation=task.accumulation, error=message)
