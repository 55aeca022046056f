"""What torch's OpenMP threads do while they wait, on idle cores and on cores other processes keep busy.

    python benchmarks/omp_wait.py [--epochs 1] [--busy N] [--threads T] [--repeats 1] [--out results/omp_wait.md]

The run: `fewshot classify-food101 --preset cpu --epochs E` on the built-in data (MobileNetV3 at 32 px, batches of
64), with torch's intra-op pool at T threads (`OMP_NUM_THREADS`; default: the machine's cores, as when a user sets
nothing). Two settings, side by side in the same repeat:

- `spin`: GNU OpenMP's own default, where a waiting thread spins on its core for about 300,000 turns before it
  sleeps (`GOMP_SPINCOUNT=300000`, the value libgomp takes when `OMP_WAIT_POLICY` is unset); this is how a run
  behaved before the CLI set a policy;
- `passive`: the CLI's setting (`OMP_WAIT_POLICY=PASSIVE`, `fewshot_cli/cpu_threads.py`), where it sleeps at once.

Each on idle cores and beside N processes that each keep one core busy (a pure-Python loop; default N: the cores),
as on a shared machine. An untimed run first fills the plan cache, so that no timed run traces its plan. Prints the
wall and CPU (user + system) seconds of each run and passive's speed-up over spin (spin's seconds over passive's)
in each condition."""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"spin": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def timed_run(env: dict[str, str], epochs: int, out: Path, name: str) -> tuple[float, float]:
    """(wall, cpu) seconds of one `fewshot classify-food101` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(["fewshot", "classify-food101", "--preset", "cpu", "--epochs", str(epochs), "--quiet",
                    "--out", str(out), "--name", name], env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--busy", type=int, default=cores, help="busy processes beside the contended runs")
    parser.add_argument("--threads", type=int, default=cores, help="torch's intra-op threads (OMP_NUM_THREADS)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="a markdown file for the table")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base["OMP_NUM_THREADS"] = str(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        timed_run(base, args.epochs, Path(tmp), "warm-up")  # untimed: fills the plan cache, so no timed run traces
        for condition, busy in (("idle cores", 0), (f"{args.busy} busy processes", args.busy)):
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                for repeat in range(args.repeats):
                    seconds = {label: timed_run({**base, **extra}, args.epochs, Path(tmp),
                                                f"{label}-{busy}-{repeat}") for label, extra in SETTINGS.items()}
                    rows.append((condition, repeat + 1, seconds))
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    lines = [f"`fewshot classify-food101 --preset cpu --epochs {args.epochs}`, OMP_NUM_THREADS={args.threads}, "
             f"{cores} CPU cores; spin: GOMP_SPINCOUNT=300000 (GNU OpenMP's default); passive: OMP_WAIT_POLICY=PASSIVE "
             "(the CLI's). Seconds of each process, wall / CPU (user + system).", "",
             "| condition | repeat | spin wall / cpu | passive wall / cpu | passive's speed-up, wall | cpu |",
             "|---|---|---|---|---|---|"]
    for condition, repeat, seconds in rows:
        (sw, sc), (pw, pc) = seconds["spin"], seconds["passive"]
        lines.append(f"| {condition} | {repeat} | {sw:.1f} / {sc:.1f} | {pw:.1f} / {pc:.1f} | {sw / pw:.2f}x "
                     f"| {sc / pc:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text("# What OpenMP's threads do while they wait\n\n`python benchmarks/omp_wait.py "
                            f"{' '.join(sys.argv[1:])}`: {text}")


if __name__ == "__main__":
    main()
