"""Images per second of classify-food101's data pipeline plus model step, against the bare model step on the same
tensors: a ratio well below 1 says loading, not the network, is the bottleneck.

    .venv/bin/python benchmarks/food101_throughput.py [--data DIR] [--device cpu] [--image-size 224]
        [--batch-size 24] [--model efficientnet_b0] [--workers 4] [--steps 20] [--amp]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fewshot_cli.commands.food101 import Food101Config, Food101Task
from fewshot_cli.runner.task import RunContext


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder holding food-101/ (default: built-in)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--amp", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = Food101Config(epochs=1000, batch_size=args.batch_size, image_size=args.image_size, model=args.model,
                        workers=args.workers, amp=args.amp)
    torch.manual_seed(0)
    task = Food101Task(cfg, RunContext(device=device, seed=0, run_dir=None, data=args.data))
    warmup, steps = 2, args.steps

    # pipeline: load + augment + transfer + forward/backward/step, as train_step runs them
    for step in range(1, warmup + 1):
        task.train_step(step)
    sync(device)
    start = time.perf_counter()
    for step in range(warmup + 1, warmup + steps + 1):
        task.train_step(step)
    sync(device)
    pipeline = steps * args.batch_size / (time.perf_counter() - start)

    # bare: the same model step on one batch already loaded, nothing read or decoded
    images, labels = task._batch(warmup + steps)
    for _ in range(warmup):
        task._optimise(images, labels)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        task._optimise(images, labels)
    sync(device)
    bare = steps * args.batch_size / (time.perf_counter() - start)

    source = str(args.data) if args.data else "built-in"
    print(f"device {device}  model {args.model}  image {args.image_size}px  batch {args.batch_size}  "
          f"workers {args.workers}  data {source}  steps {steps}")
    print(f"{'pipeline + step':>18}  {'bare step':>10}  {'ratio':>6}")
    print(f"{pipeline:>14.1f} i/s  {bare:>6.1f} i/s  {pipeline / bare:>6.2f}")


if __name__ == "__main__":
    main()
