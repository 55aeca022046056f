"""Each command's `--preset auto` inside a container's memory limit: what the planner chose, its plan, and the
peak the kernel counted against the limit.

Every command runs through the real CLI in a cgroup v1 memory group of its own (as a container or a batch job's
limit is: past it the kernel kills), with no `--memory-budget`: the run finds the limit itself. The group's
`memory.max_usage_in_bytes` is the peak the kernel charged (page cache included), `oom_kill` its kills. Needs root
and the cgroup v1 memory controller at /sys/fs/cgroup/memory.

    python benchmarks/container_limit.py [--limit 1.5GiB] [--markdown results/container_limit.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fewshot_cli.memory.limits import parse_size

V1 = Path("/sys/fs/cgroup/memory")
MiB = 1024**2
#: (command, options): short runs, each at `--preset auto`
RUNS = [
    ("mahalanobis-train", ["--episodes", "6", "--val-every", "3", "--val-episodes", "3", "--test-episodes", "20"]),
    ("detect-train", ["--episodes", "4", "--test-episodes", "4"]),
    ("triplet-train", ["--episodes", "4", "--test-episodes", "2"]),
    ("classify-food101", ["--epochs", "1"]),
    ("embed-classify", []),
]


def in_cgroup(name: str, limit: int, args: list[str]) -> tuple[int, int, int]:
    """Run `args` in a fresh memory group of `limit` bytes: (exit code, peak bytes charged, oom kills)."""
    group = V1 / f"fewshot-container-limit-{name}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        done = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *args],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              check=False)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        kills = next(int(line.split()[1]) for line in (group / "memory.oom_control").read_text().splitlines()
                     if line.startswith("oom_kill "))
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
        return done.returncode, peak, kills
    finally:
        group.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", default="1.5GiB")
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args()
    if os.geteuid() != 0 or not (V1 / "cgroup.procs").is_file():
        raise SystemExit("needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    limit = parse_size(args.limit)
    lines = ["| command | chosen by the planner | limit seen | plan peak MiB | peak charged MiB | of the limit | "
             "plan checks (predicted / measured MiB) | exit | kills |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for command, options in RUNS:
            code, peak, kills = in_cgroup(command, limit, [
                sys.executable, "-m", "fewshot_cli", command, "--preset", "auto", *options, "--out", tmp,
                "--name", command, "--quiet"])
            run = Path(tmp) / command
            config = json.loads((run / "config.json").read_text())
            chosen = " ".join(f"--{k.replace('_', '-')} {v['value']}" for k, v in config["knobs"].items()
                              if v["source"] == "planner")
            seen = config["memory_limit"]
            checks = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
                      if '"plan_check"' in line]
            checked = ", ".join(f"{c['phase']} {c['predicted_mb']:,.0f} / {c['measured_mb']:,.0f}" for c in checks)
            lines.append(f"| {command} | {chosen} | {seen['source']} {seen['bytes'] / MiB:,.0f} MiB | "
                         f"{config['plan']['peak_bytes'] / MiB:,.0f} | {peak / MiB:,.0f} | {peak / limit:.0%} | "
                         f"{checked} | {code} | {kills} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    if args.markdown:
        Path(args.markdown).write_text(
            f"# `--preset auto` in a {args.limit} container (machine-dependent)\n\n`python benchmarks/"
            f"container_limit.py --limit {args.limit} --markdown {args.markdown}`: each command's short run through "
            "the CLI in a cgroup v1 memory group of that limit, no `--memory-budget`. Limit seen: the limit the run "
            "found (config.json's `memory_limit`); plan peak: the chosen configuration's plan, the process's start-up "
            "resident set included; peak charged: the group's `memory.max_usage_in_bytes` (page cache included); "
            "plan checks: the runs' own `plan_check` events (resident set above the start-up baseline).\n\n" + table)


if __name__ == "__main__":
    main()
