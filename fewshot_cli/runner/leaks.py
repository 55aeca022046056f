"""Leak detection on a memory series: growth after warm-up that keeps going, not noise nor a one-off step."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

PARTS = 5
PART_STEPS = 4  # a part's median needs a few samples, or one jump after an evaluation reads as steady growth


@dataclass(frozen=True)
class LeakVerdict:
    series: str
    growth_mb: float
    window_steps: int
    at_step: int


class LeakDetector:
    """Watches each series over a sliding window of `window` steps after `warmup` steps.

    The window is cut in five parts, each summarised by its median (robust to noise); a leak is growth of at least
    `min_growth_mb` from the first part to the last with every part higher than the one before, so a single step
    up (a cache filling once) is not a leak. After a warning the window restarts: one warning per window.
    """

    def __init__(self, window: int = 30, warmup: int = 10, min_growth_mb: float = 32.0) -> None:
        self.window, self.warmup, self.min_growth_mb = max(window, PART_STEPS * PARTS), warmup, min_growth_mb
        self._series: dict[str, deque[float]] = {}
        self._seen = 0

    @classmethod
    def for_run(cls, total_steps: int, min_growth_mb: float = 32.0) -> LeakDetector:
        window = max(PART_STEPS * PARTS, min(60, total_steps // 3))
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
        part = len(values) // PARTS
        medians = [statistics.median(values[i * part:(i + 1) * part]) for i in range(PARTS)]
        step = 0.5 * self.min_growth_mb / (PARTS - 1)  # each part rises by a real share of the growth
        rising = all(b - a > step for a, b in zip(medians, medians[1:], strict=False))
        growth = medians[-1] - medians[0]
        return growth if rising and growth >= self.min_growth_mb else None
