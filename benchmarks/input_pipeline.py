"""fewshot against easyfsl 1.5.0 on photo-sized JPEGs, side by side: episodes per second, input wait, accuracy.

    python benchmarks/input_pipeline.py [--episodes 40] [--backbones conv4,resnet12] [--workers 0,2]
        [--device auto] [--classes 16] [--per-class 30] [--out results/input_pipeline.md]

Both sides run the same episodes' shape (5-way 5-shot 15 queries, 84 px), the same backbone (fewshot's conv4 or
resnet12), Euclidean prototypes, Adam at 1e-3, the same number of training and test episodes, from the same
ImageFolder of 512 x 384 JPEGs this script writes (synthetic objects on textured backgrounds, JPEG-compressed like
photos). fewshot runs as its CLI (`mahalanobis-train --head euclidean --adapt none`); easyfsl as its README shows:
`EasySet` + `TaskSampler` + `DataLoader(collate_fn=sampler.episodic_collate_fn)` + `PrototypicalNetworks`.
Episodes per second count training and test episodes over the time from the first training step to the end of
the test (model building and process start are left out on both sides). Figures depend on the machine."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Sampler

from fewshot_cli.data.synthetic import SyntheticImages
from fewshot_cli.models.backbones import build_backbone

N_WAY, K_SHOT, N_QUERY, SIZE, LR = 5, 5, 15, 84, 1e-3

# easyfsl 1.5.0's TaskSampler calls Sampler.__init__(data_source=None); torch 2.6 dropped that parameter
Sampler.__init__ = lambda self, *args, **kwargs: None  # noqa: E731


def make_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    """DATA/{train,test}/CLASS/*.jpg: 512 x 384 JPEGs (quality 90) of synthetic objects with photo-like noise."""
    source = SyntheticImages(image_size=128, n_classes=classes, per_class=per_class, seed=seed)
    rng = np.random.default_rng(seed)
    n_train = classes * 3 // 5
    for cls in range(classes):
        folder = root / ("train" if cls < n_train else "test") / f"class{cls:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            small = (source.image(cls * per_class + k) * 255).astype(np.uint8)
            image = np.asarray(Image.fromarray(small).resize((512, 384), Image.BICUBIC), dtype=np.float32)
            image += rng.normal(0, 6, image.shape)  # sensor-like grain, so JPEG has detail to code
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{k:03d}.jpg", quality=90)
    return root


def run_fewshot(data: Path, backbone: str, workers: int, episodes: int, device: str, out: Path,
                cache_mb: int) -> dict:
    name = f"{backbone}-w{workers}-c{cache_mb}"
    command = [sys.executable, "-m", "fewshot_cli", "mahalanobis-train", "--data", str(data), "--preset", "cpu",
               "--device", device, "--backbone", backbone, "--image-size", str(SIZE), "--head", "euclidean",
               "--adapt", "none", "--reduced-dim", "0", "--n-way", str(N_WAY), "--k-shot", str(K_SHOT),
               "--n-query", str(N_QUERY), "--episodes", str(episodes), "--test-episodes", str(episodes),
               "--val-every", "0", "--checkpoint-every", str(episodes), "--lr", str(LR), "--workers", str(workers),
               "--image-cache-mb", str(cache_mb), "--batch-size", "128", "--quiet", "--json",
               "--out", str(out), "--name", name]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"fewshot failed: {done.stderr[-2000:]}")
    events = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    test = next(e for e in events if e["event"] == "eval" and e["phase"] == "test")
    seconds = test["elapsed_s"] - (steps[0]["elapsed_s"] - steps[0]["step_s"])
    train_s = sum(s["step_s"] for s in steps)
    return {"seconds": seconds, "train_s": train_s, "wait": sum(s["data_wait_s"] for s in steps) / train_s,
            "accuracy": test["accuracy"], "ci95": test["accuracy_ci95"]}


def easyfsl_set(data: Path, split: str, tmp: Path):
    from easyfsl.datasets import EasySet
    from torchvision import transforms

    roots = sorted(str(p) for p in (data / split).iterdir())
    specs = tmp / f"{split}.json"
    specs.write_text(json.dumps({"class_names": [Path(r).name for r in roots], "class_roots": roots}))
    # the same geometry as fewshot's reader: the whole image resized to a square, ImageNet normalisation
    transform = transforms.Compose([transforms.Resize([SIZE, SIZE]), transforms.ToTensor(),
                                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return EasySet(specs, image_size=SIZE, transform=transform)


def run_easyfsl(data: Path, backbone: str, workers: int, episodes: int, device: torch.device, tmp: Path) -> dict:
    from easyfsl.methods import PrototypicalNetworks
    from easyfsl.samplers import TaskSampler

    random.seed(0)
    torch.manual_seed(0)
    model = PrototypicalNetworks(build_backbone(backbone)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loaders = {}
    for split in ("train", "test"):
        dataset = easyfsl_set(data, split, tmp)
        sampler = TaskSampler(dataset, n_way=N_WAY, n_shot=K_SHOT, n_query=N_QUERY, n_tasks=episodes)
        loaders[split] = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                    pin_memory=device.type == "cuda", collate_fn=sampler.episodic_collate_fn)
    wait = 0.0
    started = time.perf_counter()
    model.train()
    tasks = iter(loaders["train"])
    for _ in range(episodes):
        fetched = time.perf_counter()
        support, support_labels, query, query_labels, _ = next(tasks)
        wait += time.perf_counter() - fetched
        optimizer.zero_grad()
        model.process_support_set(support.to(device), support_labels.to(device))
        loss = nn.functional.cross_entropy(model(query.to(device)), query_labels.to(device))
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - started
    model.eval()
    accuracies = []
    with torch.no_grad():
        for support, support_labels, query, query_labels, _ in loaders["test"]:
            model.process_support_set(support.to(device), support_labels.to(device))
            predicted = model(query.to(device)).argmax(1).cpu()
            accuracies.append(float((predicted == query_labels).float().mean()))
    seconds = time.perf_counter() - started
    std = float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0
    return {"seconds": seconds, "train_s": train_s, "wait": wait / train_s, "accuracy": float(np.mean(accuracies)),
            "ci95": 1.96 * std / math.sqrt(len(accuracies))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", default="40",
                        help="training episodes, and as many test episodes: one number, or one per backbone")
    parser.add_argument("--backbones", default="conv4,resnet12")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = make_folder(tmp / "data", args.classes, args.per_class)
        backbones = args.backbones.split(",")
        counts = [int(n) for n in args.episodes.split(",")]
        for backbone, episodes in zip(backbones, counts * len(backbones) if len(counts) == 1 else counts,
                                      strict=True):
            for workers in (int(w) for w in args.workers.split(",")):
                easy = run_easyfsl(data, backbone, workers, episodes, device, tmp)
                ours = run_fewshot(data, backbone, workers, episodes, str(device), tmp / "runs", 256)
                cold = run_fewshot(data, backbone, workers, episodes, str(device), tmp / "runs", 0)
                for library, figures in (("easyfsl 1.5.0", easy), ("fewshot", ours), ("fewshot, no cache", cold)):
                    rate = 2 * episodes / figures["seconds"]
                    rows.append({"backbone": backbone, "workers": workers, "episodes": episodes, "library": library,
                                 "rate": rate, "ratio": easy["seconds"] / figures["seconds"], **figures})
                    print(json.dumps(rows[-1]), flush=True)
    table = render(rows, args, device)
    print(table)
    if args.out is not None:
        args.out.write_text(table)


def render(rows: list[dict], args: argparse.Namespace, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        "# Input pipeline: fewshot against easyfsl 1.5.0 (machine-dependent figures)",
        "",
        f"Written by `recipes/input_pipeline.sh` (`python benchmarks/input_pipeline.py --episodes {args.episodes} "
        f"--backbones {args.backbones} --workers {args.workers}`) on {device.type} ({name}), {os.cpu_count()} "
        f"CPU cores, torch {torch.__version__}. {args.classes} classes x {args.per_class} JPEGs of 512 x 384 "
        f"(3/5 of the classes train, 2/5 test); {N_WAY}-way {K_SHOT}-shot {N_QUERY} queries at {SIZE} px; "
        "as many test episodes as training episodes per run (the table's episodes). Episodes/s counts both; input "
        "wait is the share of training-step time spent waiting for the next episode. Shared or busy cores make "
        "these figures noisy.",
        "",
        "| backbone | episodes | workers | library | episodes/s | x easyfsl | input wait | test accuracy (95% CI) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['episodes']} | {r['workers']} | {r['library']} | {r['rate']:.2f} | "
                     f"{r['ratio']:.2f} | {r['wait']:.1%} | {r['accuracy']:.3f} +- {r['ci95']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
