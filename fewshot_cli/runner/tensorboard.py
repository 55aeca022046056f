"""TensorBoard curves from the run's log events: live beside `log.jsonl`, or afterwards from it (`fewshot export`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fewshot_cli.errors import BadInput
from fewshot_cli.runner.log import read_log

EXTRA = "pip install 'fewshot[tensorboard]'"
#: event fields that place an event rather than measure anything
_PLACING = {"step", "time", "elapsed_s"}


def require() -> None:
    """BadInput naming the extra to install when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise BadInput(f"--tensorboard needs the tensorboard package; install it with {EXTRA}.") from None


def scalars(event: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) of every number an event carries: `train/loss`, `val/accuracy`, `train/mem/rss_mb`,
    `oom_backoff/to`. Steps and evaluations are tagged by their phase, other events by their name."""
    prefix = event.get("phase") if event["event"] in ("step", "eval") else event["event"]
    yield from _flatten(str(prefix), {k: v for k, v in event.items() if k not in _PLACING})


def _flatten(prefix: str, fields: dict[str, Any]) -> Iterator[tuple[str, float]]:
    for name, value in fields.items():
        if isinstance(value, dict):
            yield from _flatten(f"{prefix}/{name}", value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}/{name}", float(value)


class TensorBoardLog:
    """Writes each event's numbers to a SummaryWriter at the event's step, then passes it to the run's log."""

    def __init__(self, log_dir: Path, inner: Any = None) -> None:
        """`inner`: the run's log, which every event still reaches first (None when exporting a finished run)."""
        require()
        from torch.utils.tensorboard import SummaryWriter  # tensorboard's writer loads torch: only with --tensorboard

        self.inner = inner
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = self.inner.write(event, **fields)
        if self.add(record):
            self.writer.flush()  # live: TensorBoard shows each step as it ends
        return record

    def add(self, record: dict[str, Any]) -> bool:
        """Write one logged event's numbers; False for an event outside the step axis (extraction progress)."""
        step = record.get("step")
        if not isinstance(step, int):
            return False
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, global_step=step, walltime=record.get("time"))
        return True

    def close(self) -> None:
        self.writer.close()
        if self.inner is not None:
            self.inner.close()


def export(run_dirs: Iterable[Path], out: Path) -> list[Path]:
    """Write OUT/RUN_NAME event files from each finished (or stopped) run's `log.jsonl`; returns those folders."""
    require()
    run_dirs = [Path(d) for d in run_dirs]
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        raise BadInput("Two run directories share a name; TensorBoard keeps one sub-directory per run name.")
    for run_dir in run_dirs:
        if not (run_dir / "log.jsonl").is_file():
            raise BadInput(f"{run_dir} has no log.jsonl; it is not a run directory.")
        target = Path(out) / run_dir.name
        if target.is_dir() and any(target.glob("events.out.tfevents.*")):
            raise BadInput(f"{target} already holds TensorBoard events; remove it or pass another --tensorboard.")
    written = []
    for run_dir in run_dirs:
        writer = TensorBoardLog(Path(out) / run_dir.name)
        for record in read_log(run_dir / "log.jsonl"):
            writer.add(record)
        writer.close()
        written.append(Path(out) / run_dir.name)
    return written
