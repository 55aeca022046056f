"""Planner accuracy on the CPU: each command's plan against the peaks its own short runs measure, phase by phase.

Every configuration runs through the real CLI (`python -m fewshot_cli`, one intra-op thread) in a fresh process, as a
user starts it: no `--memory-budget` unless `--budget` asks for one (every CPU run returns freed tensors to the
system, as the plan assumes, so a budget changes nothing the plan sees);
the runner's `plan_check` events give, per phase, the plan's prediction (less the start-up baseline, which the
measure leaves out too) and the measured peak: the process's peak resident set during the phase less its resident
set before the run built its model. Rows marked `cpu` are the commands' `cpu` presets; the others are
configurations no preset or test is tuned to.

    python benchmarks/plan_accuracy.py [--markdown results/plan_accuracy.md] [--commands NAME ...] [--budget 16GiB]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

#: (command, label, options): short runs, the preset's knobs otherwise
CONFIGS = [
    ("detect-train", "cpu", ["--episodes", "3", "--test-episodes", "2"]),
    ("detect-train", "192 px, 4 queries", ["--episodes", "3", "--test-episodes", "2", "--image-size", "192",
                                           "--n-query", "4"]),
    ("triplet-train", "cpu", ["--episodes", "3", "--val-every", "0", "--test-episodes", "2"]),
    ("triplet-train", "96 px, batch 16", ["--episodes", "3", "--val-every", "0", "--test-episodes", "2",
                                          "--image-size", "96", "--triplet-batch-size", "16"]),
    ("mahalanobis-train", "cpu", ["--episodes", "3", "--val-every", "0", "--test-episodes", "5"]),
    ("mahalanobis-train", "resnet12, 84 px", ["--episodes", "2", "--val-every", "0", "--test-episodes", "2",
                                              "--backbone", "resnet12", "--image-size", "84", "--n-query", "6"]),
    ("classify-food101", "cpu", ["--epochs", "1", "--dev-samples", "2"]),
    ("classify-food101", "128 px, batch 32", ["--epochs", "1", "--dev-samples", "2", "--image-size", "128",
                                              "--batch-size", "32"]),
    ("embed-classify", "cpu", []),
    ("embed-classify", "resnet50, 64 px", ["--backbone", "resnet50", "--image-size", "64"]),
    # held out: not among the runs the CPU terms were read from
    ("detect-train", "held out: 160 px, 3 queries", ["--episodes", "3", "--test-episodes", "2", "--image-size", "160",
                                                     "--n-query", "3"]),
    ("mahalanobis-train", "held out: 64 px, 8 queries", ["--episodes", "3", "--val-every", "0", "--test-episodes",
                                                         "3", "--image-size", "64", "--n-query", "8"]),
    ("classify-food101", "held out: 96 px, batch 48", ["--epochs", "1", "--dev-samples", "2", "--image-size", "96",
                                                       "--batch-size", "48"]),
    ("embed-classify", "held out: 48 px, batch 64", ["--image-size", "48", "--batch-size", "64"]),
    ("triplet-train", "held out: 80 px, batch 12", ["--episodes", "3", "--val-every", "0", "--test-episodes", "2",
                                                    "--image-size", "80", "--triplet-batch-size", "12"]),
    ("classify-food101", "held out: 112 px, batch 24, 4 a class", ["--epochs", "1", "--dev-samples", "4",
                                                                  "--image-size", "112", "--batch-size", "24"]),
    ("mahalanobis-train", "resnet12, 84 px, --amp", ["--episodes", "2", "--val-every", "0", "--test-episodes", "2",
                                                     "--backbone", "resnet12", "--image-size", "84", "--n-query",
                                                     "6", "--amp"]),
    ("classify-food101", "96 px, batch 48, --amp", ["--epochs", "1", "--dev-samples", "2", "--image-size", "96",
                                                    "--batch-size", "48", "--amp"]),
    ("mahalanobis-train", "held out: validating every 3", ["--episodes", "6", "--val-every", "3", "--val-episodes",
                                                            "3", "--test-episodes", "5"]),
]
GOAL = (-0.05, 0.15)
def run(command: str, options: list[str], out: Path, name: str, budget: str | None = None) -> list[dict]:
    args = [sys.executable, "-m", "fewshot_cli", command, "--preset", "cpu", "--device", "cpu", "--quiet",
            *(["--memory-budget", budget] if budget else []),
            *options, "--out", str(out), "--name", name]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    lines = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines() if line.strip()]
    return [e for e in lines if e["event"] == "plan_check"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the table here")
    parser.add_argument("--commands", nargs="*", help="only these commands")
    parser.add_argument("--budget", help="run every configuration under this --memory-budget (default: none)")
    args = parser.parse_args()
    lines = ["| command | configuration | phase | predicted MiB | measured MiB | error | within goal |",
             "|---|---|---|---|---|---|---|"]
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (command, label, options) in enumerate(CONFIGS):
            if args.commands and command not in args.commands:
                continue
            for check in run(command, options, Path(tmp), f"r{index}", args.budget):
                assert check["freed_returned"], "a CPU run keeps freed tensors in its heap: the plan assumes not"
                error = check["error"]
                errors.append(error)
                within = GOAL[0] <= error <= GOAL[1]
                lines.append(f"| {command} | {label} | {check['phase']} | {check['predicted_mb']:,.1f} | "
                             f"{check['measured_mb']:,.1f} | {100 * error:+.1f}% | {'yes' if within else 'NO'} |")
                print(lines[-1], flush=True)
    summary = (f"\n{sum(GOAL[0] <= e <= GOAL[1] for e in errors)} of {len(errors)} phases within the goal; errors "
               f"from {100 * min(errors):+.1f}% to {100 * max(errors):+.1f}%.\n") if errors else "\n"
    table = "\n".join(lines) + "\n" + summary
    print(table)
    if args.markdown:
        how = f"under `--memory-budget {args.budget}`" if args.budget else "with no budget, as a run starts by default"
        with open(args.markdown, "w") as handle:
            handle.write("# Planner accuracy on the CPU (machine-dependent)\n\n`python benchmarks/plan_accuracy.py "
                         "--markdown results/plan_accuracy.md`: each configuration's short run through the CLI, its "
                         f"`plan_check` events, {how}. Predicted: the plan's peak of the "
                         "phase less its start-up baseline line; measured: the process's peak resident set during the "
                         "phase less the resident set "
                         "before the run built its model. Goal: within 15% and never more than 5% under. The "
                         "plan's `cpu_runtime` line was read from the runs of the first ten configurations on "
                         "this machine (two cores, Linux, glibc), its bf16 evaluation term from the two `--amp` "
                         "rows; the rows marked held out were not used.\n\n" + table
                         + NOTES)


#: what each term the plan gained came from (the measurements behind them are in the modules they name)
NOTES = """
Notes on the terms behind these errors:

- `onednn_copies`: a CPU convolution through oneDNN copies its input and weights into a blocked layout, or its
  output out of one, in memory no tensor holds (forward max(input + weights, output), backward gradient + input +
  weights; `fewshot_cli/memory/onednn.py`). Without it embed-classify with ResNet-50 was 5% under.
- The optimizer's state is live through every training step after the first (planned when a run has more than one
  step); with it and the copies, a real ResNet-12 step's peak is the traced one to within 0.3%, and the gap left is
  a constant (`cpu_runtime`), so the former proportional `cpu_allocator` term is gone.
- classify-food101 with `--dev-samples` has fewer training images than a batch: every batch is the split, and the
  plan traces that batch (it traced the full one: +25%); its evaluation also holds the last training batch.
- An image cache holds only the images read by then; embed-classify's scoring loads scikit-learn's metrics
  (~100 MiB resident), now loaded before the start-up baseline is read; detect-train's loaded episode and its
  previous query batch are lines of their own.
- classify-food101's test phase is the closest to the line (about -4%): after training its process holds a few MiB
  more than params, gradients, optimizer state and the runtime term account for, not yet explained.
- `--amp` (bf16 autocast on this CPU) is traced in its own dtype: the backbone's activations and oneDNN's copies
  at half their float32 bytes (the copies' rule, measured again per convolution in bf16, holds to within 5%). The
  two `--amp` rows' training phases are within 2%. Their test phases fell under by a near-constant amount
  (classify-food101 9.8 MiB, -7.9%; mahalanobis-train 14.5 MiB, -2.5%): resident memory outside tensors that a
  bf16 evaluation after bf16 training loads (oneDNN's bf16 inference kernels; a first bf16 evaluation pass of
  mobilenet_v3_large alone grows the resident set by about 3.5 MiB where float32's grows by none). The plan now
  adds 12 MiB to `cpu_runtime` in such evaluations (`CPU_BF16_EVALUATION`), read from those two rows, so they are
  no longer held out.
- Validation is planned as its own phase (mahalanobis-train): its few episodes may fill less than the test's
  feature batch; planned as the test it was +160% in a 1.5 GiB container's `--preset auto` run (predicted 270.7,
  measured 104.0 MiB).
"""


if __name__ == "__main__":
    main()
