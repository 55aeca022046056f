"""Runner overhead: the same training episodes through the runner and through a bare loop, time per step side by side.

    python benchmarks/runner_overhead.py [--episodes 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fewshot_cli.commands.mahalanobis import COMMAND
from fewshot_cli.runner.config import resolve
from fewshot_cli.runner.launch import LaunchOptions, launch
from fewshot_cli.runner.log import read_log
from fewshot_cli.runner.task import RunContext, step_seed


def knobs(episodes: int) -> dict:
    return {"episodes": episodes, "val_every": 0, "test_episodes": 1, "checkpoint_every": 10**6}


def config(episodes: int):
    return resolve(COMMAND.config, COMMAND.presets, "cpu", knobs(episodes))


def bare(episodes: int) -> float:
    """Seconds per step of the task's own steps in a plain loop: no probes, no log, no back-off."""
    torch.manual_seed(0)
    task = COMMAND.task(config(episodes).config, RunContext(torch.device("cpu"), 0, None))
    started = time.perf_counter()
    for step in range(1, episodes + 1):
        torch.manual_seed(step_seed(0, step))
        task.train_step(step)
    return (time.perf_counter() - started) / episodes


def runner(episodes: int, out: Path, name: str) -> float:
    """Seconds per step through the runner, started as `fewshot` starts it: from `run_start` to the last `step`."""
    launch(COMMAND, knobs(episodes), LaunchOptions(device="cpu", preset="cpu", out=out, name=name, quiet=True))
    events = read_log(out / name / "log.jsonl")
    start = next(e["elapsed_s"] for e in events if e["event"] == "run_start")
    last = [e["elapsed_s"] for e in events if e["event"] == "step"][-1]
    return (last - start) / episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ratios = []
    print(f"{'repeat':>6} {'bare ms/step':>13} {'runner ms/step':>15} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            b = bare(args.episodes)
            w = runner(args.episodes, Path(tmp), f"r{r}")
            ratios.append(w / b)
            print(f"{r:>6} {b * 1e3:>13.2f} {w * 1e3:>15.2f} {w / b:>7.3f}")
    print(f"median ratio runner/bare: {statistics.median(ratios):.3f} "
          f"(overhead {100 * (statistics.median(ratios) - 1):+.1f}%)")


if __name__ == "__main__":
    main()
