"""Write scikit-learn's bundled digits (8x8, 1,797 images) split by class, train 0-4 and test 5-9, in any layout
mahalanobis-train reads (docs/datasets.md).

    python recipes/digits_split.py OUT                        # folders: OUT/{train,test}/digitD/IIII.png
    python recipes/digits_split.py OUT --layout filelists     # CloserLookFewShot: OUT/{base,novel}.json, OUT/images/
    python recipes/digits_split.py OUT --layout split-csv     # Ravi and Larochelle: OUT/{train,test}.csv, OUT/images/
    python recipes/digits_split.py OUT --layout easyfsl       # easyfsl specs: OUT/{train,test}.json, OUT/images/
    python recipes/digits_split.py OUT --layout omniglot      # torchvision: OUT/omniglot-py/images_background/...
    then: fewshot mahalanobis-train --data OUT ...

Every layout lists the same images in the same order, so a run reads the same episodes from each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SPLITS = {"train": range(0, 5), "test": range(5, 10)}  # 5 classes each: 5-way episodes, classes disjoint
LAYOUTS = ("folders", "filelists", "split-csv", "easyfsl", "omniglot")
#: the file each split is listed in, as CloserLookFewShot's write_*_filelist.py names them
FILELISTS = {"train": "base", "test": "novel"}


def write_images(digits, pixels: np.ndarray, folder_of) -> dict[str, dict[int, list[Path]]]:
    """Each digit's images as PNGs in `folder_of(split, digit)`: {split: {digit: [files]}}."""
    written: dict[str, dict[int, list[Path]]] = {}
    for split, classes in SPLITS.items():
        for digit in classes:
            folder = folder_of(split, digit)
            folder.mkdir(parents=True, exist_ok=True)
            files = [folder / f"{i:04d}.png" for i in np.flatnonzero(digits.target == digit)]
            for path in files:
                Image.fromarray(pixels[int(path.stem)]).save(path)
            written.setdefault(split, {})[digit] = files
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layout", choices=LAYOUTS, default="folders")
    args = parser.parse_args()
    out, layout = args.out, args.layout
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 grey levels to 0..255
    if layout == "folders":
        write_images(digits, pixels, lambda split, digit: out / split / f"digit{digit}")
    elif layout == "filelists":  # absolute paths, labels indexing every split's label_names, as CloserLook's
        written = write_images(digits, pixels, lambda split, digit: out / "images" / f"digit{digit}")
        names = [f"digit{d}" for d in range(10)]
        for split, by_digit in written.items():
            listed = [(str(p.resolve()), d) for d, files in by_digit.items() for p in files]
            spec = {"label_names": names, "image_names": [p for p, _ in listed], "image_labels": [d for _, d in listed]}
            (out / f"{FILELISTS[split]}.json").write_text(json.dumps(spec))
    elif layout == "split-csv":  # one images/ folder, a filename,label row per image
        written = write_images(digits, pixels, lambda split, digit: out / "images")
        for split, by_digit in written.items():
            rows = [f"{p.name},digit{d}\n" for d, files in by_digit.items() for p in files]
            (out / f"{split}.csv").write_text("filename,label\n" + "".join(rows))
    elif layout == "easyfsl":  # class roots relative to the specs' folder
        written = write_images(digits, pixels, lambda split, digit: out / "images" / f"digit{digit}")
        for split, by_digit in written.items():
            spec = {"class_names": [f"digit{d}" for d in by_digit],
                    "class_roots": [f"images/digit{d}" for d in by_digit]}
            (out / f"{split}.json").write_text(json.dumps(spec, indent=4))
    else:  # a class per character: background trains, evaluation tests
        sets = {"train": "images_background", "test": "images_evaluation"}
        root = out / "omniglot-py"
        write_images(digits, pixels, lambda split, digit: root / sets[split] / "Digits" / f"digit{digit}")
    print(f"wrote {len(pixels)} images to {out} ({layout})")


if __name__ == "__main__":
    main()
