"""Food-101 from its official on-disk layout (via torchvision) or built-in synthetic classes, with v2 transforms."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets
from torchvision.transforms import v2

from fewshot_cli.data.images import IMAGENET_MEAN, IMAGENET_STD
from fewshot_cli.data.synthetic import SyntheticImages
from fewshot_cli.episodes import split_id
from fewshot_cli.errors import BadInput

# short schedules learn faster from milder crops than ImageNet's (0.08, 1.0)
CROP_SCALE = (0.25, 1.0)
#: its splits, in the order that numbers them in a random stream's seed (`episodes.split_id`)
SPLITS = ("train", "test")
#: built-in data: images per class in each split, the 3:1 ratio of Food-101's 750 / 250
SYNTHETIC_PER_CLASS = {"train": 48, "test": 16}


def train_transform(size: int) -> v2.Compose:
    """Random resized crop, flip and ImageNet normalisation, on PIL images or uint8 tensors."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size=(size, size), scale=CROP_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size: int) -> v2.Compose:
    """Resize the short side to size * 256/224 then centre-crop, as ImageNet evaluation does."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(round(size * 256 / 224), antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def check_layout(root: Path) -> None:
    """Say in one sentence what is missing when `root` does not hold Food-101's official layout."""
    base = root / "food-101"
    if not root.is_dir():
        raise BadInput(f"--data {root} is not a directory; point it at the folder that holds food-101/.")
    if not base.is_dir():
        hint = " (point --data at its parent)" if (root / "images").is_dir() and (root / "meta").is_dir() else ""
        raise BadInput(f"{base} is missing: --data must be the folder that holds food-101/{hint}.")
    for needed in ("images", "meta"):
        if not (base / needed).is_dir():
            raise BadInput(f"{base / needed} is missing: Food-101 needs food-101/images/ and food-101/meta/.")
    for name in ("classes.txt", "train.json", "test.json"):
        if not (base / "meta" / name).is_file():
            raise BadInput(f"{base / 'meta' / name} is missing: Food-101 needs meta/classes.txt, "
                           f"meta/train.json and meta/test.json.")
    classes = (base / "meta" / "classes.txt").read_text().split()
    for split in SPLITS:
        path = base / "meta" / f"{split}.json"
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInput(f"{path} is not valid JSON ({err.__class__.__name__}).") from err
        if not isinstance(meta, dict) or not all(isinstance(v, list) for v in meta.values()):
            raise BadInput(f"{path} must map each class name to a list of image ids like \"CLASS/ID\".")
        if sorted(meta) != sorted(classes):
            extra = sorted(set(meta) ^ set(classes))[:3]
            raise BadInput(f"{path} and meta/classes.txt list different classes (e.g. {', '.join(extra)}).")
        if not any(meta.values()):
            raise BadInput(f"{path} lists no images.")


class FoodImages:
    """One split as (image, label) pairs with its labels known up front: Food-101 on disk or built-in classes."""

    def __init__(self, load: Callable[[int], Image.Image], labels: Sequence[int], classes: Sequence[str],
                 files: Sequence[Path] | None = None) -> None:
        self._load = load
        self.labels = list(labels)
        self.classes = list(classes)
        self.files = files

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        return self._load(index)


class _Food101Loader:
    """Reads one image of a torchvision Food101 split (a class, not a closure, so worker processes can pickle it)."""

    def __init__(self, dataset: datasets.Food101) -> None:
        self.dataset = dataset

    def __call__(self, index: int) -> Image.Image:
        return self.dataset[index][0]


def food101_split(root: Path, split: str) -> FoodImages:
    """A Food-101 split read by torchvision's Food101 (download=False); check_layout(root) first."""
    dataset = datasets.Food101(root, split=split, download=False)
    # torchvision keeps the label list private; reading it avoids opening 101,000 images to learn their classes
    labels, files = dataset._labels, dataset._image_files
    return FoodImages(_Food101Loader(dataset), labels, dataset.classes, files)


class _SyntheticLoader:
    """Renders built-in item `offset + index` as an 8-bit RGB PIL image, so the same v2 transforms run."""

    def __init__(self, images: SyntheticImages, items: list[int]) -> None:
        self.images, self.items = images, items

    def __call__(self, index: int) -> Image.Image:
        pixels = self.images.image(self.items[index])
        return Image.fromarray((pixels * 255).round().astype(np.uint8), mode="RGB")


def synthetic_split(n_classes: int, image_size: int, seed: int, split: str) -> FoodImages:
    """Built-in classes (shape x colour x texture) split 3:1 into train and test images of every class."""
    per_class = sum(SYNTHETIC_PER_CLASS.values())
    # rendered a little larger than the input, as Food-101's photos are larger than 224
    images = SyntheticImages(image_size=round(image_size * 1.25), n_classes=n_classes, per_class=per_class,
                             seed=seed)
    start = 0 if split == "train" else SYNTHETIC_PER_CLASS["train"]
    count = SYNTHETIC_PER_CLASS[split]
    items = [c * per_class + start + i for c in range(n_classes) for i in range(count)]
    labels = [images.label(item) for item in items]
    return FoodImages(_SyntheticLoader(images, items), labels, [images.class_name(c) for c in range(n_classes)])


def stratified_subset(labels: Sequence[int], per_class: int, seed: int, split: str) -> list[int]:
    """`per_class` indices of each class (all of a smaller class), chosen from (seed, split) alone, sorted."""
    rng = np.random.default_rng([seed, split_id(split, SPLITS), 101])
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = np.asarray(by_class[label])
        take = min(per_class, len(members))
        chosen.extend(int(i) for i in rng.choice(members, size=take, replace=False))
    return sorted(chosen)


def check_files(split: FoodImages, indices: Sequence[int], name: str) -> None:
    """Every chosen image of an on-disk split exists, so a missing file stops the run before training."""
    if split.files is None:
        return
    missing = [split.files[i] for i in indices if not split.files[i].is_file()]
    if missing:
        raise BadInput(f"{len(missing)} image(s) listed in meta/{name}.json are missing, e.g. {missing[0]}.")


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of one training sample: its place in the epoch, not the process that loads it."""
    return int(np.random.default_rng([seed, epoch, position, 7]).integers(0, 2**62))


class TrainSamples(torch.utils.data.Dataset):
    """Training samples keyed by (index, augmentation seed): the same key gives the same tensor in any worker."""

    def __init__(self, split: FoodImages, transform: Callable[[Any], torch.Tensor]) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        image = self.split.image(index)
        # v2 transforms draw from torch's global stream; scope it to this sample
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tensor = self.transform(image)
        return tensor, self.split.labels[index]


class EvalSamples(torch.utils.data.Dataset):
    """Evaluation samples (deterministic transform) of the chosen indices of a split."""

    def __init__(self, split: FoodImages, indices: Sequence[int], transform: Callable[[Any], torch.Tensor]) -> None:
        self.split, self.indices, self.transform = split, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        index = self.indices[position]
        return self.transform(self.split.image(index)), self.split.labels[index]


class StepBatches(torch.utils.data.Sampler):
    """This rank's share of each training step's batch, as image keys, from `first_step` on.

    Each epoch's order is DistributedSampler's (shuffled from seed + epoch; one process is a world of one), and a
    step's batch is `batch_size` consecutive images of it: rank r of N holds images r, r + N, ... of every batch,
    so N ranks together load exactly the batches one process does. Step s's batch is a pure function of
    (seed, epoch, s): a run resumed mid-epoch, with any number of ranks, sees the batches it would have seen."""

    def __init__(self, indices: Sequence[int], batch_size: int, seed: int, first_step: int, last_step: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"a batch of {batch_size} does not split evenly over {world_size} ranks")
        self.indices = np.asarray(indices)
        self.batch_size, self.seed = batch_size, seed
        self.first_step, self.last_step = first_step, last_step
        self.rank, self.world_size = rank, world_size
        self._epoch_order: tuple[int, list[int]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.indices) // self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        """This rank's positions of the epoch's shuffled order: every N-th from its rank on."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            sampler = DistributedSampler(range(len(self.indices)), num_replicas=self.world_size, rank=self.rank,
                                         shuffle=True, seed=self.seed)
            sampler.set_epoch(epoch)
            self._epoch_order = (epoch, list(sampler))
        return self._epoch_order[1]

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, position = divmod(step - 1, self.batches_per_epoch)
        share = self.batch_size // self.world_size
        picks = self._order(epoch)[position * share:(position + 1) * share]
        keys = []
        for k, pick in enumerate(picks):
            # the image's place in the epoch's order: its augmentation seed, the same however many ranks
            place = position * self.batch_size + self.rank + self.world_size * k
            if place < len(self.indices):  # DistributedSampler pads the order to a multiple of N; one process not
                keys.append((int(self.indices[pick]), sample_seed(self.seed, epoch, place)))
        return keys

    def __iter__(self):
        for step in range(self.first_step, self.last_step + 1):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step + 1)
