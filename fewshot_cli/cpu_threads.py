"""The CPU thread pool's setting that must be made before torch loads: OpenMP reads it once. No torch."""

from __future__ import annotations

import os

#: OpenMP's switch for what a thread of torch's CPU pool does while it waits for work: spin on its core, or sleep
WAIT_POLICY = "OMP_WAIT_POLICY"


def passive_threads_before_torch() -> None:
    """Let torch's OpenMP threads sleep, not spin, while they wait, unless the environment already says otherwise.

    With GNU OpenMP's default, a waiting thread spins on its core before it sleeps. Where other processes share the
    cores (a batch node, a shared workstation, a container's CPU quota), that spin takes the core the thread it
    waits for needs, at every parallel region: `classify-food101 --preset cpu --epochs 1` with torch's 2 threads
    beside two busy processes on 2 cores ran 4.3x and 7.0x slower spinning than waiting passively, and within 4% on
    idle cores (`python benchmarks/omp_wait.py`, results/omp_wait.md). The values computed are the same. It takes
    effect only where torch has not loaded yet: the CLI calls it before any import of torch."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
