"""The fixed cost of a short run: where its wall time goes, beside `python -c "import torch"` measured in the same run.

    python benchmarks/fixed_cost.py [--repeats 5] [--episodes 5] [--test-episodes 20] [--out results/fixed_cost.md]

The run: `fewshot mahalanobis-train --preset cpu` on the built-in data, `--episodes` training episodes and
`--test-episodes` test episodes, no validation. Each repeat runs, interleaved, `python -c "import torch"` and the
run twice, each in a fresh interpreter that times its own parts by wrapping the functions that do them: once with
its plan traced (`FEWSHOT_PLAN_CACHE=off`: a configuration run for the first time) and once with its trace in the
plan cache (a folder of this benchmark's own, filled by an untimed first run: the same configuration run again).

- interpreter: from the process's start to the first line of the timing script (`python -c pass` costs the same);
- imports: every module the run loads before its first training step (the list an untimed run of the same kind
  wrote), imported up front; what loads later (the reports' libraries) counts in the part that loads it;
- planning: `memory.plan.fit` (the traced step of each phase), less the start-up baseline it takes;
- start-up baseline: `memory.plan.startup_baseline` and the plan check's `memory.check.start`;
- building the task: `runner.opening.build_task` (data, samplers, model, weights);
- to the first step: from the process's start to the first `train_step` call; first step done: to its return;
- training, testing (`runner.loop._train`, `_evaluate` of the test) and reports (the task's `finish`);
- the rest: parsing, the run directory, config.json, the log, the exit.

Medians over the repeats; the first step's time is the goal's figure (within 1.5x `import torch`)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: run in a fresh interpreter: times the run's parts and prints them as JSON on its last line
TIMER = r"""
import json, os, sys, time
started = float(os.environ["FIXED_COST_SPAWNED"])
parts = {"interpreter": time.time() - started}
modules = json.loads(os.environ.get("FIXED_COST_MODULES", "[]"))
t = time.perf_counter()
import importlib
for name in modules:
    try:
        importlib.import_module(name)
    except Exception:
        pass
parts["imports"] = time.perf_counter() - t
from fewshot_cli import cli
from fewshot_cli.commands.mahalanobis import MahalanobisTask
from fewshot_cli.memory import check, plan
from fewshot_cli.runner import loop, opening

inside = set()

def timed(owner, name, part):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        inside.add(part)
        try:
            return inner(*args, **kwargs)
        finally:
            inside.discard(part)
            parts[part] = parts.get(part, 0.0) + time.perf_counter() - t
    setattr(owner, name, wrapper)

timed(plan, "fit", "planning")
timed(plan, "startup_baseline", "_plan_baseline")  # inside plan.fit
timed(check, "start", "_check_baseline")
timed(opening, "build_task", "building the task")
timed(loop, "_train", "training")
timed(MahalanobisTask, "finish", "reports")
evaluate = loop._evaluate
def test_only(task, phase, step):
    t = time.perf_counter()
    try:
        return evaluate(task, phase, step)
    finally:
        if phase == "test":
            parts["testing"] = parts.get("testing", 0.0) + time.perf_counter() - t
loop._evaluate = test_only
step = MahalanobisTask.train_step
loaded_first = []
def first_step(self, *args, **kwargs):
    if "planning" in inside:  # the planner traces a step of its own copy of the task
        return step(self, *args, **kwargs)
    if "to the first step" not in parts:
        parts["to the first step"] = time.time() - started
        loaded_first.extend(m for m in sys.modules if m != "__main__")  # in the order they were loaded
    try:
        return step(self, *args, **kwargs)
    finally:
        parts.setdefault("first step done", time.time() - started)
MahalanobisTask.train_step = first_step
sys.argv = ["fewshot", *json.loads(os.environ["FIXED_COST_ARGS"])]
try:
    cli.main()
except SystemExit as stop:
    assert not stop.code, stop.code
if os.environ.get("FIXED_COST_LIST"):
    print(json.dumps(loaded_first))
parts["start-up baseline"] = parts.get("_plan_baseline", 0.0) + parts.get("_check_baseline", 0.0)
parts["planning"] = parts.get("planning", 0.0) - parts.get("_plan_baseline", 0.0)
print(json.dumps(parts))
"""

ORDER = ("interpreter", "imports", "planning", "start-up baseline", "building the task", "training", "testing",
         "reports", "the rest")


def _timed_run(args: list[str], modules: list[str], cache: str, listing: bool = False
               ) -> tuple[dict[str, float], list[str]]:
    env = {**os.environ, "FIXED_COST_ARGS": json.dumps(args), "FIXED_COST_MODULES": json.dumps(modules),
           "FEWSHOT_PLAN_CACHE": cache, "FIXED_COST_SPAWNED": repr(time.time())}
    if listing:
        env["FIXED_COST_LIST"] = "1"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", TIMER], capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith(("{", "["))]
    parts = json.loads(lines[-1])
    parts["wall"] = wall
    parts["the rest"] = wall - sum(parts.get(name, 0.0) for name in ORDER if name != "the rest")
    return parts, json.loads(lines[-2]) if listing else []


def _import_torch() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--test-episodes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        def args(n: str) -> list[str]:
            return ["mahalanobis-train", "--preset", "cpu", "--episodes", str(options.episodes), "--val-every", "0",
                    "--test-episodes", str(options.test_episodes), "--quiet", "--out", tmp, "--name", n]

        caches = {"traced": "off", "cached": str(Path(tmp) / "plans")}
        _timed_run(args("fill"), [], caches["cached"])  # traces the plan and keeps it
        # what each kind of run loads before its first step, for the timed runs to preload
        modules = {kind: _timed_run(args(f"list-{kind}"), [], cache, listing=True)[1] for kind, cache in caches.items()}
        runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in caches}
        torch_s = []
        for n in range(1, options.repeats + 1):
            torch_s.append(_import_torch())
            for kind, cache in caches.items():
                runs[kind].append(_timed_run(args(f"{kind}-{n}"), modules[kind], cache)[0])
    torch_median = statistics.median(torch_s)
    command = " ".join(["fewshot", *args("")[:-4]])
    lines = [f"`python benchmarks/fixed_cost.py --repeats {options.repeats} --episodes {options.episodes} "
             f"--test-episodes {options.test_episodes}`: `{command}`, medians of {options.repeats} runs of each "
             f"kind, {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}. Plan traced: "
             "`FEWSHOT_PLAN_CACHE=off` (a configuration's first run); plan cached: its trace read from the plan "
             "cache (the same configuration again).", "",
             "| part | plan traced: s | x `import torch` | plan cached: s | x `import torch` |",
             "|---|---|---|---|---|"]
    for name in (*ORDER, "wall", "to the first step", "first step done"):
        row = f"| {name} |"
        for kind in caches:
            value = statistics.median(run.get(name, 0.0) for run in runs[kind])
            row += f" {value:.2f} | {value / torch_median:.2f} |"
        lines.append(row)
    lines += ["", f"`python -c \"import torch\"`: {torch_median:.2f} s (median). Goal: to the first step within "
              f"1.5x, {1.5 * torch_median:.2f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if options.out is not None:
        options.out.write_text("# The fixed cost of a short run\n\n" + text)


if __name__ == "__main__":
    main()
