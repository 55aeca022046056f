"""A rich progress bar (episode, loss, memory) on a terminal; nothing with --quiet or when not a terminal."""

from __future__ import annotations

import sys

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total: int, done: int, enabled: bool, label: str) -> None:
        self.enabled = enabled and sys.stderr.isatty() and total > 0
        self._bar: RichProgress | None = None
        self._total, self._done, self._label = total, done, label

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}  rss {task.fields[rss]} MiB"),
                                     TimeRemainingColumn(), transient=True)
            self._bar.__enter__()
            self._id = self._bar.add_task(self._label, total=self._total, completed=self._done, loss="-", rss="-")
        return self

    def update(self, step: int, loss: float | None, rss_mb: float) -> None:
        if self._bar is not None:
            self._bar.update(self._id, completed=step, loss=f"{loss:.4f}" if loss is not None else "-",
                             rss=f"{rss_mb:.0f}")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
