"""Image-folder splits on disk: `DATA/{train,val,test}/CLASS/IMAGE`, classes disjoint across splits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fewshot_cli.data.images import IMAGE_SUFFIXES, READ_ERRORS, read_pixels
from fewshot_cli.episodes import SPLITS
from fewshot_cli.errors import BadInput


class ImageFolderSplits:
    """Few-shot splits from folders; items are numbered across all splits, labels are global class ids; an item
    is its image's resized uint8 pixels (`images.to_float` makes them the model's input) and its label."""

    pixel_dtype = torch.uint8

    def __init__(self, root: Path, image_size: int, required: tuple[str, ...] = ("train", "test")) -> None:
        self.root, self.image_size = Path(root), image_size
        missing = [s for s in required if not (self.root / s).is_dir()]
        if missing:
            raise BadInput(f"--data {root} must hold the folders {', '.join(required)} (CLASS/IMAGE inside each); "
                           f"missing: {', '.join(missing)}.")
        self.paths: list[Path] = []
        self.labels: list[int] = []
        self.class_names: list[str] = []
        self._by_split: dict[str, dict[int, list[int]]] = {}
        for split in SPLITS:
            split_dir = self.root / split
            if not split_dir.is_dir():
                continue
            by_class: dict[int, list[int]] = {}
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                if not files:
                    continue
                label = len(self.class_names)
                self.class_names.append(f"{split}/{class_dir.name}")
                by_class[label] = list(range(len(self.paths), len(self.paths) + len(files)))
                self.paths += files
                self.labels += [label] * len(files)
            if not by_class:
                raise BadInput(f"{split_dir} holds no class folder with images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            self._by_split[split] = by_class
        names = {split: {n.split("/", 1)[1] for n in self.class_names if n.startswith(split + "/")}
                 for split in self._by_split}
        splits = sorted(names)
        for i, a in enumerate(splits):
            for b in splits[i + 1:]:
                shared = names[a] & names[b]
                if shared:
                    raise BadInput(f"Classes must be disjoint across splits; {a} and {b} share "
                                   f"{', '.join(sorted(shared)[:3])}.")

    def has_split(self, split: str) -> bool:
        return split in self._by_split

    def items_by_class(self, split: str) -> dict[int, list[int]]:
        return self._by_split[split]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        return self._read(item, read_pixels)

    def encoded(self, item: int) -> tuple[torch.Tensor, int]:
        """A JPEG's bytes for decoding on the GPU, or any other image decoded (`gpu_decode.encoded_or_read`)."""
        from fewshot_cli.data.gpu_decode import encoded_or_read

        return self._read(item, encoded_or_read)

    def _read(self, item: int, reader: Callable[[Path, int], torch.Tensor]) -> tuple[torch.Tensor, int]:
        path = self.paths[item]
        try:
            return reader(path, self.image_size), self.labels[item]
        except READ_ERRORS as err:
            raise BadInput(f"Cannot read image {path}: {err}.") from None
