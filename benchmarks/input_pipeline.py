"""fewshot against easyfsl 1.5.0 on photo-sized JPEGs, side by side: episodes per second, input wait, accuracy.

    python benchmarks/input_pipeline.py [--episodes 40] [--backbones conv4,resnet12] [--workers 0,2]
        [--device auto] [--image-size 84] [--decode cpu] [--amp] [--classes 16] [--per-class 30] [--note TEXT]
        [--out results/input_pipeline.md]

On a GPU (the issue's second setting: 224 px, resnet18, 8 workers, and JPEG decoding on the GPU as well):

    python benchmarks/input_pipeline.py --device cuda --image-size 224 --backbones resnet18 --workers 2,8 \
        --decode cpu,cuda --episodes 50 --out results/input_pipeline_gpu.md

which adds the GPU's utilisation sampled during each run's measured window (`nvidia-smi` polled in a thread;
`torch.cuda.utilization` where nvidia-smi is missing and pynvml is installed).

Both sides run the same episodes' shape (5-way 5-shot 15 queries, 84 px unless --image-size), the same backbone
(fewshot's conv4, resnet12 or resnet18), Euclidean prototypes, Adam at 1e-3, the same number of training and test
episodes, from the same ImageFolder of 512 x 384 JPEGs this script writes (synthetic objects on textured
backgrounds, JPEG-compressed like photos). fewshot runs as its CLI (`mahalanobis-train --head euclidean --adapt
none`); easyfsl as its README shows: `EasySet` + `TaskSampler` + `DataLoader(collate_fn=sampler.episodic_collate_fn)`
+ `PrototypicalNetworks`.
Episodes per second count training and test episodes over the time from the first training step to the end of
the test (model building and process start are left out on both sides). With --amp, two more rows per setting
run both sides in mixed precision (the device's `--amp` dtype, bf16 on a CPU): fewshot's `--amp` and easyfsl's
loop under `torch.autocast`; their ratios are still against easyfsl in float32, the peer as its README runs.
Figures depend on the machine. An out
file's hand-written notes (from its `## Notes` heading on) are kept when the table is rewritten."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Sampler

from fewshot_cli.data.synthetic import SyntheticImages
from fewshot_cli.models.backbones import build_backbone
from fewshot_cli.runner.precision import autocast, autocast_dtype, grad_scaler

N_WAY, K_SHOT, N_QUERY, LR = 5, 5, 15, 1e-3
NOTES = "## Notes"

# easyfsl 1.5.0's TaskSampler calls Sampler.__init__(data_source=None); torch 2.6 dropped that parameter
Sampler.__init__ = lambda self, *args, **kwargs: None  # noqa: E731


def import_easyfsl() -> None:
    """Import easyfsl where tqdm, pandas or matplotlib are missing (a GPU machine without internet): its package
    __init__s import every dataset and method, some of which use them; EasySet, TaskSampler and
    PrototypicalNetworks, all this benchmark runs, do not. A missing one is stood in for by a module whose every
    attribute raises if it is ever called, so a run cannot silently use it."""
    for _ in range(4):
        try:
            import easyfsl.methods  # noqa: F401
            import easyfsl.samplers  # noqa: F401
            return
        except ModuleNotFoundError as err:
            name = (err.name or "").split(".")[0]
            if name not in ("tqdm", "pandas", "matplotlib") or name in sys.modules:
                raise
            sys.modules[name] = _Absent(name)
            for module in [m for m in sys.modules if m.startswith("easyfsl")]:
                del sys.modules[module]  # a half-imported package is imported again


class _Absent(types.ModuleType):
    """A module that is not installed: any attribute is a callable that raises."""

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)

        def absent(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{attribute} is not installed; easyfsl asked for it")
        return absent


class GpuUtilisation:
    """The GPU's utilisation (%) sampled every `period_s` in a thread: `nvidia-smi`, else `torch.cuda.utilization`
    (it needs pynvml); `mean(start, end)` averages the samples taken in a wall-clock window."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s, self.samples = period_s, []
        self.source = "nvidia-smi" if shutil.which("nvidia-smi") else "pynvml" if _pynvml() else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GpuUtilisation:
        if self.source is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _poll(self) -> None:
        index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        while not self._stop.wait(self.period_s):
            now = time.time()
            try:
                if self.source == "nvidia-smi":
                    out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu",
                                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                         timeout=5).stdout
                    value = float(out.split()[0])
                else:
                    value = float(torch.cuda.utilization())
            except (OSError, ValueError, IndexError, RuntimeError, subprocess.TimeoutExpired):
                continue
            self.samples.append((now, value))

    def mean(self, start: float, end: float) -> float | None:
        values = [v for t, v in self.samples if start <= t <= end]
        return sum(values) / len(values) if values else None


def _pynvml() -> bool:
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return False
    return True


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
                cache_mb: int, size: int, decode: str = "cpu", amp: bool = False, test_episodes: int | None = None,
                name: str | None = None, watch=None) -> dict:
    """fewshot's CLI in a subprocess; `seconds` from its first training step to the end of its test, `process_s` the
    whole process (interpreter start to exit), `train_window_s` from the first step's start to the last step's end,
    `to_first_step_s` from the process's start to its first step's. `watch(command, log path)`, where given, runs
    the process instead of `subprocess.run` and returns (exit code, stderr, its own figures for the result)."""
    name = name or f"{backbone}-w{workers}-c{cache_mb}-{decode}{'-amp' if amp else ''}"
    command = [sys.executable, "-m", "fewshot_cli", "mahalanobis-train", "--data", str(data), "--preset", "cpu",
               "--device", device, "--backbone", backbone, "--image-size", str(size), "--head", "euclidean",
               "--adapt", "none", "--reduced-dim", "0", "--n-way", str(N_WAY), "--k-shot", str(K_SHOT),
               "--n-query", str(N_QUERY), "--episodes", str(episodes),
               "--test-episodes", str(test_episodes or episodes),
               "--val-every", "0", "--checkpoint-every", str(episodes), "--lr", str(LR), "--workers", str(workers),
               "--image-cache-mb", str(cache_mb), "--decode-device", decode, "--batch-size", "128", "--quiet", "--json",
               "--out", str(out), "--name", name, *(["--amp"] if amp else [])]
    process_start = time.time()
    if watch is None:
        done = subprocess.run(command, capture_output=True, text=True)
        code, stderr, watched = done.returncode, done.stderr, {}
    else:
        code, stderr, watched = watch(command, out / name / "log.jsonl")
    process_s = time.time() - process_start
    if code:
        raise SystemExit(f"fewshot failed: {stderr[-2000:]}")
    events = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    test = next(e for e in events if e["event"] == "eval" and e["phase"] == "test")
    seconds = test["elapsed_s"] - (steps[0]["elapsed_s"] - steps[0]["step_s"])
    first_step = steps[0]["time"] - steps[0]["step_s"]
    train_s = sum(s["step_s"] for s in steps)
    later_s = sum(s["step_s"] for s in steps[1:])
    return {"seconds": seconds, "train_s": train_s, "wait": sum(s["data_wait_s"] for s in steps) / train_s,
            "later_wait": sum(s["data_wait_s"] for s in steps[1:]) / later_s if later_s else 0.0,
            "accuracy": test["accuracy"], "ci95": test["accuracy_ci95"], "process_s": process_s,
            "train_window_s": steps[-1]["time"] - first_step, "later_s": steps[-1]["time"] - steps[0]["time"],
            "to_first_step_s": first_step - process_start,
            "window": (first_step, test["time"]), **watched}


def easyfsl_set(data: Path, split: str, tmp: Path, size: int):
    from easyfsl.datasets import EasySet
    from torchvision import transforms

    roots = sorted(str(p) for p in (data / split).iterdir())
    specs = tmp / f"{split}.json"
    specs.write_text(json.dumps({"class_names": [Path(r).name for r in roots], "class_roots": roots}))
    # the same geometry as fewshot's reader: the whole image resized to a square, ImageNet normalisation
    transform = transforms.Compose([transforms.Resize([size, size]), transforms.ToTensor(),
                                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return EasySet(specs, image_size=size, transform=transform)


def run_easyfsl(data: Path, backbone: str, workers: int, episodes: int, device: torch.device, tmp: Path,
                size: int, amp: bool = False, seed: int = 0, test_episodes: int | None = None) -> dict:
    from easyfsl.methods import PrototypicalNetworks
    from easyfsl.samplers import TaskSampler

    random.seed(seed)
    torch.manual_seed(seed)
    model = PrototypicalNetworks(build_backbone(backbone)).to(device)
    dtype = autocast_dtype(device, amp)
    scaler = grad_scaler(device, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loaders = {}
    for split in ("train", "test"):
        dataset = easyfsl_set(data, split, tmp, size)
        n_tasks = episodes if split == "train" or test_episodes is None else test_episodes
        sampler = TaskSampler(dataset, n_way=N_WAY, n_shot=K_SHOT, n_query=N_QUERY, n_tasks=n_tasks)
        loaders[split] = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                    pin_memory=device.type == "cuda", collate_fn=sampler.episodic_collate_fn)
    wait = first_wait = first_s = 0.0
    wall_start, started = time.time(), time.perf_counter()
    model.train()
    tasks = iter(loaders["train"])
    for episode in range(episodes):
        fetched = time.perf_counter()
        if episode == 1:
            first_wait, first_s = wait, fetched - started
        support, support_labels, query, query_labels, _ = next(tasks)
        wait += time.perf_counter() - fetched
        optimizer.zero_grad()
        with autocast(device.type, dtype):
            model.process_support_set(support.to(device), support_labels.to(device))
            loss = nn.functional.cross_entropy(model(query.to(device)), query_labels.to(device))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - started
    model.eval()
    accuracies = []
    with torch.no_grad(), autocast(device.type, dtype):
        for support, support_labels, query, query_labels, _ in loaders["test"]:
            model.process_support_set(support.to(device), support_labels.to(device))
            predicted = model(query.to(device)).argmax(1).cpu()
            accuracies.append(float((predicted == query_labels).float().mean()))
    seconds = time.perf_counter() - started
    std = float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0
    later_s = train_s - first_s
    return {"seconds": seconds, "train_s": train_s, "wait": wait / train_s,
            "later_wait": (wait - first_wait) / later_s if episodes > 1 else 0.0,
            "accuracy": float(np.mean(accuracies)),
            "ci95": 1.96 * std / math.sqrt(len(accuracies)), "window": (wall_start, wall_start + seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", default="40",
                        help="training episodes, and as many test episodes: one number, or one per backbone")
    parser.add_argument("--backbones", default="conv4,resnet12")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--decode", default="cpu", help="fewshot's --decode-device values to run (cpu, cuda)")
    parser.add_argument("--amp", action="store_true", help="also run both sides in mixed precision")
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--note", default="", help="added to the machine line (a shared machine, say)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    decodes = args.decode.split(",")
    if "cuda" in decodes and device.type != "cuda":
        raise SystemExit("--decode cuda needs --device cuda.")
    import_easyfsl()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name, GpuUtilisation() as gpu:
        tmp = Path(tmp_name)
        data = make_folder(tmp / "data", args.classes, args.per_class)
        backbones = args.backbones.split(",")
        counts = [int(n) for n in args.episodes.split(",")]
        for backbone, episodes in zip(backbones, counts * len(backbones) if len(counts) == 1 else counts,
                                      strict=True):
            for workers in (int(w) for w in args.workers.split(",")):
                runs = {"easyfsl 1.5.0": run_easyfsl(data, backbone, workers, episodes, device, tmp,
                                                     args.image_size)}
                for decode in decodes:
                    for cache_mb in (256, 0) if decode == "cpu" else (256,):  # on the GPU the cache holds bytes
                        runs[fewshot_label(decode, cache_mb)] = run_fewshot(
                            data, backbone, workers, episodes, str(device), tmp / "runs", cache_mb,
                            args.image_size, decode)
                if args.amp:
                    runs["easyfsl 1.5.0, autocast"] = run_easyfsl(data, backbone, workers, episodes, device, tmp,
                                                                  args.image_size, amp=True)
                    runs["fewshot, --amp"] = run_fewshot(data, backbone, workers, episodes, str(device),
                                                         tmp / "runs", 256, args.image_size, amp=True)
                easy = runs["easyfsl 1.5.0"]
                for library, figures in runs.items():
                    rate = 2 * episodes / figures["seconds"]
                    utilisation = gpu.mean(*figures.pop("window")) if device.type == "cuda" else None
                    rows.append({"backbone": backbone, "workers": workers, "episodes": episodes, "library": library,
                                 "rate": rate, "ratio": easy["seconds"] / figures["seconds"],
                                 "gpu_util": utilisation, **figures})
                    print(json.dumps(rows[-1]), flush=True)
        difference = decode_difference(data, args.image_size, device) if "cuda" in decodes else None
    table = render(rows, args, device, gpu.source, difference)
    print(table)
    if args.out is not None:
        notes = args.out.read_text().partition(NOTES) if args.out.exists() else ("", "", "")
        args.out.write_text(table + (f"\n{NOTES}{notes[2]}" if notes[1] else ""))


def fewshot_label(decode: str, cache_mb: int) -> str:
    return "fewshot" + (", GPU decode" if decode == "cuda" else "") + (", no cache" if not cache_mb else "")


def decode_difference(data: Path, size: int, device: torch.device) -> str:
    """How far nvjpeg's pixels are from libjpeg-turbo's on this data, after the same resize (levels of 255)."""
    from fewshot_cli.data.gpu_decode import Decoder, encoded_or_read, gather
    from fewshot_cli.data.images import read_image

    paths = sorted((data / "train").rglob("*.jpg"))[:64]
    gpu = Decoder(size, device)(gather([(encoded_or_read(p, size), 0) for p in paths])).cpu()
    cpu = torch.stack([read_image(p, size) for p in paths])
    diff = (gpu - cpu).abs() * 255
    return (f"nvjpeg against libjpeg-turbo on {len(paths)} of these JPEGs, after the same resize to {size} px: mean "
            f"absolute difference {diff.mean():.3f} levels of 255, largest {diff.max():.1f}, "
            f"{(diff > 0.5).float().mean():.1%} of values differ.")


def render(rows: list[dict], args: argparse.Namespace, device: torch.device, gpu_source: str | None,
           difference: str | None = None) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    command = " ".join(a for a in sys.argv[1:])
    cuda = device.type == "cuda"
    lines = [
        "# Input pipeline: fewshot against easyfsl 1.5.0 (machine-dependent figures)",
        "",
        f"Written by `python benchmarks/input_pipeline.py {command}` on {device.type} ({name}), {os.cpu_count()} "
        f"CPU cores, torch {torch.__version__}{'; ' + args.note if args.note else ''}. {args.classes} classes x "
        f"{args.per_class} JPEGs of 512 x 384 (3/5 of the classes train, 2/5 test); {N_WAY}-way {K_SHOT}-shot "
        f"{N_QUERY} queries at {args.image_size} px; as many test episodes as training episodes per run (the "
        "table's episodes). Episodes/s counts both; input wait is the share of training-step time spent waiting "
        "for the next episode (fewshot: its steps' `data_wait_s`), over every step and from the second step on "
        "(the first waits for the loader to start and for one worker to read a whole episode). Shared or busy "
        "cores make these figures noisy."
        + (f" GPU utilisation: the mean of {gpu_source or 'no'} samples (every 0.2 s) over each run's measured "
           "window. GPU decode: `--decode-device cuda`, JPEGs read as bytes by the workers and decoded by nvjpeg "
           "in the main process (its cache holds bytes, so it decodes every episode)." if cuda else "")
        + (" Mixed precision: `fewshot, --amp` and `easyfsl 1.5.0, autocast` run in the device's `--amp` dtype "
           f"({autocast_dtype(device, True)}); x easyfsl is still against easyfsl in float32." if args.amp else ""),
        "",
        "| backbone | episodes | workers | library | episodes/s | x easyfsl | input wait | from step 2 | "
        + ("GPU util | " if cuda else "") + "test accuracy (95% CI) |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "") + "---|",
    ]
    if difference:
        lines[2] += " " + difference
    for r in rows:
        util = ("n/a" if r["gpu_util"] is None else f"{r['gpu_util']:.0f}%") if cuda else None
        lines.append(f"| {r['backbone']} | {r['episodes']} | {r['workers']} | {r['library']} | {r['rate']:.2f} | "
                     f"{r['ratio']:.2f} | {r['wait']:.1%} | {r['later_wait']:.1%} | " + (f"{util} | " if cuda else "")
                     + f"{r['accuracy']:.3f} +- {r['ci95']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
