"""A photo-like few-shot folder from real images already installed (nothing downloaded): scikit-learn's two sample
photographs (`load_sample_images`: china.jpg, flower.jpg), matplotlib's grace_hopper.jpg, and matplotlib's two
elevation models (topobathy.npz, jacksboro_fault_dem.npz) rendered as shaded-relief pictures. Each picture is cut
into a 6 x 4 grid; a class is one cell, and its images are crops around that cell (shifted by up to half a
cell, 0.7x to 1.5x its size, flipped at random, most of the colour taken away,
white balance, brightness, contrast and blur varied, sensor grain added), saved
as 512 x 384 JPEGs at quality 70 to 95. 120 classes: 72 train, 48 test, disjoint cells chosen at random.

    make_photo_folder(root, per_class=20, seed=0) -> root holding train/CLASS/*.jpg and test/CLASS/*.jpg
    python benchmarks/photo_folder.py ROOT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import cbook
from matplotlib.colors import LightSource
from PIL import Image, ImageFilter
from sklearn.datasets import load_sample_images

COLUMNS, ROWS, TRAIN_SHARE = 6, 4, 0.6


def pictures() -> dict[str, np.ndarray]:
    """name -> (H, W, 3) uint8: three photographs and two shaded-relief renders of elevation models."""
    found = dict(zip(("china", "flower"), load_sample_images().images, strict=True))
    with cbook.get_sample_data("grace_hopper.jpg") as file:
        found["grace_hopper"] = np.asarray(Image.open(file).convert("RGB"))
    light = LightSource(azdeg=315, altdeg=45)
    for name, key, cmap in (("topobathy", "topo", "gist_earth"), ("jacksboro_fault_dem", "elevation", "terrain")):
        dem = cbook.get_sample_data(f"{name}.npz")  # an NpzFile already
        elevation = np.asarray(dem[key], dtype=np.float64)
        rgb = light.shade(elevation, cmap=matplotlib.colormaps[cmap], blend_mode="overlay", vert_exag=0.05)
        found[name] = (rgb[..., :3] * 255).astype(np.uint8)
    return found


def make_photo_folder(root: Path, per_class: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    cells = [(name, c, r) for name in pictures() for r in range(ROWS) for c in range(COLUMNS)]
    sources = {name: Image.fromarray(p) for name, p in pictures().items()}
    order = rng.permutation(len(cells))
    n_train = round(len(cells) * TRAIN_SHARE)
    for rank, index in enumerate(order):
        name, col, row = cells[index]
        folder = root / ("train" if rank < n_train else "test") / f"{name}-{row}{col}"
        folder.mkdir(parents=True, exist_ok=True)
        picture = sources[name]
        cell_w, cell_h = picture.width / COLUMNS, picture.height / ROWS
        for k in range(per_class):
            scale = rng.uniform(0.7, 1.5)
            cx = (col + 0.5 + rng.uniform(-0.5, 0.5)) * cell_w
            cy = (row + 0.5 + rng.uniform(-0.5, 0.5)) * cell_h
            w, h = cell_w * scale, cell_h * scale
            crop = picture.crop((int(cx - w / 2), int(cy - h / 2), int(cx + w / 2), int(cy + h / 2)))
            crop = crop.resize((512, 384), Image.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop = crop.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 2.0)))
            pixels = np.asarray(crop, dtype=np.float32)
            grey = pixels.mean(axis=2, keepdims=True)
            pixels = grey + (pixels - grey) * rng.uniform(0.0, 0.6)  # most of the colour gone: texture must tell
            pixels *= rng.uniform(0.85, 1.15, size=3)  # a white balance of its own
            mean = pixels.mean()
            pixels = (pixels - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.7, 1.3)
            pixels += rng.normal(0, 6, pixels.shape)  # sensor-like grain
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{k:03d}.jpg",
                                                                           quality=int(rng.integers(70, 96)))
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder to write train/CLASS/*.jpg and test/CLASS/*.jpg into")
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()
    make_photo_folder(args.root, args.per_class)
