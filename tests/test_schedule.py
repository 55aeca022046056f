"""The one learning-rate schedule: a linear warm-up, then half a cosine down to its floor."""

from __future__ import annotations

import math

import pytest

from fewshot_cli.runner.schedule import warmup_cosine


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_warm_up_is_linear_then_the_rate_falls_to_the_floor_and_stays(floor: float) -> None:
    factor = warmup_cosine(100, warmup=5, floor=floor)
    assert [factor(s) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    falling = [factor(s) for s in range(5, 101)]
    assert falling[0] == 1.0 and all(a > b for a, b in zip(falling, falling[1:], strict=False))
    assert math.isclose(factor(100), floor, abs_tol=1e-12) and factor(500) == factor(100)
    assert math.isclose(factor(52), floor + (1 - floor) * 0.5 * (
        1 + math.cos(math.pi * 47 / 95)))

