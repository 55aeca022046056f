"""A rich progress bar (episode, loss, memory, input wait) on a terminal; nothing with --quiet or when not a
terminal."""

from __future__ import annotations

import sys

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from fewshot_cli.runner.input_wait import THRESHOLD


class Progress:
    def __init__(self, total: int, done: int, enabled: bool, label: str) -> None:
        self.enabled = enabled and sys.stderr.isatty() and total > 0
        self._bar: RichProgress | None = None
        self._total, self._done, self._label = total, done, label
        self._notes: list[str] = []

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}  rss {task.fields[rss]} MiB"
                                                "{task.fields[wait]}"),
                                     TimeRemainingColumn(), transient=True)
            self._bar.__enter__()
            self._id = self._bar.add_task(self._label, total=self._total, completed=self._done, loss="-", rss="-",
                                          wait="")
        return self

    def update(self, step: int, loss: float | None, rss_mb: float, wait_share: float = 0.0) -> None:
        """`wait_share`: the share of step time spent waiting for input so far; shown once above THRESHOLD."""
        if self._bar is not None:
            wait = f"  input-bound {wait_share:.0%}: more --workers" if wait_share > THRESHOLD else ""
            self._bar.update(self._id, completed=step, loss=f"{loss:.4f}" if loss is not None else "-",
                             rss=f"{rss_mb:.0f}", wait=wait)

    def note(self, text: str) -> None:
        """A line printed under the finished bar."""
        self._notes.append(text)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            for text in self._notes:
                self._bar.console.print(text, highlight=False)
