"""The same run in one process and under `torchrun` with N ranks (DistributedDataParallel; gloo on CPU, NCCL on
CUDA): wall time per training step, the ratio against one process, and whether the final metrics agree.

    .venv/bin/python benchmarks/data_parallel.py --ranks 2 --repeats 2
    .venv/bin/python benchmarks/data_parallel.py --ranks 2 -- detect-train --preset cpu --episodes 40 \
        --episodes-per-step 2 --test-episodes 5

Each process runs with `--threads` intra-op threads (default: the machine's cores divided by the ranks, so both
sides use the same cores). Step time is the median `step_s` of the log; startup and evaluation are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT = ["mahalanobis-train", "--preset", "cpu", "--episodes", "40", "--episodes-per-step", "2",
           "--val-every", "0", "--test-episodes", "20"]


def run(args: list[str], out: Path, name: str, ranks: int, threads: int) -> tuple[float, dict]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                if ranks > 1 else [sys.executable])
    command = [*launcher, "-m", "fewshot_cli", *args, "--quiet", "--json", "--out", str(out), "--name", name]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    steps = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
    step_s = statistics.median(e["step_s"] for e in steps if e["event"] == "step")
    return step_s, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per one-process run (0: all cores)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND OPTIONS (default: mahalanobis-train)")
    options = parser.parse_args()
    args = [a for a in options.command if a != "--"] or DEFAULT
    cores = os.cpu_count() or 1
    one_threads = options.threads or cores
    rank_threads = max(1, one_threads // options.ranks)
    print(f"{' '.join(args)}\none process: {one_threads} threads; {options.ranks} ranks: {rank_threads} each")
    print(f"{'repeat':>6} {'one s/step':>11} {f'{options.ranks} ranks s/step':>15} {'ratio':>7}  same metrics")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(options.repeats):
            one_s, one_metrics = run(args, Path(tmp), f"one{repeat}", 1, one_threads)
            many_s, many_metrics = run(args, Path(tmp), f"many{repeat}", options.ranks, rank_threads)
            ratios.append(many_s / one_s)
            same = one_metrics == many_metrics
            close = same or all(abs(one_metrics[k] - many_metrics.get(k, float("nan"))) <= 1e-6 * max(1, abs(v))
                                for k, v in one_metrics.items() if not k.startswith("cache_"))
            print(f"{repeat:>6} {one_s:>11.4f} {many_s:>15.4f} {many_s / one_s:>7.3f}  "
                  f"{'exact' if same else 'within 1e-6' if close else 'NO'}")
    print(f"median ratio (ranks / one process, lower is faster): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
