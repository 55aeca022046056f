"""The seeds' memory tables, reproduced as predictions of `fewshot plan` (nothing is run or allocated).

Each row plans one configuration a seed reports on its own device kind (T4: CUDA terms, 15.89 GiB; Mac: MPS terms,
47.74 GiB), next to the figure the seed gives.

    python benchmarks/seed_memory.py [--markdown results/seed_memory.md]
"""

from __future__ import annotations

import argparse

import torch

from fewshot_cli.commands import load_commands
from fewshot_cli.memory.plan import PRESET_DEVICES, plan_run
from fewshot_cli.models.heads import covariance_bytes
from fewshot_cli.runner.config import resolve

GiB = 1024**3
DETECT_BEFORE = {"image_size": 384, "embedding_dim": 512, "k_shot": 5, "n_query": 20, "proposal_step": 16,
                 "head_hidden": 1024, "objectness_hidden": 128}
RESNET34_FLAT = {"backbone": "resnet34", "flatten": True, "image_size": 224, "covariance": "dense"}
ROWS = [
    ("000 detection", "detect-train", "t4", "before: 384 px, 512 dims, 5-shot, 20 queries, 16 px", DETECT_BEFORE,
     "~16 GB: OOM on episode 1"),
    ("000 detection", "detect-train", "t4", "after: 256 px, 256 dims, 3-shot, 10 queries, 24 px", {}, "6-8 GB"),
    ("001 triplet", "triplet-train", "t4", "triplet batch 64", {"triplet_batch_size": 64}, "~8 GB triplet batch"),
    ("001 triplet", "triplet-train", "t4", "triplet batch 8", {"triplet_batch_size": 8}, "~1 GB triplet batch"),
    ("002 mahalanobis", "mahalanobis-train", "t4", "ResNet-34 flat 25,088 dims, dense", {**RESNET34_FLAT,
     "reduced_dim": 0}, "covariances ~11.75 GB: OOM"),
    ("002 mahalanobis", "mahalanobis-train", "t4", "projected to 512 dims, dense", {**RESNET34_FLAT,
     "reduced_dim": 512}, "covariances ~5 MB: works"),
    ("002 mahalanobis", "mahalanobis-train", "t4", "25,088 dims, exact low-rank", {**RESNET34_FLAT,
     "reduced_dim": 0, "covariance": "lowrank"}, "(not in the seed)"),
    ("003 food-101", "classify-food101", "mps", "1024 px, batch 32", {"image_size": 1024, "batch_size": 32},
     ">48 GB: OOM"),
    ("003 food-101", "classify-food101", "mps", "224 px, batch 8", {"image_size": 224, "batch_size": 8}, "~12 GB"),
    ("003 food-101", "classify-food101", "mps", "224 px, batch 24", {"image_size": 224, "batch_size": 24}, "~20 GB"),
    ("003 food-101", "classify-food101", "mps", "224 px, batch 32", {"image_size": 224, "batch_size": 32},
     "~25 GB, may OOM"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args()
    commands = load_commands()
    lines = ["| seed | configuration | device (budget) | predicted peak GiB | phase | fits | the seed says |",
             "|---|---|---|---|---|---|---|"]
    for seed, name, preset, label, knobs, says in ROWS:
        kind, budget = PRESET_DEVICES[preset]
        resolved = resolve(commands[name].config, commands[name].presets, preset, knobs)
        report = plan_run(commands[name], resolved, torch.device(kind), budget)
        phase = max(report["phases"], key=lambda p: report["phases"][p]["peak_bytes"])
        peak = report["peak_bytes"] / GiB  # the device's; the host's lines are a section of their own
        lines.append(f"| {seed} | {label} | {preset} {kind} ({budget / GiB:.2f} GiB) | {peak:,.2f} "
                     f"| {phase} | {'yes' if report['sections']['device']['fits'] else 'no'} | {says} |")
        print(lines[-1], flush=True)
    cov = ["", "The Mahalanobis covariance term alone (5 classes, float32, the d x d matrices only):", "",
           "| d | dense covariances | exact low-rank factors (25 support images) |", "|---|---|---|"]
    for d in (25088, 512):
        dense = covariance_bytes(5, d, 25, "dense") / 2
        cov.append(f"| {d:,} | {dense / GiB:,.3f} GiB ({dense / 1024**2:,.1f} MiB) | "
                   f"{covariance_bytes(5, d, 25, 'lowrank') / 1024**2:,.1f} MiB |")
    table = "\n".join(lines + cov) + "\n"
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write("The seeds' memory tables as `fewshot plan` predicts them, with nothing run "
                         "(`python benchmarks/seed_memory.py --markdown results/seed_memory.md`). A plan fits when "
                         "its peak is under the budget less a 10% margin.\n\n" + table)


if __name__ == "__main__":
    main()
