"""The memory guard's cost per training step: the time of one check of each limit it guards, the checks a step
makes, and their share of the step, for a command's short run through the runner.

The guard reads the memory the kernel counts against a killing limit: a memory cgroup's usage (`memory.stat` and
`memory.usage_in_bytes`, or `memory.current`) or, with no cgroup limit, the machine's `/proc/meminfo`. Every check
is one such read. This benchmark makes a cgroup v1 memory group of its own (as root, where the controller is
mounted at /sys/fs/cgroup/memory; otherwise the cgroup row is skipped), and for each limit times the guard's check
and runs `mahalanobis-train --preset cpu` in-process with every check counted and timed: first with no cgroup
limit (the machine's memory is guarded, as in every default CPU run), then inside the group.

    python benchmarks/guard_cost.py [--episodes 20] [--checks 20000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fewshot_cli.commands.mahalanobis import COMMAND
from fewshot_cli.memory import guard as guard_module
from fewshot_cli.memory.limits import host_limits, tightest
from fewshot_cli.runner.launch import LaunchOptions, launch
from fewshot_cli.runner.log import read_log

V1 = Path("/sys/fs/cgroup/memory")


@contextmanager
def in_cgroup(limit: int) -> Iterator[bool]:
    """This process inside a cgroup v1 memory group of its own for the block (False where none can be made: not
    root, or no v1 memory controller); back in its own group, and the group removed, after."""
    if os.geteuid() != 0 or not V1.is_dir():
        yield False
        return
    own = Path("/proc/self/cgroup").read_text().split("memory:", 1)[1].split("\n", 1)[0].lstrip("/")
    group_dir = V1 / f"fewshot-guard-cost-{os.getpid()}"
    group_dir.mkdir()
    try:
        (group_dir / "memory.limit_in_bytes").write_text(str(limit))
        (group_dir / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield True
        finally:
            (V1 / own / "cgroup.procs").write_text(str(os.getpid()))
    finally:
        group_dir.rmdir()


def per_check_us(checks: int) -> float:
    """Microseconds per check of the guard of the tightest limit this process is under."""
    return _time(guard_module.MemoryGuard.for_limit(tightest(host_limits())), checks)


def _time(guard: guard_module.MemoryGuard, checks: int) -> float:
    started = time.perf_counter()
    for _ in range(checks):
        guard.check("train")
    return (time.perf_counter() - started) / checks * 1e6


def counted_run(episodes: int) -> tuple[float, float, float]:
    """A short run through the runner with every guard check and leak check counted and timed: (checks a step,
    seconds of checks a step, seconds a step)."""
    calls, spent = [0], [0.0]
    check, stop = guard_module.MemoryGuard.check, guard_module.MemoryGuard.stop

    def timed(original):
        def wrapper(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                calls[0] += 1
                spent[0] += time.perf_counter() - started
        return wrapper

    guard_module.MemoryGuard.check, guard_module.MemoryGuard.stop = timed(check), timed(stop)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            knobs = {"episodes": episodes, "val_every": 0, "test_episodes": 1, "checkpoint_every": 10**6}
            launch(COMMAND, knobs, LaunchOptions(device="cpu", preset="cpu", out=Path(tmp), name="r", quiet=True))
            events = read_log(Path(tmp) / "r" / "log.jsonl")
    finally:
        guard_module.MemoryGuard.check, guard_module.MemoryGuard.stop = check, stop
    steps = [e for e in events if e["event"] == "step"]
    start = next(e["elapsed_s"] for e in events if e["event"] == "run_start")
    # the test's checks (one per evaluation part) are few; counted with the steps they are an upper bound
    return calls[0] / len(steps), spent[0] / len(steps), (steps[-1]["elapsed_s"] - start) / len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--checks", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'limit guarded':<40} {'us a check':>10} {'checks a step':>14} {'us a step':>10} {'ms a step':>10} "
          f"{'share':>7}")
    for name, grouped in (("the machine's memory (/proc/meminfo)", False), ("a 4 GiB cgroup v1 (memory.stat)", True)):
        with in_cgroup(4 * 1024**3) as inside:
            if grouped and not inside:
                print(f"{name:<40} skipped: needs root and the cgroup v1 memory controller")
                continue
            us = per_check_us(args.checks)
            per_step, seconds, step = counted_run(args.episodes)
        print(f"{name:<40} {us:>10.1f} {per_step:>14.1f} {seconds * 1e6:>10.0f} {step * 1e3:>10.1f} "
              f"{seconds / step:>7.3%}")


if __name__ == "__main__":
    main()
