"""Knowing when a run is input-bound: the share of its step time spent waiting for data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: above this share of step time spent waiting for input, a run says so and suggests more workers
THRESHOLD = 0.10


class InputWait:
    """Sums each step's `data_wait_s` against its `step_s`."""

    def __init__(self) -> None:
        self.wait_s = self.step_s = 0.0

    def add(self, figures: Mapping[str, Any], step_s: float) -> None:
        self.wait_s += float(figures.get("data_wait_s", 0.0))
        self.step_s += step_s

    @property
    def share(self) -> float:
        return self.wait_s / self.step_s if self.step_s > 0 else 0.0

    def verdict(self, workers: int) -> dict[str, Any] | None:
        """The `input_bound` event's fields when the run waited for input more than THRESHOLD of its time."""
        if self.share <= THRESHOLD:
            return None
        return {"data_wait_s": round(self.wait_s, 3), "step_s": round(self.step_s, 3),
                "data_wait_share": round(self.share, 4), "workers": workers, "advice": advice(self.share, workers)}


def advice(share: float, workers: int) -> str:
    more = max(2, 2 * workers)
    return (f"input-bound: {share:.0%} of step time waited for data (over {THRESHOLD:.0%}); "
            f"try --workers {more} (now {workers})")


def from_steps(steps: Iterable[Mapping[str, Any]]) -> InputWait:
    """The sums over a log's step events (those that carry `data_wait_s`)."""
    waits = InputWait()
    for step in steps:
        if "data_wait_s" in step and "step_s" in step:
            waits.add(step, float(step["step_s"]))
    return waits
