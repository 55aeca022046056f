"""Built-in synthetic data, made from the seed with no files: image classes, detection scenes, video clips."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "bar", "ellipse", "half_disc")
COLOURS = np.array([
    [0.90, 0.10, 0.10], [0.10, 0.75, 0.15], [0.15, 0.25, 0.95], [0.95, 0.85, 0.10], [0.85, 0.15, 0.85],
    [0.10, 0.85, 0.85], [0.98, 0.55, 0.05], [0.55, 0.25, 0.10], [0.95, 0.95, 0.95], [0.45, 0.10, 0.60],
], dtype=np.float32)
TEXTURES = ("solid", "stripes", "dots", "checker")
N_STYLES = len(SHAPES) * len(COLOURS) * len(TEXTURES)
CLASS_SPLITS = {"train": (0, 64), "val": (64, 80), "test": (80, 100)}


def class_style(cls: int) -> tuple[int, int, int]:
    """(shape, colour, texture) of a class; consecutive classes differ in shape, colour and texture at once."""
    if not 0 <= cls < N_STYLES:
        raise ValueError(f"class {cls} out of range 0..{N_STYLES - 1}")
    shape = cls % len(SHAPES)
    colour = (cls // len(SHAPES) + 3 * cls) % len(COLOURS)
    texture = (cls // (len(SHAPES) * len(COLOURS)) + cls) % len(TEXTURES)
    return shape, colour, texture


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    if shape == "circle":
        return r < 0.95
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < 0.78
    if shape == "triangle":
        return (v > -0.85) & (v < 0.8) & (abs(u) < (v + 0.85) * 0.55)
    if shape == "cross":
        return ((abs(u) < 0.3) & (abs(v) < 0.95)) | ((abs(v) < 0.3) & (abs(u) < 0.95))
    if shape == "ring":
        return (r < 0.95) & (r > 0.55)
    if shape == "diamond":
        return abs(u) + abs(v) < 0.98
    if shape == "star":
        return r < 0.55 + 0.4 * np.cos(5 * np.arctan2(v, u))
    if shape == "bar":
        return (abs(v) < 0.32) & (abs(u) < 0.95)
    if shape == "ellipse":
        return (u / 0.95) ** 2 + (v / 0.5) ** 2 < 1
    return (r < 0.95) & (v > -0.1)


def _texture(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if texture == "stripes":
        return (np.sin(9 * (u + v)) > 0).astype(np.float32)
    if texture == "dots":
        return ((np.sin(10 * u) * np.sin(10 * v)) > 0.35).astype(np.float32)
    if texture == "checker":
        return ((np.floor(3.5 * u) + np.floor(3.5 * v)) % 2).astype(np.float32)
    return np.ones_like(u, dtype=np.float32)


def render_object(cls: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An object of class `cls` in a size x size patch: (rgb HxWx3, mask HxW), with pose and colour jitter."""
    shape, colour, texture = class_style(cls)
    angle = rng.uniform(-0.5, 0.5) if SHAPES[shape] not in ("circle", "ring") else 0.0
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    mask = _shape_mask(SHAPES[shape], u, v)
    base = np.clip(COLOURS[colour] + rng.normal(0, 0.04, 3), 0, 1).astype(np.float32)
    tex = _texture(TEXTURES[texture], u, v)
    shade = 0.35 + 0.65 * tex
    rgb = base[None, None, :] * shade[..., None]
    return rgb.astype(np.float32), mask


def _background(size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = (size, size) if isinstance(size, int) else size
    low = rng.uniform(0.25, 0.55, (max(h // 8, 2), max(w // 8, 2), 3)).astype(np.float32)
    ys = np.minimum(np.arange(h) * low.shape[0] // h, low.shape[0] - 1)
    xs = np.minimum(np.arange(w) * low.shape[1] // w, low.shape[1] - 1)
    bg = low[ys][:, xs] * 0.5 + 0.2
    return bg + rng.normal(0, 0.03, (h, w, 3)).astype(np.float32)


def _paste(canvas: np.ndarray, cls: int, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    x0, y0, x1, y1 = box
    rgb, mask = render_object(cls, max(x1 - x0, y1 - y0), rng)
    rgb, mask = rgb[: y1 - y0, : x1 - x0], mask[: y1 - y0, : x1 - x0]
    region = canvas[y0:y1, x0:x1]
    region[mask] = rgb[mask]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 float in [0, 1] to a CHW float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.clip(image, 0, 1).transpose(2, 0, 1)))


class SyntheticImages:
    """An image-classification set: `n_classes` classes of `per_class` images each, class = shape x colour x
    texture; item i is class i // per_class, drawn from (seed, i) alone."""

    pixel_dtype = torch.float32

    def __init__(self, image_size: int = 32, n_classes: int = 100, per_class: int = 60, seed: int = 0,
                 splits: dict[str, tuple[int, int]] | None = None) -> None:
        if n_classes > N_STYLES:
            raise ValueError(f"at most {N_STYLES} synthetic classes")
        self.image_size, self.n_classes, self.per_class, self.seed = image_size, n_classes, per_class, seed
        self.splits = splits or {name: (round(a * n_classes / 100), round(b * n_classes / 100))
                                 for name, (a, b) in CLASS_SPLITS.items()}

    def __len__(self) -> int:
        return self.n_classes * self.per_class

    def label(self, item: int) -> int:
        return item // self.per_class

    def image(self, item: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, item])
        size = self.image_size
        canvas = _background(size, rng)
        side = int(size * rng.uniform(0.55, 0.85))
        x0, y0 = (int(rng.integers(0, size - side + 1)) for _ in range(2))
        _paste(canvas, self.label(item), (x0, y0, x0 + side, y0 + side), rng)
        canvas += rng.normal(0, 0.02, canvas.shape).astype(np.float32)
        return np.clip(canvas, 0, 1)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        return to_tensor(self.image(item)), self.label(item)

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def items_by_class(self, split: str) -> dict[int, list[int]]:
        a, b = self.splits[split]
        return {c: list(range(c * self.per_class, (c + 1) * self.per_class)) for c in range(a, b)}

    def class_name(self, cls: int) -> str:
        shape, colour, texture = class_style(cls)
        return f"{SHAPES[shape]}-{colour}-{TEXTURES[texture]}"


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # HxWx3 float32
    boxes: np.ndarray  # Nx4 float32, xyxy in pixels
    labels: np.ndarray  # N int64


class SyntheticScenes:
    """Detection scenes: 1-4 objects of `n_classes` classes with their boxes on a textured background;
    scene i is drawn from (seed, i) alone."""

    def __init__(self, image_size: int = 128, n_classes: int = 20, n_scenes: int = 600, seed: int = 0,
                 max_objects: int = 4, size_range: tuple[float, float] = (0.14, 0.32)) -> None:
        self.image_size, self.n_classes, self.n_scenes, self.seed = image_size, n_classes, n_scenes, seed
        self.max_objects, self.size_range = max_objects, size_range
        self._labels = [self._layout(i)[1] for i in range(n_scenes)]

    def __len__(self) -> int:
        return self.n_scenes

    def _layout(self, index: int) -> tuple[list[tuple[int, int, int, int]], list[int], np.random.Generator]:
        rng = np.random.default_rng([self.seed, 2, index])
        size = self.image_size
        count = int(rng.integers(1, self.max_objects + 1))
        boxes: list[tuple[int, int, int, int]] = []
        labels: list[int] = []
        for _ in range(count * 8):
            if len(boxes) == count:
                break
            side = int(size * rng.uniform(*self.size_range))
            x0, y0 = (int(rng.integers(0, size - side + 1)) for _ in range(2))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_overlap(box, other) < 0.1 for other in boxes):
                boxes.append(box)
                labels.append(int(rng.integers(0, self.n_classes)))
        return boxes, labels, rng

    def labels(self, index: int) -> list[int]:
        return self._labels[index]

    def __getitem__(self, index: int) -> Scene:
        boxes, labels, rng = self._layout(index)
        canvas = _background(self.image_size, rng)
        for box, label in zip(boxes, labels, strict=True):
            _paste(canvas, label, box, rng)
        canvas += rng.normal(0, 0.02, canvas.shape).astype(np.float32)
        return Scene(np.clip(canvas, 0, 1), np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                     np.asarray(labels, dtype=np.int64))

    def items_by_class(self, classes: range | list[int]) -> dict[int, list[int]]:
        """For each class, the scenes that hold at least one object of it."""
        out: dict[int, list[int]] = {c: [] for c in classes}
        for index, labels in enumerate(self._labels):
            for c in set(labels):
                if c in out:
                    out[c].append(index)
        return out


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter / area if area else 0.0


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # TxHxWx3 float32
    boxes: np.ndarray  # Tx4 float32 xyxy; NaN rows where the object is absent
    label: int


class SyntheticClips:
    """Short video clips: one object of a class moving across a textured background, a distractor of another
    class, and frames where the object has left the view (box absent); clip i is drawn from (seed, i)."""

    def __init__(self, image_size: int = 64, n_classes: int = 16, n_clips: int = 400, frames: int = 8,
                 seed: int = 0) -> None:
        self.image_size, self.n_classes, self.n_clips, self.n_frames, self.seed = (
            image_size, n_classes, n_clips, frames, seed)

    def __len__(self) -> int:
        return self.n_clips

    def label(self, index: int) -> int:
        return int(np.random.default_rng([self.seed, 3, index]).integers(0, self.n_classes))

    def __getitem__(self, index: int) -> Clip:
        rng = np.random.default_rng([self.seed, 3, index])
        label = int(rng.integers(0, self.n_classes))
        distractor = (label + int(rng.integers(1, self.n_classes))) % self.n_classes
        size, n = self.image_size, self.n_frames
        side = int(size * rng.uniform(0.25, 0.4))
        start = rng.uniform(0, size - side, 2)
        velocity = rng.uniform(-0.12, 0.12, 2) * size
        d_side = int(size * 0.22)
        d_pos = rng.uniform(0, size - d_side, 2).astype(int)
        absent = set()
        if rng.random() < 0.4:  # the object is out of view for a stretch of frames
            a = int(rng.integers(1, n - 1))
            absent = set(range(a, min(n, a + int(rng.integers(1, 3)))))
        background = _background(size, rng)
        frames = np.empty((n, size, size, 3), dtype=np.float32)
        boxes = np.full((n, 4), np.nan, dtype=np.float32)
        for t in range(n):
            canvas = background.copy()
            dx, dy = d_pos
            _paste(canvas, distractor, (dx, dy, dx + d_side, dy + d_side), np.random.default_rng([self.seed, 4, index]))
            if t not in absent:
                pos = start + velocity * t
                pos = np.abs(pos) % (2 * (size - side))  # bounce off the edges
                pos = np.where(pos > size - side, 2 * (size - side) - pos, pos).astype(int)
                box = (int(pos[0]), int(pos[1]), int(pos[0]) + side, int(pos[1]) + side)
                _paste(canvas, label, box, np.random.default_rng([self.seed, 5, index]))
                boxes[t] = box
            frames[t] = np.clip(canvas + rng.normal(0, 0.02, canvas.shape), 0, 1)
        return Clip(frames, boxes, label)

    def support_image(self, cls: int, shot: int, size: int | None = None) -> np.ndarray:
        """A support image of class `cls`: the object alone, centred, on a plain background."""
        size = size or self.image_size
        rng = np.random.default_rng([self.seed, 6, cls, shot])
        canvas = _background(size, rng)
        side = int(size * rng.uniform(0.6, 0.8))
        o = (size - side) // 2
        _paste(canvas, cls, (o, o, o + side, o + side), rng)
        return np.clip(canvas, 0, 1)

    def items_by_class(self, classes: range | list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {c: [] for c in classes}
        for index in range(self.n_clips):
            c = self.label(index)
            if c in out:
                out[c].append(index)
        return out
