"""The learning-rate schedule the commands share: a linear warm-up, then half a cosine down to a floor."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(total: int, warmup: int, floor: float = 0.0) -> Callable[[int], float]:
    """`torch.optim.lr_scheduler.LambdaLR`'s factor after `done` steps: (done + 1) / warmup over the first `warmup`
    steps, then half a cosine from 1 to `floor` (a share of the rate) at step `total`, and `floor` after it."""

    def factor(done: int) -> float:
        if done < warmup:
            return (done + 1) / warmup
        progress = min(1.0, (done - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
