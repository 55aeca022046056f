"""Metric accumulators of bounded size: running sums, never lists that grow with episodes."""

from __future__ import annotations

import math


class RunningMean:
    """Mean, standard deviation and 95% confidence interval (1.96 std / sqrt n) by Welford's running sums."""

    __slots__ = ("count", "mean", "_m2")

    def __init__(self) -> None:
        self.count, self.mean, self._m2 = 0, 0.0, 0.0

    def add(self, value: float, weight: int = 1) -> None:
        for _ in range(weight):
            self.count += 1
            delta = float(value) - self.mean
            self.mean += delta / self.count
            self._m2 += delta * (float(value) - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / self.count) if self.count else 0.0

    @property
    def ci95(self) -> float:
        return 1.96 * self.std / math.sqrt(self.count) if self.count else 0.0
