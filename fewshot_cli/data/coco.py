"""Detection data for `detect-train`: the built-in synthetic scenes and COCO-format datasets on disk."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CocoDetection

from fewshot_cli.data.images import read_pixels
from fewshot_cli.data.synthetic import COLOURS, SHAPES, TEXTURES, SyntheticScenes, class_style, to_tensor
from fewshot_cli.errors import BadInput
from fewshot_cli.models.detection import BoxCounts, validate_box_array

# the built-in scenes: 20 classes, the last 5 held out as novel
SYNTHETIC_CLASSES = 20
SYNTHETIC_NOVEL = 5


@dataclass
class DetectionItem:
    """One image resized to a square side, its boxes (xyxy, resized pixels) and category ids, and its real size."""

    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    width: int
    height: int
    #: boxes validation dropped while reading this item (a DataLoader worker's counts reach the run this way)
    dropped: BoxCounts = field(default_factory=BoxCounts)


class SyntheticDetection:
    """The built-in scenes as a detection split; category id = synthetic class + 1 (COCO ids start at 1)."""

    pixel_dtype = torch.float32

    def __init__(self, image_size: int, n_classes: int, n_scenes: int, seed: int) -> None:
        self.scenes = SyntheticScenes(image_size=image_size, n_classes=n_classes, n_scenes=n_scenes, seed=seed)
        self.image_size = image_size
        self.categories = {c + 1: synthetic_class_name(c) for c in range(SYNTHETIC_CLASSES)}
        self.dropped = BoxCounts()

    def __len__(self) -> int:
        return len(self.scenes)

    def items_by_class(self, classes: list[int]) -> dict[int, list[int]]:
        by_class = self.scenes.items_by_class([c - 1 for c in classes])
        return {c + 1: items for c, items in by_class.items()}

    def file_name(self, index: int) -> str:
        return f"scene-{index}"

    def item(self, index: int) -> DetectionItem:
        scene = self.scenes[index]
        boxes, keep, counts = validate_box_array(scene.boxes, self.image_size, self.image_size)
        return DetectionItem(to_tensor(scene.image), torch.from_numpy(boxes), torch.from_numpy(scene.labels[keep] + 1),
                             self.image_size, self.image_size, counts)


def synthetic_class_name(cls: int) -> str:
    shape, colour, texture = class_style(cls)
    rgb = "".join(f"{round(float(v) * 15):x}" for v in COLOURS[colour])
    return f"{SHAPES[shape]}-{rgb}-{TEXTURES[texture]}"


def synthetic_splits(image_size: int, seed: int, train_scenes: int = 1200, test_scenes: int = 400,
                     ) -> tuple[SyntheticDetection, SyntheticDetection, list[int], list[int]]:
    """(train scenes with base classes only, test scenes with all classes, base ids, novel ids)."""
    n_base = SYNTHETIC_CLASSES - SYNTHETIC_NOVEL
    train = SyntheticDetection(image_size, n_base, train_scenes, seed)
    # a different scene stream so no test image is a training image
    test = SyntheticDetection(image_size, SYNTHETIC_CLASSES, test_scenes, seed + 7919)
    base = list(range(1, n_base + 1))
    novel = list(range(n_base + 1, SYNTHETIC_CLASSES + 1))
    return train, test, base, novel


class CocoSplit:
    """One COCO-format split (`annotations/SPLIT.json`, images under `images/`), read through torchvision's
    CocoDetection; boxes are validated once on load and the dropped ones counted. An item's pixels are uint8
    (`images.to_float` makes them the model's input)."""

    pixel_dtype = torch.uint8

    def __init__(self, root: Path, split: str, image_size: int) -> None:
        ann_file = root / "annotations" / f"{split}.json"
        images = root / "images"
        if not ann_file.is_file():
            raise BadInput(f"COCO data needs {ann_file}; it is missing.")
        if not images.is_dir():
            raise BadInput(f"COCO data needs the image folder {images}; it is missing.")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.dataset = CocoDetection(str(images), str(ann_file))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInput(f"{ann_file} is not valid JSON ({err}).") from err
        except (AssertionError, KeyError, TypeError) as err:
            raise BadInput(f"{ann_file} is not in COCO format (problem: {err!r}).") from err
        coco = self.dataset.coco
        if not coco.imgs:
            raise BadInput(f"{ann_file} lists no images.")
        self.image_size = image_size
        self.categories = {int(c["id"]): str(c["name"]) for c in coco.cats.values()}
        self.dropped = BoxCounts()
        self.index = list(self.dataset.ids)
        self.sizes: list[tuple[int, int]] = []
        self.boxes: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        missing = []
        for image_id in self.index:
            info = coco.imgs[image_id]
            if "file_name" not in info or not (images / info["file_name"]).is_file():
                missing.append(str(info.get("file_name", image_id)))
            anns = [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
            xywh = np.asarray([_bbox(a) for a in anns], dtype=np.float64).reshape(-1, 4)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            width, height = int(info.get("width", 0)), int(info.get("height", 0))
            if width <= 0 or height <= 0:
                raise BadInput(f"{ann_file}: image {image_id} has no positive width and height.")
            kept, keep, counts = validate_box_array(xyxy, height, width)
            self.dropped.add(counts)
            self.sizes.append((width, height))
            self.boxes.append(kept)
            self.labels.append(np.asarray([int(a.get("category_id", -1)) for a in anns], dtype=np.int64)[keep])
        if missing:
            raise BadInput(f"{len(missing)} images listed in {ann_file} are missing under {images} "
                           f"(e.g. {missing[0]}).")

    def __len__(self) -> int:
        return len(self.index)

    def items_by_class(self, classes: list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {c: [] for c in classes}
        for item, labels in enumerate(self.labels):
            for c in set(labels.tolist()):  # numpy: also works while the planner fakes torch
                if c in out:
                    out[c].append(item)
        return out

    def file_name(self, index: int) -> str:
        return str(self.dataset.coco.imgs[self.index[index]]["file_name"])

    def item(self, index: int) -> DetectionItem:
        width, height = self.sizes[index]
        pixels = read_pixels(Path(self.dataset.root) / self.file_name(index), self.image_size)
        scale = np.array([self.image_size / width, self.image_size / height] * 2, dtype=np.float32)
        return DetectionItem(pixels, torch.from_numpy(self.boxes[index] * scale), torch.from_numpy(self.labels[index]),
                             width, height)


def _bbox(annotation: dict) -> list[float]:
    """An annotation's [x, y, w, h]; a missing or malformed one becomes non-finite, so validation drops it."""
    bbox = annotation.get("bbox")
    if isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox):
        return [float(v) for v in bbox]
    return [float("nan")] * 4


def resolve_novel(categories: dict[int, str], novel: str | None) -> tuple[list[int], list[int]]:
    """Split category ids into (base, novel) from `--novel-classes` names or ids, comma-separated."""
    if not novel:
        raise BadInput("COCO data needs --novel-classes: the category names or ids held out for the few-shot test.")
    by_name = {name: cid for cid, name in categories.items()}
    chosen = []
    for token in (t.strip() for t in novel.split(",")):
        if not token:
            continue
        if token in by_name:
            chosen.append(by_name[token])
        elif token.lstrip("-").isdigit() and int(token) in categories:
            chosen.append(int(token))
        else:
            known = ", ".join(sorted(by_name)[:8])
            raise BadInput(f"--novel-classes names {token!r}, which is not a category of the data (known: {known}).")
    novel_ids = sorted(set(chosen))
    base_ids = sorted(set(categories) - set(novel_ids))
    if not novel_ids:
        raise BadInput("--novel-classes names no category.")
    if not base_ids:
        raise BadInput("--novel-classes holds out every category; leave some base classes to train on.")
    return base_ids, novel_ids


def coco_splits(root: Path, image_size: int, novel: str | None,
                ) -> tuple[CocoSplit, CocoSplit, list[int], list[int]]:
    """(train split, test split, base ids, novel ids) of a COCO-format dataset on disk."""
    train, test = CocoSplit(root, "train", image_size), CocoSplit(root, "test", image_size)
    for cid, name in test.categories.items():
        if train.categories.get(cid, name) != name:
            raise BadInput(f"Category {cid} is {train.categories[cid]!r} in train.json but {name!r} in test.json.")
    categories = {**test.categories, **train.categories}
    base, novel_ids = resolve_novel(categories, novel)
    train.categories = test.categories = categories
    return train, test, base, novel_ids
