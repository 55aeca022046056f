"""What returning freed tensors to the system costs a CPU run: training steps with glibc's default allocator and with
`mallopt(M_MMAP_THRESHOLD, 128 KiB)` (what every CPU run does, `memory.measure.return_freed_memory`), side by side.

Each measurement is a fresh process (one intra-op thread) that builds `mahalanobis-train`'s task, runs two steps to
warm up, then times the next ones; the two modes alternate round by round, so a busy machine slows both alike. The
peak resident set of each process is printed beside its time: what the default keeps and the plan does not expect.

    python benchmarks/allocator_cost.py [--rounds 3] [--steps 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

#: (label, knobs over the cpu preset)
CONFIGS = [
    ("cpu preset", {}),
    ("resnet12, 84 px, 6 queries", {"backbone": "resnet12", "image_size": 84, "n_query": 6}),
]


def child(knobs: dict, returned: bool, steps: int) -> None:
    import resource
    import time

    import torch

    from fewshot_cli.commands.mahalanobis import COMMAND
    from fewshot_cli.memory.measure import return_freed_memory
    from fewshot_cli.runner.config import resolve
    from fewshot_cli.runner.task import RunContext, step_seed

    if returned:
        return_freed_memory(torch.device("cpu"))
    config = resolve(COMMAND.config, COMMAND.presets, "cpu", {**knobs, "episodes": steps + 2, "val_every": 0}).config
    torch.manual_seed(0)
    task = COMMAND.task(config, RunContext(torch.device("cpu"), 0, None))
    for step in range(1, steps + 3):
        if step == 3:
            started = time.perf_counter()
        torch.manual_seed(step_seed(0, step))
        task.train_step(step)
    seconds = (time.perf_counter() - started) / steps
    print(json.dumps({"ms": seconds * 1e3, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(knobs: dict, returned: bool, steps: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(knobs), "--steps", str(steps),
                           *(["--returned"] if returned else [])], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--returned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(json.loads(args.child), args.returned, args.steps)
        return
    print(f"{'configuration':<28} {'round':>5} {'default ms':>10} {'returned ms':>11} {'ratio':>6} "
          f"{'default peak MiB':>16} {'returned peak MiB':>17}")
    for label, knobs in CONFIGS:
        ratios = []
        for round_ in range(args.rounds):
            default, returned = measure(knobs, False, args.steps), measure(knobs, True, args.steps)
            ratios.append(returned["ms"] / default["ms"])
            print(f"{label:<28} {round_:>5} {default['ms']:>10.1f} {returned['ms']:>11.1f} {ratios[-1]:>6.2f} "
                  f"{default['peak_mb']:>16.0f} {returned['peak_mb']:>17.0f}", flush=True)
        print(f"{label:<28} median time ratio, returned over default: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
