"""The embed-classify data layout (DATA/CATEGORY/2.support-set, DATA/CATEGORY/6.preprocessed) and the built-in
synthetic categories written in that same layout."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_cli.data.images import IMAGE_SUFFIXES
from fewshot_cli.data.synthetic import SyntheticImages
from fewshot_cli.errors import BadInput
from fewshot_cli.runner.checkpoint import atomic_write_bytes

SUPPORT_DIR, QUERY_DIR = "2.support-set", "6.preprocessed"
UNKNOWN = "Unknown"
SHOT_DIR = re.compile(r"^shot[ _-]?\d+$", re.IGNORECASE)  # shot1, shot_2, Shot-3; "shotgun" is a class


@dataclass(frozen=True)
class ImageRef:
    """One image file: where it is, its path relative to DATA (as reported), and its class (None: unlabelled)."""

    path: Path
    name: str
    category: str
    label: str | None


@dataclass(frozen=True)
class EmbedData:
    """Every support image with its class and every query image with its label where its path names one."""

    root: Path
    classes: tuple[str, ...]
    categories: tuple[str, ...]
    support: tuple[ImageRef, ...]
    queries: tuple[ImageRef, ...]


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def scan(root: Path) -> EmbedData:
    """Read the layout under `root`; BadInput names what is missing or malformed."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"--data {root} is not a directory.")
    category_dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / SUPPORT_DIR).is_dir())
    if not category_dirs:
        raise BadInput(f"--data {root} holds no CATEGORY/{SUPPORT_DIR}/ folder; expected "
                       f"DATA/CATEGORY/{SUPPORT_DIR}/(shotX | CLASS/shotX) and DATA/CATEGORY/{QUERY_DIR}/**.")
    support: list[ImageRef] = []
    for cat_dir in category_dirs:
        category = cat_dir.name
        found = 0
        for entry in sorted((cat_dir / SUPPORT_DIR).iterdir()):
            if entry.name.startswith("."):
                continue
            # a shot folder (or a loose image) belongs to the category itself; any other folder is a class
            if entry.is_dir() and not SHOT_DIR.match(entry.name):
                label, files = entry.name, _images_under(entry)
            elif entry.is_dir():
                label, files = category, _images_under(entry)
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                label, files = category, [entry]
            else:
                continue
            if label == UNKNOWN:
                raise BadInput(f"{entry} is named {UNKNOWN!r}, which is reserved for rejected queries.")
            support += [ImageRef(f, f.relative_to(root).as_posix(), category, label) for f in files]
            found += len(files)
        if not found:
            raise BadInput(f"{cat_dir / SUPPORT_DIR} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    classes = tuple(sorted({ref.label for ref in support if ref.label is not None}))
    known = set(classes) | {UNKNOWN}
    queries: list[ImageRef] = []
    for cat_dir in category_dirs:
        query_dir = cat_dir / QUERY_DIR
        if not query_dir.is_dir():
            continue
        for f in _images_under(query_dir):
            queries.append(ImageRef(f, f.relative_to(root).as_posix(), cat_dir.name,
                                    query_label(f.relative_to(root).parts, known)))
    if not queries:
        raise BadInput(f"--data {root} holds no query images under any CATEGORY/{QUERY_DIR}/.")
    return EmbedData(root, classes, tuple(c.name for c in category_dirs), tuple(support), tuple(queries))


def query_label(parts: tuple[str, ...], known: set[str]) -> str | None:
    """The deepest folder of CATEGORY/6.preprocessed/.../FILE named like a known class (or Unknown), else None."""
    folders = [p for p in parts[:-1] if p != QUERY_DIR]
    for folder in reversed(folders):
        if folder in known:
            return folder
    return None


def write_synthetic(root: Path, categories: int, n_way: int, k_shot: int, n_query: int, image_size: int,
                    seed: int) -> Path:
    """Write the built-in data in the on-disk layout: even categories hold `n_way` class folders, odd ones are
    a class themselves (shot folders); each also gets `n_query` queries of a class no support set has, under
    6.preprocessed/Unknown/. Existing files are kept, so a resumed run finds its cache valid."""
    n_classes = categories * n_way + categories
    per_class = k_shot + n_query
    images = SyntheticImages(image_size=image_size, n_classes=n_classes, per_class=per_class, seed=seed)
    next_class = 0
    for c in range(categories):
        category = f"category-{c:02d}"
        if c % 2 == 0:
            for _ in range(n_way):
                name = images.class_name(next_class)
                for shot in range(k_shot):
                    _save(images, next_class, shot, root / category / SUPPORT_DIR / name / f"shot{shot + 1}")
                for q in range(n_query):
                    _save(images, next_class, k_shot + q, root / category / QUERY_DIR / name)
                next_class += 1
        else:
            for shot in range(k_shot):
                _save(images, next_class, shot, root / category / SUPPORT_DIR / f"shot{shot + 1}")
            for q in range(n_query):
                _save(images, next_class, k_shot + q, root / category / QUERY_DIR / "batch-1")
            next_class += 1
    for c in range(categories):  # classes past every support set: the queries a threshold should reject
        for q in range(n_query):
            _save(images, next_class, k_shot + q, root / f"category-{c:02d}" / QUERY_DIR / UNKNOWN)
        next_class += 1
    return root


def _save(images: SyntheticImages, cls: int, shot: int, folder: Path) -> None:
    item = cls * images.per_class + shot
    path = folder / f"img-{item:05d}.png"
    if path.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.rint(images.image(item) * 255).astype(np.uint8)
    # built from the seed again at will: renamed into place whole, but not flushed to the disk one by one
    atomic_write_bytes(path, lambda handle: Image.fromarray(pixels, "RGB").save(handle, format="PNG"), durable=False)
