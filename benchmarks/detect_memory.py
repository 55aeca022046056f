"""Peak memory of one `detect-train` training step: the seed's configuration before vs after its OOM fix.

    .venv/bin/python benchmarks/detect_memory.py                 # the planner's trace over meta tensors (no RAM)
    .venv/bin/python benchmarks/detect_memory.py --real --n-way 1  # measured: peak RSS of a real step on CPU

`--real` runs each configuration in a fresh process and reports its peak RSS growth over one step (the full
5-way "before" step needs tens of GB on CPU; scale it with --n-way).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from dataclasses import asdict
from typing import Any

import torch

from fewshot_cli.commands.detect import _AFTER, _BEFORE, COMMAND, PRESETS, DetectConfig, DetectTask
from fewshot_cli.runner.task import RunContext

MiB = 1024**2


def config(which: str, n_way: int, backbone: str) -> DetectConfig:
    return DetectConfig(**{**PRESETS["t4"], **(_BEFORE if which == "before" else _AFTER), "n_way": n_way,
                           "backbone": backbone})


def traced_peak(cfg: DetectConfig) -> int:
    from fewshot_cli.memory.plan import trace

    return sum(trace(COMMAND, cfg)["train"].values())


def real_peak(cfg: DetectConfig) -> int:
    """Run in a child process: peak RSS during one training step minus the RSS before it."""
    code = ("import json,sys;from benchmarks.detect_memory import _one_step;"
            "print(json.dumps(_one_step(json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(cfg))], capture_output=True, text=True,
                         check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def _one_step(fields: dict[str, Any]) -> int:
    import psutil

    task = DetectTask(DetectConfig(**fields), RunContext(device=torch.device("cpu"), seed=0, run_dir=None))
    before = psutil.Process().memory_info().rss
    task.train_step(1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--backbone", default="resnet50", choices=("resnet50", "small"))
    parser.add_argument("--real", action="store_true", help="measure peak RSS of a real step instead of tracing")
    args = parser.parse_args()
    measure = real_peak if args.real else traced_peak
    peaks = {which: measure(config(which, args.n_way, args.backbone)) for which in ("before", "after")}
    how = "peak RSS growth of one real step" if args.real else "traced peak of one step (meta tensors)"
    print(f"detect-train, {args.n_way}-way, {args.backbone}: {how}")
    print(f"{'config':<8}{'image':>7}{'emb':>6}{'k':>4}{'q':>5}{'step':>6}{'head':>6}{'peak MiB':>12}")
    for which, knobs in (("before", _BEFORE), ("after", _AFTER)):
        print(f"{which:<8}{knobs['image_size']:>7}{knobs['embedding_dim']:>6}{knobs['k_shot']:>4}"
              f"{knobs['n_query']:>5}{knobs['proposal_step']:>6}{knobs['head_hidden']:>6}"
              f"{peaks[which] / MiB:>12,.1f}")
    print(f"after / before = {peaks['after'] / peaks['before']:.3f} "
          f"({1 - peaks['after'] / peaks['before']:.0%} less)")


if __name__ == "__main__":
    main()
