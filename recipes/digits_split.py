"""Write scikit-learn's bundled digits (8x8, 1,797 images) as an image-folder split by class: train 0-4, test 5-9.

    python recipes/digits_split.py OUT    # then: fewshot mahalanobis-train --data OUT ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SPLITS = {"train": range(0, 5), "test": range(5, 10)}  # 5 classes each: 5-way episodes, classes disjoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 grey levels to 0..255
    for split, classes in SPLITS.items():
        for digit in classes:
            folder = out / split / f"digit{digit}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(digits.target == digit):
                Image.fromarray(pixels[i]).save(folder / f"{i:04d}.png")
    print(f"wrote {len(pixels)} images to {out}/{{train,test}}/digitD")


if __name__ == "__main__":
    main()
