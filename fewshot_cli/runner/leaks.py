"""Leak detection on a memory series: growth after warm-up that keeps going, not noise nor a one-off step."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class LeakVerdict:
    series: str
    growth_mb: float
    window_steps: int
    at_step: int


class LeakDetector:
    """Watches each series over a sliding window of `window` steps after `warmup` steps.

    The window is cut in thirds and each third summarised by its median (robust to noise); a leak is growth of at
    least `min_growth_mb` from the first third to the last with each half of it rising too, so a single step up
    (a cache filling once) is not a leak. After a warning the window restarts, so a leak is flagged once per window.
    """

    def __init__(self, window: int = 30, warmup: int = 10, min_growth_mb: float = 32.0) -> None:
        self.window, self.warmup, self.min_growth_mb = max(window, 6), warmup, min_growth_mb
        self._series: dict[str, deque[float]] = {}
        self._seen = 0

    @classmethod
    def for_run(cls, total_steps: int, min_growth_mb: float = 32.0) -> LeakDetector:
        window = max(9, min(60, total_steps // 3))
        return cls(window=window, warmup=min(10, max(2, total_steps // 10)), min_growth_mb=min_growth_mb)

    def observe(self, step: int, mem: dict[str, float]) -> list[LeakVerdict]:
        self._seen += 1
        if self._seen <= self.warmup:
            return []
        verdicts = []
        for series, value in mem.items():
            if series.endswith("_peak_mb"):
                continue  # a peak since the last probe is not a level
            values = self._series.setdefault(series, deque(maxlen=self.window))
            values.append(float(value))
            if len(values) < self.window:
                continue
            growth = self._growth(list(values))
            if growth is not None:
                verdicts.append(LeakVerdict(series, round(growth, 2), self.window, step))
                values.clear()
        return verdicts

    def _growth(self, values: list[float]) -> float | None:
        third = len(values) // 3
        a, b, c = (statistics.median(values[i * third:(i + 1) * third]) for i in range(3))
        rising_each_part = b - a >= 0.25 * self.min_growth_mb and c - b >= 0.25 * self.min_growth_mb
        return c - a if c - a >= self.min_growth_mb and rising_each_part else None
