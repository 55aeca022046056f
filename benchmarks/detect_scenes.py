"""Where detect-train's novel-class misses are, on scenes of real handwritten digits in COCO format.

    python benchmarks/detect_scenes.py [--train 400] [--test 160] [--size 192] [--seeds 0,1,2] [--no-baseline]
        [--runs DIR] [--out results/detect_scenes.md] [-- DETECT-TRAIN OPTIONS ...]

The scenes: scikit-learn's bundled `load_digits` (1,797 real 8x8 scans of digits written by 43 people), each digit
scaled to a side of 16 to 64 px and laid on a 192 px canvas of noise, 2 to 6 per scene, touching one another at
times (boxes may overlap up to IoU 0.25). Base classes 0-4, novel 5-9: training scenes hold base digits only, drawn
from the first writers' scans; test scenes hold digits of all ten classes from the other writers' scans (the base
ones are distractors: a novel-class episode must not fire on them). Written as `annotations/{train,test}.json` and
`images/`, the COCO layout `--data` reads.

Two `detect-train --preset cpu` runs on them, side by side: `after` at the preset's defaults, `before` with the
knobs this benchmark's fixes changed set back (`BEFORE`; `--no-baseline` skips it); options after `--` go to both.
Then a diagnosis of each from the run's own `gt.json`, `detections.json` and `config.json`, every figure by
pycocotools:

- map, map50, per-class AP50;
- recall of the proposal grid (`--proposal-step`, `--proposal-scales`): the share of objects some grid box covers
  at IoU 0.5, before any ranking (an upper bound on what the detector can find);
- recall of the detections: the share of objects some detection (any class, any score) covers at IoU 0.5;
- oracles, each fixing one kind of error in `detections.json` and scoring again (the map50 each would give):
  class (a detection over an object at IoU 0.5 takes that object's class), localisation (a detection over an object
  at IoU 0.1-0.5 takes the object's box), duplicates (only the best detection per object counts), background (a
  detection over no object at IoU 0.1 is removed), and missed (the objects no detection finds are left out of
  the ground truth), so the largest gain names the largest cost.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

BASE, NOVEL = tuple(range(5)), tuple(range(5, 10))


# ---------------------------------------------------------------- scenes


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (N, 4) with every box of `b` (M, 4), both x0, y0, x1, y1."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda boxes: np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _digit(pixels: np.ndarray, side: int) -> np.ndarray:
    """An 8x8 scan (0-16) as a side x side ink map (0-255), resampled bicubically."""
    image = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def _scene(rng: np.random.Generator, digits: list[tuple[np.ndarray, int]], size: int
           ) -> tuple[np.ndarray, list[tuple[list[float], int]]]:
    canvas = rng.normal(40, 18, (size, size)).clip(0, 255).astype(np.float32)
    boxes: list[np.ndarray] = []
    objects = []
    for pixels, label in digits:
        side = int(rng.integers(16, 65))
        ink = _digit(pixels, side)
        ys, xs = np.nonzero(ink > 40)
        for _ in range(30):  # a place that overlaps the others at most IoU 0.25
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
            box = np.array([x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1], dtype=np.float64)
            if not boxes or _iou(box[None], np.stack(boxes)).max() <= 0.25:
                break
        else:
            continue
        canvas[y:y + side, x:x + side] = np.maximum(canvas[y:y + side, x:x + side], ink * rng.uniform(0.7, 1.0))
        boxes.append(box)
        objects.append(([float(v) for v in box], label))
    rgb = np.repeat(canvas[..., None], 3, axis=2) * rng.uniform(0.8, 1.0, 3)  # a tint per scene
    return rgb.clip(0, 255).astype(np.uint8), objects


def write_scenes(root: Path, n_train: int, n_test: int, size: int, seed: int) -> None:
    """`root/annotations/{train,test}.json` and `root/images/`: see the module's docstring."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    half = len(digits.target) // 2  # the bundled scans come ordered by writer: two halves, two sets of writers
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    categories = [{"id": c + 1, "name": str(c)} for c in range(10)]
    for split, count, pool, classes in (("train", n_train, range(half), BASE),
                                        ("test", n_test, range(half, len(digits.target)), BASE + NOVEL)):
        usable = [i for i in pool if digits.target[i] in classes]
        images, annotations = [], []
        for n in range(count):
            if split == "test":  # every test scene holds at least one novel digit
                picks = [int(rng.choice([i for i in usable if digits.target[i] in NOVEL]))]
                picks += [int(i) for i in rng.choice(usable, int(rng.integers(1, 6)))]
            else:
                picks = [int(i) for i in rng.choice(usable, int(rng.integers(2, 7)))]
            pixels, objects = _scene(rng, [(digits.images[i], int(digits.target[i])) for i in picks], size)
            name = f"{split}_{n:05d}.png"
            Image.fromarray(pixels).save(root / "images" / name)
            images.append({"id": n + 1, "file_name": name, "width": size, "height": size})
            for (x0, y0, x1, y1), label in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": n + 1, "category_id": label + 1,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                    "iscrowd": 0})
        (root / "annotations" / f"{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))


# ---------------------------------------------------------------- diagnosis


def _evaluate(gt: dict, detections: list[dict]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(detections) if detections else COCO(), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def map50(gt: dict, detections: list[dict]) -> float:
    return float(_evaluate(gt, detections).stats[1]) if detections else 0.0


def per_class_ap50(gt: dict, detections: list[dict]) -> dict[str, float]:
    evaluation = _evaluate(gt, detections)
    precision = evaluation.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recalls, classes, all areas, 100 dets
    names = {c["id"]: c["name"] for c in gt["categories"]}
    out = {}
    for k, category in enumerate(evaluation.params.catIds):
        values = precision[:, k]
        out[names[category]] = float(values[values > -1].mean()) if (values > -1).any() else float("nan")
    return out


def _xyxy(box: list[float]) -> np.ndarray:
    x, y, w, h = box
    return np.array([x, y, x + w, y + h], dtype=np.float64)


def _by_image(entries: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for entry in entries:
        out.setdefault(entry["image_id"], []).append(entry)
    return out


def grid_recall(gt: dict, config: dict) -> float:
    """The share of objects some box of the dense proposal grid covers at IoU 0.5."""
    import torch

    from fewshot_cli.models.detection import dense_proposals

    knobs = {k: v["value"] for k, v in config["knobs"].items()}
    side = int(knobs["image_size"])
    scales = tuple(float(s) for s in str(knobs["proposal_scales"]).split(","))
    ratios = tuple(float(r) for r in str(knobs.get("proposal_ratios", "1")).split(","))
    grid = dense_proposals(side, int(knobs["proposal_step"]), tuple(s * side for s in scales), ratios)
    grid = torch.as_tensor(grid, dtype=torch.float64).numpy()
    sizes = {image["id"]: (image["width"], image["height"]) for image in gt["images"]}
    found = []
    for annotation in gt["annotations"]:
        width, height = sizes[annotation["image_id"]]
        scaled = grid * np.array([width / side, height / side] * 2)
        found.append(_iou(_xyxy(annotation["bbox"])[None], scaled).max() >= 0.5)
    return float(np.mean(found))


def detection_recall(gt: dict, detections: list[dict]) -> float:
    """The share of objects some detection (any class, any score) covers at IoU 0.5."""
    by_image = _by_image(detections)
    found = []
    for annotation in gt["annotations"]:
        boxes = [_xyxy(d["bbox"]) for d in by_image.get(annotation["image_id"], [])]
        found.append(bool(boxes) and _iou(_xyxy(annotation["bbox"])[None], np.stack(boxes)).max() >= 0.5)
    return float(np.mean(found))


def oracles(gt: dict, detections: list[dict]) -> dict[str, float]:
    """map50 with one kind of error fixed in the detections (see the module's docstring)."""
    objects = _by_image(gt["annotations"])
    best: dict[int, tuple[float, int]] = {}  # object id -> (score, detection index) of its best-scored cover
    fixed_class, fixed_box, background_gone = [], [], []
    for i, detection in enumerate(detections):
        present = objects.get(detection["image_id"], [])
        overlaps = (_iou(_xyxy(detection["bbox"])[None], np.stack([_xyxy(o["bbox"]) for o in present]))[0]
                    if present else np.zeros(0))
        j = int(overlaps.argmax()) if len(overlaps) else -1
        iou = float(overlaps[j]) if j >= 0 else 0.0
        target = present[j] if j >= 0 else None
        fixed_class.append({**detection, "category_id": target["category_id"]} if iou >= 0.5 else detection)
        if target is not None and 0.1 <= iou < 0.5 and target["category_id"] == detection["category_id"]:
            fixed_box.append({**detection, "bbox": list(target["bbox"])})
        else:
            fixed_box.append(detection)
        if iou >= 0.1:
            background_gone.append(detection)
        if target is not None and iou >= 0.5 and target["category_id"] == detection["category_id"]:
            if detection["score"] > best.get(target["id"], (-1.0, -1))[0]:
                best[target["id"]] = (detection["score"], i)
    keep = {i for _, i in best.values()}
    duplicates_gone = [d for i, d in enumerate(detections) if i in keep or not _covers_own_class(d, objects)]
    found = {o for o in best}
    missed_gone = {**gt, "annotations": [a for a in gt["annotations"] if a["id"] in found]}
    return {"as run": map50(gt, detections), "class": map50(gt, fixed_class),
            "localisation": map50(gt, fixed_box), "duplicates": map50(gt, duplicates_gone),
            "background": map50(gt, background_gone), "missed": map50(missed_gone, detections)}


def _covers_own_class(detection: dict, objects: dict[int, list[dict]]) -> bool:
    present = [o for o in objects.get(detection["image_id"], []) if o["category_id"] == detection["category_id"]]
    if not present:
        return False
    return bool(_iou(_xyxy(detection["bbox"])[None], np.stack([_xyxy(o["bbox"]) for o in present])).max() >= 0.5)


def diagnose(run_dir: Path) -> dict:
    gt = json.loads((run_dir / "gt.json").read_text())
    detections = json.loads((run_dir / "detections.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"metrics": metrics, "per_class": per_class_ap50(gt, detections), "grid_recall": grid_recall(gt, config),
            "detection_recall": detection_recall(gt, detections), "oracles": oracles(gt, detections),
            "objects": len(gt["annotations"]), "detections": len(detections)}


def render(runs: dict[str, dict], commands: dict[str, str]) -> str:
    """The figures of each run side by side (`runs`: label -> diagnosis), each oracle as the map50 gain it gives."""
    labels = list(runs)
    lines = [f"- {label}: `{commands[label]}`" for label in labels]
    objects = {found["objects"] for found in runs.values()}
    lines += ["", f"{', '.join(map(str, sorted(objects)))} novel objects in the test episodes' queries.", "",
              "| figure | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]

    def row(name: str, values: list[float], sign: bool = False) -> None:
        lines.append(f"| {name} | " + " | ".join(f"{v:+.3f}" if sign else f"{v:.3f}" for v in values) + " |")

    row("map", [found["metrics"]["map"] for found in runs.values()])
    row("map50", [found["metrics"]["map50"] for found in runs.values()])
    for name in next(iter(runs.values()))["per_class"]:
        row(f"AP50 class {name}", [found["per_class"][name] for found in runs.values()])
    row("recall at IoU 0.5, proposal grid", [found["grid_recall"] for found in runs.values()])
    row("recall at IoU 0.5, detections", [found["detection_recall"] for found in runs.values()])
    lines.append("| detections | " + " | ".join(str(found["detections"]) for found in runs.values()) + " |")
    for name in next(iter(runs.values()))["oracles"]:
        if name != "as run":
            row(f"map50 gain with {name} errors fixed",
                [found["oracles"][name] - found["oracles"]["as run"] for found in runs.values()], sign=True)
    return "\n".join(lines) + "\n"


# the cpu preset's values of the knobs this benchmark's fixes changed, before them
BEFORE = ["--finetune-steps", "0", "--finetune-negatives", "0", "--class-scores", "sigmoid", "--score-threshold",
          "0.05", "--nms-iou", "0.5", "--soft-nms-sigma", "0", "--eval-top-k", "64"]


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=160)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--seeds", default="0",
                        help="scene sets, each written and trained with its seed, comma-separated: the diagnosis is "
                        "the first's, map and map50 every one's")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run at the defaults before the fixes (" + " ".join(BEFORE) + ")")
    parser.add_argument("--runs", type=Path, default=None, help="where the run directories go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="a markdown file for the diagnosis")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    settings = {"after": extra} if args.no_baseline else {"before": [*BEFORE, *extra], "after": extra}
    found: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or Path(tmp) / "runs"
        for seed in seeds:
            data = Path(tmp) / f"digit_scenes_{seed}"
            write_scenes(data, args.train, args.test, args.size, seed)
            commands = {label: ["detect-train", "--preset", "cpu", "--data", str(data), "--novel-classes",
                                "5,6,7,8,9", "--seed", str(seed), "--out", str(runs), "--name",
                                f"scenes-{seed}-{label}", "--quiet", *options] for label, options in settings.items()}
            # the runs are independent: side by side, one core each
            started = [subprocess.Popen(["fewshot", *command], env={**os.environ}) for command in commands.values()]
            if any(process.wait() for process in started):
                raise SystemExit("a detect-train run failed")
            if seed == seeds[0]:
                shown = {label: "fewshot " + " ".join("DATA" if c == str(data) else "RUNS" if c == str(runs) else c
                                                      for c in command) for label, command in commands.items()}
            found[seed] = {label: diagnose(runs / f"scenes-{seed}-{label}") for label in commands}
    text = render(found[seeds[0]], shown)
    if len(seeds) > 1:
        text += "\n" + render_seeds(found)
    print(text)
    if args.out is not None:
        args.out.write_text(f"# detect-train on real-digit scenes\n\n`python benchmarks/detect_scenes.py "
                            f"{' '.join(argv)}`\n\n{text}")


def render_seeds(found: dict[int, dict[str, dict]]) -> str:
    """map and map50 of every run on every scene set (`found`: seed -> label -> diagnosis) and their means."""
    labels = list(next(iter(found.values())))
    head = " | ".join(f"{label} {name}" for label in labels for name in ("map", "map50"))
    lines = [f"map and map50 on {len(found)} scene sets, each written and trained with its seed:", "",
             f"| seed | {head} |", "|---|" + "---|" * 2 * len(labels)]
    for seed, runs in found.items():
        lines.append(f"| {seed} | " + " | ".join(f"{runs[label]['metrics'][name]:.3f}" for label in labels
                                                 for name in ("map", "map50")) + " |")
    lines.append("| mean | " + " | ".join(
        f"{np.mean([runs[label]['metrics'][name] for runs in found.values()]):.3f}" for label in labels
        for name in ("map", "map50")) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
