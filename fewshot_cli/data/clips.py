"""Video clips for few-shot localisation: built-in synthetic or on disk, an LRU frame cache, episode batches."""

from __future__ import annotations

import csv
import math
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from fewshot_cli.data.images import IMAGE_SUFFIXES, READ_ERRORS, read_rgb, resize
from fewshot_cli.data.synthetic import SyntheticClips
from fewshot_cli.episodes import SPLITS, Episode, split_id
from fewshot_cli.errors import BadInput

BOX_FILE = "boxes.csv"
BOX_HEADER = ["frame", "x0", "y0", "x1", "y1"]
# built-in data: 24 classes, disjoint across splits, ~40 clips each
SYNTHETIC_SPLITS = {"train": range(0, 14), "val": range(14, 19), "test": range(19, 24)}
SYNTHETIC_CLIPS_PER_CLASS = 40
SYNTHETIC_SHOTS = 1000  # support images per class the generator can draw


def frame_bytes(image_size: int) -> int:
    """Bytes of one cached frame: 3 x S x S uint8."""
    return 3 * image_size * image_size


class FrameCache:
    """Decoded, resized frames in an LRU bounded by a frame count and a byte count, whichever binds first."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames, self.max_bytes = max_frames, max_bytes
        self._frames: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._frames)

    def get(self, key: Hashable) -> torch.Tensor | None:
        frame = self._frames.get(key)
        if frame is None:
            self.misses += 1
            return None
        self._frames.move_to_end(key)
        self.hits += 1
        return frame

    def put(self, key: Hashable, frame: torch.Tensor) -> None:
        # a view would keep its whole parent storage alive and the byte count would lie: own the memory
        frame = frame.contiguous().clone()
        size = frame.untyped_storage().nbytes()
        if size > self.max_bytes or self.max_frames < 1:
            return
        old = self._frames.pop(key, None)
        if old is not None:
            self.bytes -= old.untyped_storage().nbytes()
        self._frames[key] = frame
        self.bytes += size
        while len(self._frames) > self.max_frames or self.bytes > self.max_bytes:
            _, evicted = self._frames.popitem(last=False)
            self.bytes -= evicted.untyped_storage().nbytes()
            self.evictions += 1

    def stats(self) -> dict[str, float]:
        looked_up = self.hits + self.misses
        return {"cache_hit_rate": round(self.hits / looked_up, 4) if looked_up else 0.0,
                "cache_frames": float(len(self._frames)), "cache_mb": round(self.bytes / 2**20, 3)}


@dataclass
class ClipSource:
    """What an episode needs of a dataset: clips per class and split, their frames and boxes, support images."""

    image_size: int
    cache: FrameCache

    def items_by_class(self, split: str) -> dict[int, list[int]]:
        raise NotImplementedError

    def clip(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames T x 3 x S x S uint8, boxes T x 4 float xyxy pixels, NaN rows where absent)."""
        raise NotImplementedError

    def support_count(self, cls: int) -> int:
        raise NotImplementedError

    def support(self, cls: int, shot: int) -> torch.Tensor:
        """Support image `shot` of class `cls`, 3 x S x S uint8."""
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        return True


class SyntheticClipSource(ClipSource):
    """The built-in clips of `fewshot_cli.data.synthetic`: classes split disjointly into train/val/test."""

    def __init__(self, image_size: int, cache: FrameCache, frames: int = 8, seed: int = 0) -> None:
        super().__init__(image_size, cache)
        n_classes = max(r.stop for r in SYNTHETIC_SPLITS.values())
        self.clips = SyntheticClips(image_size=image_size, n_classes=n_classes,
                                    n_clips=n_classes * SYNTHETIC_CLIPS_PER_CLASS, frames=frames, seed=seed)
        self._by_split = {s: self.clips.items_by_class(list(r)) for s, r in SYNTHETIC_SPLITS.items()}
        self._boxes: dict[int, torch.Tensor] = {}

    def items_by_class(self, split: str) -> dict[int, list[int]]:
        return self._by_split[split]

    def clip(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.clips.n_frames
        frames = [self.cache.get((item, t)) for t in range(n)]
        if any(f is None for f in frames) or item not in self._boxes:
            clip = self.clips[item]  # rendering makes every frame at once
            rendered = torch.from_numpy((clip.frames * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)
            for t in range(n):
                self.cache.put((item, t), rendered[t])
            frames = list(rendered)
            # boxes are 128 bytes a clip and the clip count is fixed: keeping them all stays bounded
            self._boxes[item] = torch.from_numpy(clip.boxes)
        return torch.stack(frames), self._boxes[item]

    def support_count(self, cls: int) -> int:
        return SYNTHETIC_SHOTS

    def support(self, cls: int, shot: int) -> torch.Tensor:
        image = self.clips.support_image(cls, shot)
        return torch.from_numpy((image * 255).round().astype(np.uint8)).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class DiskClip:
    path: Path
    label: int
    frames: tuple[Path, ...]
    boxes: np.ndarray  # T x 4, in the resized frame's pixels, NaN rows where absent


class DiskClipSource(ClipSource):
    """`DATA/{train,val,test}/CLASS/{support/IMAGE, clips/CLIP/{FRAME..., boxes.csv}}`, checked at load."""

    def __init__(self, root: Path, image_size: int, cache: FrameCache) -> None:
        super().__init__(image_size, cache)
        self.root = Path(root)
        if not self.root.is_dir():
            raise BadInput(f"--data {self.root} is not a directory.")
        self.class_names: list[str] = []
        self.supports: list[tuple[Path, ...]] = []
        self.items: list[DiskClip] = []
        self._by_split: dict[str, dict[int, list[int]]] = {}
        for split in SPLITS:
            split_dir = self.root / split
            if not split_dir.is_dir():
                if split == "val":
                    continue  # optional: validation then uses the test split
                raise BadInput(f"{split_dir} is missing; the clip layout needs train/ and test/ (val/ optional).")
            self._by_split[split] = self._scan_split(split, split_dir)
        if "val" not in self._by_split:
            self._by_split["val"] = self._by_split["test"]

    def _scan_split(self, split: str, split_dir: Path) -> dict[int, list[int]]:
        by_class: dict[int, list[int]] = {}
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
        if not class_dirs:
            raise BadInput(f"{split_dir} holds no class folders.")
        for class_dir in class_dirs:
            cls = len(self.class_names)
            self.class_names.append(f"{split}/{class_dir.name}")
            supports = tuple(_images_in(class_dir / "support"))
            if not supports:
                raise BadInput(f"{class_dir / 'support'} holds no support images (.png/.jpg).")
            for path in supports:
                _image_size(path, what="support image")
            self.supports.append(supports)
            clip_dirs = sorted(p for p in (class_dir / "clips").glob("*") if p.is_dir())
            if not clip_dirs:
                raise BadInput(f"{class_dir / 'clips'} holds no clip folders.")
            by_class[cls] = []
            for clip_dir in clip_dirs:
                by_class[cls].append(len(self.items))
                self.items.append(self._read_clip(clip_dir, cls))
        return by_class

    def _read_clip(self, clip_dir: Path, cls: int) -> DiskClip:
        frames = tuple(_images_in(clip_dir))
        if not frames:
            raise BadInput(f"Clip {clip_dir} holds no frames (.png/.jpg).")
        width, height = _image_size(frames[0], what=f"frame of clip {clip_dir}")
        for frame in frames[1:]:
            if _image_size(frame, what=f"frame of clip {clip_dir}") != (width, height):
                raise BadInput(f"Clip {clip_dir}: frame {frame.name} is not {width}x{height} like the first.")
        rows = _read_box_rows(clip_dir)
        names = [f.name for f in frames]
        missing = sorted(set(names) - set(rows))
        extra = sorted(set(rows) - set(names))
        if missing or extra:
            what = f"no box row for frame(s) {', '.join(missing[:3])}" if missing else \
                f"box rows for missing frame(s) {', '.join(extra[:3])}"
            raise BadInput(f"Clip {clip_dir}: {what}.")
        boxes = np.full((len(frames), 4), np.nan, dtype=np.float32)
        for t, name in enumerate(names):
            box = rows[name]
            if box is None:
                continue
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise BadInput(f"Clip {clip_dir}: the box of frame {name} ({x0}, {y0}, {x1}, {y1}) is empty or "
                               f"outside the {width}x{height} frame.")
            boxes[t] = (x0 * self.image_size / width, y0 * self.image_size / height,
                        x1 * self.image_size / width, y1 * self.image_size / height)
        return DiskClip(clip_dir, cls, frames, boxes)

    def items_by_class(self, split: str) -> dict[int, list[int]]:
        return self._by_split[split]

    def has_split(self, split: str) -> bool:
        return split != "val" or (self.root / "val").is_dir()

    def clip(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.items[item]
        frames = []
        for t, path in enumerate(record.frames):
            frame = self.cache.get((item, t))
            if frame is None:
                frame = self._decode(path, f"frame {path.name} of clip {record.path}")
                self.cache.put((item, t), frame)
            frames.append(frame)
        return torch.stack(frames), torch.from_numpy(record.boxes)

    def support_count(self, cls: int) -> int:
        return len(self.supports[cls])

    def support(self, cls: int, shot: int) -> torch.Tensor:
        path = self.supports[cls][shot]
        return self._decode(path, f"support image {path}")

    def _decode(self, path: Path, what: str) -> torch.Tensor:
        try:
            image = read_rgb(path)
        except READ_ERRORS as err:
            raise BadInput(f"Cannot decode {what}: {err}") from None
        return resize(image, self.image_size).contiguous()


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _image_size(path: Path, what: str) -> tuple[int, int]:
    # the header only: cheap enough to check every file before training
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError):
        raise BadInput(f"{path} is not a readable image ({what}).") from None


def _read_box_rows(clip_dir: Path) -> dict[str, tuple[float, float, float, float] | None]:
    path = clip_dir / BOX_FILE
    if not path.is_file():
        raise BadInput(f"Clip {clip_dir} has no {BOX_FILE} (header frame,x0,y0,x1,y1; one row per frame).")
    rows: dict[str, tuple[float, float, float, float] | None] = {}
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if header != BOX_HEADER:
            raise BadInput(f"Clip {clip_dir}: {BOX_FILE} must start with the header {','.join(BOX_HEADER)}.")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            cells = [c.strip() for c in row]
            if len(cells) != 5:
                raise BadInput(f"Clip {clip_dir}: {BOX_FILE} line {line} has {len(cells)} fields, not 5.")
            name, coords = cells[0], cells[1:]
            if name in rows:
                raise BadInput(f"Clip {clip_dir}: {BOX_FILE} lists frame {name} twice.")
            if all(c == "" for c in coords):
                rows[name] = None  # the object is absent from this frame
                continue
            try:
                values = tuple(float(c) for c in coords)
            except ValueError:
                raise BadInput(f"Clip {clip_dir}: {BOX_FILE} line {line} has a non-numeric box.") from None
            if not all(math.isfinite(v) for v in values):
                raise BadInput(f"Clip {clip_dir}: {BOX_FILE} line {line} has a non-finite box.")
            rows[name] = values  # type: ignore[assignment]
    return rows


def make_source(data: Path | None, image_size: int, cache: FrameCache, frames: int, seed: int) -> ClipSource:
    """The on-disk clips at `data`, or the built-in synthetic clips when it is None."""
    if data is None:
        return SyntheticClipSource(image_size, cache, frames=frames, seed=seed)
    return DiskClipSource(data, image_size, cache)


def sample_triplets(labels: Sequence[int], count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` (anchor, positive, negative) index triplets over items with `labels`: anchor and positive share
    a class (the same item when its class has one; augmentation then tells them apart), the negative never does."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise BadInput("A triplet needs a negative from another class: use --n-way 2 or more, "
                       "or --triplet-ratio 0.")
    out = np.empty((count, 3), dtype=np.int64)
    for row in range(count):
        anchor_class = classes[rng.integers(len(classes))]
        same = np.flatnonzero(labels == anchor_class)
        anchor = same[rng.integers(len(same))]
        others = same[same != anchor]
        positive = others[rng.integers(len(others))] if len(others) else anchor
        # drawn only among items of other classes, so a negative can never share the anchor's class
        different = np.flatnonzero(labels != anchor_class)
        out[row] = anchor, positive, different[rng.integers(len(different))]
    return out


def augmentation(image_size: int) -> v2.Compose:
    """Support-image augmentation: crop, flip, colour; uint8 in, uint8 out."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        # no hue jitter: its HSV round trip costs more than the rest of an episode, and colour is class identity
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2),
    ])


@dataclass
class EpisodeBatch:
    """One episode as tensors: support views per class, query frames flat with their clip, triplet images."""

    support: torch.Tensor  # n_way x V x 3 x S x S uint8 (V = k_shot x (1 + num_aug))
    frames: torch.Tensor  # F x 3 x S x S uint8, all query clips' frames in order
    boxes: torch.Tensor  # F x 4 float, NaN rows where the object is absent
    frame_label: torch.Tensor  # F long: the class of a frame's clip, as an episode label 0..n_way-1
    clip_frames: list[int]  # Q: frames per query clip, in order (clips are contiguous in `frames`)
    triplets: torch.Tensor  # B x 3 x 3 x S x S uint8: anchor, positive, negative
    cache: dict[str, float] = field(default_factory=dict)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run tiny tensor ops on one thread: on busy cores, intra-op threads turn microseconds into milliseconds
    (measured 4 us vs 20 ms per 64x64 op), as DataLoader workers also run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_episode(source: ClipSource, episode: Episode, seed: int, split: str, k_shot: int, num_aug: int = 0,
                 triplet_count: int = 0) -> EpisodeBatch:
    """An episode's tensors; every random draw (shots, augmentations, triplets) comes from (seed, split, index)."""
    with one_thread():
        return _load_episode(source, episode, seed, split, k_shot, num_aug, triplet_count)


def _load_episode(source: ClipSource, episode: Episode, seed: int, split: str, k_shot: int, num_aug: int,
                  triplet_count: int) -> EpisodeBatch:
    rng = np.random.default_rng([seed, split_id(split), episode.index, 7])
    augment = augmentation(source.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**62)))
        originals, views, labels = [], [], []
        for label, cls in enumerate(episode.classes):
            shots = rng.choice(source.support_count(cls), size=k_shot, replace=source.support_count(cls) < k_shot)
            images = [source.support(cls, int(s)) for s in shots]
            originals.extend(images)
            labels.extend([label] * len(images))
            views.append(torch.stack(images + [augment(img) for img in images for _ in range(num_aug)]))
        triplets = torch.zeros(0, 3, 3, source.image_size, source.image_size, dtype=torch.uint8)
        if triplet_count:
            picks = sample_triplets(labels, triplet_count, rng)
            triplets = torch.stack([torch.stack([augment(originals[i]) for i in row]) for row in picks])
    frames, boxes, frame_label, lengths = [], [], [], []
    for item, label in zip(*episode.query_items(), strict=True):
        clip_frames, clip_boxes = source.clip(item)
        frames.append(clip_frames)
        boxes.append(clip_boxes)
        frame_label.append(torch.full((len(clip_frames),), label, dtype=torch.long))
        lengths.append(len(clip_frames))
    return EpisodeBatch(torch.stack(views), torch.cat(frames), torch.cat(boxes), torch.cat(frame_label), lengths,
                        triplets, source.cache.stats())
