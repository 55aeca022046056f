"""Start-up: `fewshot --version`, `--help` and each `COMMAND --help` against `python -c "import torch"`, side by side.

    python benchmarks/startup.py [--repeats 7]

Each case runs in a fresh process, the cases interleaved, `--repeats` times; the table gives each case's median
wall time and its ratio to the median `import torch` of the same run, against the goals (--version and --help at
most 0.25x, a command's --help at most 1.0x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fewshot_cli.commands import load_commands

GOALS = {"--version": 0.25, "--help": 0.25}  # every other case: a command's --help, 1.0


def fewshot_executable() -> list[str]:
    """The `fewshot` console script beside this interpreter, as a user runs it; else `python -m fewshot_cli`."""
    script = Path(sys.executable).with_name("fewshot")
    if script.exists():
        return [str(script)]
    found = shutil.which("fewshot")
    return [found] if found else [sys.executable, "-m", "fewshot_cli"]


def cases() -> dict[str, list[str]]:
    fewshot = fewshot_executable()
    out = {"import torch": [sys.executable, "-c", "import torch"], "--version": [*fewshot, "--version"],
           "--help": [*fewshot, "--help"]}
    for name in load_commands():
        out[f"{name} --help"] = [*fewshot, name, "--help"]
    return out


def seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   env={**os.environ, "COLUMNS": "120"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    todo = cases()
    times: dict[str, list[float]] = {name: [] for name in todo}
    for argv in todo.values():  # one warm-up each: the first run pays for cold file caches
        seconds(argv)
    for _ in range(args.repeats):
        for name, argv in todo.items():
            times[name].append(seconds(argv))
    torch_s = statistics.median(times["import torch"])
    print(f"fewshot start-up, median of {args.repeats} runs each (interleaved), python {sys.version.split()[0]}, "
          f"{' '.join(todo['--version'][:-1])}\n")
    print(f"| {'case':<30} | {'seconds':>7} | {'x import torch':>14} | {'goal':>6} | verdict |")
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 16}|{'-' * 8}|---------|")
    failed = False
    for name, values in times.items():
        median = statistics.median(values)
        ratio = median / torch_s
        if name == "import torch":
            print(f"| {name:<30} | {median:7.3f} | {ratio:14.2f} | {'':>6} |         |")
            continue
        goal = GOALS.get(name, 1.0)
        verdict = "PASS" if ratio <= goal else "FAIL"
        failed |= verdict == "FAIL"
        print(f"| {name:<30} | {median:7.3f} | {ratio:14.2f} | {goal:5.2f}x | {verdict:<7} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
