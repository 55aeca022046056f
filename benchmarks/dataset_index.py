"""Indexing a few-shot dataset in each layout mahalanobis-train reads, against torchvision's ImageFolder indexing
the same files: seconds and MiB per 10,000 listed images.

    python benchmarks/dataset_index.py [--images 3000 60000] [--repeats 3] [--out results/dataset_index.md]

Setup, not measured: for each size, 100 classes (64 train, 16 val, 20 test) of tiny PNG files in the folder
layout, and the other layouts over the same files (file lists and easyfsl specs name them; the split files' flat
images/ and Omniglot's ALPHABET/CHARACTER/ folders are hard links to them). Each measurement is a fresh process:
after its imports, the wall time of indexing (`open_splits`, or an ImageFolder per split), the resident set it
keeps, then tracemalloc's peak (Python and numpy allocations) over a second indexing and what its index holds.
Medians over --repeats.
The goal: 60,000 images add under 2 s and 64 MiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from io import BytesIO
from pathlib import Path
from typing import Any

LAYOUTS = ("folders", "filelists", "split-csv", "easyfsl", "omniglot", "ImageFolder")
SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
LISTS = {"train": "base", "val": "val", "test": "novel"}
GOAL_S, GOAL_MIB, GOAL_IMAGES = 2.0, 64.0, 60_000
MiB = 2**20


def write_tree(root: Path, images: int) -> None:
    """`images` PNG files in every layout under root/LAYOUT (one set of files, linked or listed by the others)."""
    from PIL import Image

    buffer = BytesIO()
    Image.new("L", (4, 4), 128).save(buffer, format="PNG")
    png = buffer.getvalue()
    per_class = images // sum(SPLIT_CLASSES.values())
    names = [f"n{c:08d}" for c in range(sum(SPLIT_CLASSES.values()))]
    first = 0
    files: dict[str, dict[str, list[str]]] = {}
    for split, count in SPLIT_CLASSES.items():
        for name in names[first:first + count]:
            folder = root / "folders" / split / name
            folder.mkdir(parents=True)
            paths = [str(folder / f"{name}{i:08d}.png") for i in range(per_class)]
            for path in paths:
                with open(path, "wb") as handle:
                    handle.write(png)
            files.setdefault(split, {})[name] = paths
        first += count
    for layout in ("filelists", "split-csv", "easyfsl"):
        (root / layout).mkdir()
    (root / "split-csv" / "images").mkdir()
    for split, by_class in files.items():
        listed = [(p, names.index(c)) for c, paths in by_class.items() for p in paths]
        (root / "filelists" / f"{LISTS[split]}.json").write_text(json.dumps(
            {"label_names": names, "image_names": [p for p, _ in listed], "image_labels": [lb for _, lb in listed]}))
        (root / "easyfsl" / f"{split}.json").write_text(json.dumps(
            {"class_names": list(by_class), "class_roots": [os.path.dirname(p[0]) for p in by_class.values()]}))
        rows = []
        for c, paths in by_class.items():
            for p in paths:
                os.link(p, root / "split-csv" / "images" / os.path.basename(p))
                rows.append(f"{os.path.basename(p)},{c}\n")
        (root / "split-csv" / f"{split}.csv").write_text("filename,label\n" + "".join(rows))
    # Omniglot: 20 drawings per character, 20 characters per alphabet; the train and val files form the background
    flat = [p for split in ("train", "val", "test") for paths in files[split].values() for p in paths]
    background = sum(len(p) for split in ("train", "val") for p in files[split].values())
    for i, path in enumerate(flat):
        kind = "images_background" if i < background else "images_evaluation"
        character = i // 20
        folder = root / "omniglot" / "omniglot-py" / kind / f"Alphabet_{character // 20:03d}" / f"c{character:05d}"
        if i % 20 == 0:
            folder.mkdir(parents=True)
        os.link(path, folder / f"{i:08d}.png")


def index(layout: str, root: Path) -> Any:
    """`root`'s copy of the dataset in `layout`, indexed: fewshot's splits, or an ImageFolder per split."""
    if layout == "ImageFolder":
        from torchvision.datasets import ImageFolder

        return [ImageFolder(str(root / "folders" / split)) for split in SPLIT_CLASSES]
    from fewshot_cli.data.splits import open_splits

    return open_splits(root / layout, 16)


def child(layout: str, root: Path) -> None:
    """One measurement, in this fresh process: time and resident growth, then tracemalloc's peak."""
    import psutil
    import torchvision.datasets  # noqa: F401 - imports are not what is measured

    import fewshot_cli.data.splits  # noqa: F401

    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    start = time.perf_counter()
    kept = _Keep(layout, root)
    seconds = time.perf_counter() - start
    rss = process.memory_info().rss - before
    del kept
    gc.collect()
    tracemalloc.start()
    again = _Keep(layout, root)
    kept_bytes, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"images": again.images, "seconds": seconds, "rss_mib": rss / MiB, "peak_mib": peak / MiB,
                      "kept_mib": kept_bytes / MiB}))


class _Keep:
    """What an indexing leaves alive, kept alive while it is measured."""

    def __init__(self, layout: str, root: Path) -> None:
        self.index = index(layout, root)
        self.images = len(self.index.paths) if hasattr(self.index, "paths") else sum(map(len, self.index))


def measure(layout: str, root: Path, repeats: int) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", layout, str(root)], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        runs.append(json.loads(out.stdout.splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    lines = ["| layout | images | index s | s per 10k | x ImageFolder time | peak MiB | peak MiB per 10k | "
             "kept MiB per 10k | x ImageFolder kept | kept RSS MiB |", "|---|" + "---:|" * 9]
    for by_layout in results.values():
        base = by_layout["ImageFolder"]
        for layout, r in by_layout.items():
            per = 10_000 / r["images"]
            lines.append(f"| {layout} | {r['images']:,.0f} | {r['seconds']:.3f} | {r['seconds'] * per:.3f} | "
                         f"{r['seconds'] / base['seconds']:.2f} | {r['peak_mib']:.1f} | {r['peak_mib'] * per:.2f} | "
                         f"{r['kept_mib'] * per:.2f} | {r['kept_mib'] / base['kept_mib']:.2f} | {r['rss_mib']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[3000, 60_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    results: dict[int, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for images in args.images:
            root = Path(tmp) / str(images)
            write_tree(root, images)
            results[images] = {layout: measure(layout, root, args.repeats) for layout in LAYOUTS}
    text = table(results)
    if GOAL_IMAGES in results:
        worst = max((r for layout, r in results[GOAL_IMAGES].items() if layout != "ImageFolder"),
                    key=lambda r: r["seconds"])
        heaviest = max(r["peak_mib"] for layout, r in results[GOAL_IMAGES].items() if layout != "ImageFolder")
        met = worst["seconds"] < GOAL_S and heaviest < GOAL_MIB
        text += (f"\n{GOAL_IMAGES:,} images: slowest layout {worst['seconds']:.2f} s, largest peak {heaviest:.1f} MiB "
                 f"(goal under {GOAL_S:.0f} s and {GOAL_MIB:.0f} MiB: {'met' if met else 'NOT met'}).\n")
    print(text, end="")
    if args.out:
        command = "python benchmarks/dataset_index.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"# Indexing a dataset: each layout against torchvision's ImageFolder\n\n`{command}` "
                            f"({os.cpu_count()} CPUs, files in the page cache, medians of {args.repeats} fresh "
                            f"processes). `peak MiB`: tracemalloc's peak while indexing (Python and numpy); "
                            f"`kept MiB`: what the index holds once built (tracemalloc); `kept RSS MiB`: the "
                            f"process's growth once indexed (freed memory glibc keeps included).\n\n{text}")


if __name__ == "__main__":
    main()
