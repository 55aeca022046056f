"""Few-shot classification datasets read in place, in the layout their codebase wrote, recognised by their names.

The layouts: split folders, CloserLookFewShot file lists, Ravi and Larochelle's split files, easyfsl specs and
torchvision's Omniglot (docs/datasets.md). An index keeps one string of paths and an array of labels."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewshot_cli.data.images import IMAGE_SUFFIXES, READ_ERRORS, read_pixels
from fewshot_cli.episodes import SPLITS
from fewshot_cli.errors import BadInput

FOLDERS, FILELISTS, SPLIT_CSV, EASYFSL, OMNIGLOT = "folders", "filelists", "split-csv", "easyfsl", "omniglot"
#: each layout's file (or folder) of each split, as its source codebase names them
SPLIT_FILES = {
    FOLDERS: {"train": "train/", "val": "val/", "test": "test/"},
    FILELISTS: {"train": "base.json", "val": "val.json", "test": "novel.json"},
    SPLIT_CSV: {"train": "train.csv", "val": "val.csv", "test": "test.csv"},
    EASYFSL: {"train": "train.json", "val": "val.json", "test": "test.json"},
    OMNIGLOT: {"train": "images_background/", "test": "images_evaluation/"},
}
LAYOUT_NAMES = {FOLDERS: "split folders", FILELISTS: "CloserLookFewShot file lists",
                SPLIT_CSV: "Ravi and Larochelle's split files", EASYFSL: "easyfsl specs",
                OMNIGLOT: "torchvision's Omniglot"}
HINT = "see docs/datasets.md"


@dataclass
class ClassFiles:
    """One class of one split and its image paths, as a layout lists them (before they are packed)."""

    split: str
    name: str
    paths: list[str]


class PathTable(Sequence):
    """Many paths as one string and an array of where each ends: two objects, not one per path."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._text = "".join(paths)
        self._ends = np.cumsum(np.fromiter(map(len, paths), dtype=np.int64, count=len(paths)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, item: int | slice) -> Path | list[Path]:  # type: ignore[override]
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        if not -len(self) <= item < len(self):
            raise IndexError(item)
        item %= len(self)
        start = int(self._ends[item - 1]) if item else 0
        return Path(self._text[start:int(self._ends[item])])

    def __iter__(self) -> Iterator[Path]:
        return (self[i] for i in range(len(self)))


class FewShotSplits:
    """Few-shot splits on disk; items are numbered across all splits (each class's items a contiguous range),
    labels are global class ids; an item is its image's resized uint8 pixels (`images.to_float` makes them the
    model's input) and its label."""

    pixel_dtype = torch.uint8

    def __init__(self, classes: Sequence[ClassFiles], image_size: int, data_format: str,
                 test_format: str | None = None, notes: Sequence[str] = ()) -> None:
        self.image_size, self.data_format, self.test_format = image_size, data_format, test_format
        #: what was skipped while indexing, one sentence each (the run logs them as warnings)
        self.notes = list(notes)
        self.class_names = [f"{c.split}/{c.name}" for c in classes]
        sizes = np.fromiter((len(c.paths) for c in classes), dtype=np.int64, count=len(classes))
        self.paths = PathTable([p for c in classes for p in c.paths])
        self.labels = np.repeat(np.arange(len(classes), dtype=np.int32), sizes)
        ends = np.cumsum(sizes)
        self._by_split: dict[str, dict[int, range]] = {}
        for label, (c, end, size) in enumerate(zip(classes, ends.tolist(), sizes.tolist(), strict=True)):
            self._by_split.setdefault(c.split, {})[label] = range(end - size, end)

    def has_split(self, split: str) -> bool:
        return split in self._by_split

    def items_by_class(self, split: str) -> dict[int, range]:
        return self._by_split[split]

    def describe(self) -> dict[str, dict[str, int]]:
        """Classes and images of each split."""
        return {split: {"classes": len(by_class), "images": sum(map(len, by_class.values()))}
                for split, by_class in self._by_split.items()}

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        return self._read(item, read_pixels)

    def encoded(self, item: int) -> tuple[torch.Tensor, int]:
        """A JPEG's bytes for decoding on the GPU, or any other image decoded (`gpu_decode.encoded_or_read`)."""
        from fewshot_cli.data.gpu_decode import encoded_or_read  # torchvision.io's GPU path, only when asked for

        return self._read(item, encoded_or_read)

    def _read(self, item: int, reader: Callable[[Path, int], torch.Tensor]) -> tuple[torch.Tensor, int]:
        path = self.paths[item]
        try:
            return reader(path, self.image_size), int(self.labels[item])
        except READ_ERRORS as err:
            raise BadInput(f"Cannot read image {path}: {err}.") from None


def detect(root: Path, option: str = "--data") -> str:
    """The layout `root` holds, from the names in it alone."""
    root = Path(root)
    if not root.exists():
        raise BadInput(f"{option} {root} does not exist.")
    if not root.is_dir():
        raise BadInput(f"{option} {root} is not a folder; {HINT} for the layouts it may hold.")
    names = set(os.listdir(root))
    if names & {"base.json", "novel.json"}:
        return FILELISTS
    if names & {"train.json", "test.json"}:
        return EASYFSL
    if names & {"train.csv", "test.csv"} or "split" in names and "images" in names:
        return SPLIT_CSV
    if names & {"omniglot-py", "images_background", "images_evaluation"}:
        return OMNIGLOT
    if any((root / s).is_dir() for s in SPLITS):
        return FOLDERS
    raise BadInput(f"{option} {root} holds none of the layouts read here: folders train/ and test/, base.json and "
                   f"novel.json, train.csv and test.csv beside images/, easyfsl's train.json and test.json, or "
                   f"Omniglot's images_background/ and images_evaluation/; {HINT}.")


def open_splits(root: Path, image_size: int, image_root: str | Path | None = None,
                test_root: Path | None = None) -> FewShotSplits:
    """The splits of `root` in whichever layout it holds; with `test_root`, the test split is that dataset's (any
    layout) and `root` needs none. `image_root`: where the images listed by file lists, split files or specs are now."""
    notes: list[str] = []
    splits = ("train", "val") if test_root is not None else SPLITS
    required = ("train",) if test_root is not None else ("train", "test")
    data_format, classes = read_layout(Path(root), "--data", splits, required, image_root, notes)
    test_format = None
    if test_root is not None:
        test_format, test_classes = read_layout(Path(test_root), "--test-data", ("test",), ("test",), image_root,
                                                notes)
        classes += test_classes
    if image_root is not None and not {data_format, test_format} & {FILELISTS, SPLIT_CSV, EASYFSL}:
        raise BadInput(f"--image-root applies to the layouts that list their images (file lists, split files, "
                       f"specs); --data {root} holds {LAYOUT_NAMES[data_format]}, read where they are.")
    return FewShotSplits(classes, image_size, data_format, test_format, notes)


def read_layout(root: Path, option: str, splits: Sequence[str], required: Sequence[str],
                image_root: str | Path | None, notes: list[str]) -> tuple[str, list[ClassFiles]]:
    """The layout of `root` and the classes of the `splits` it has; each of `required` must be there."""
    fmt = detect(root, option)
    where = _split_places(root, fmt)
    missing = [s for s in required if s not in where]
    if missing:
        need = ", ".join(SPLIT_FILES[fmt][s] for s in required)
        raise BadInput(f"{option} {root} holds {LAYOUT_NAMES[fmt]}, which must include {need}; missing: "
                       f"{', '.join(SPLIT_FILES[fmt][s] for s in missing)}.")
    wanted = {s: where[s] for s in splits if s in where}
    image_root = Path(image_root) if image_root is not None else None
    classes = _READERS[fmt](wanted, image_root, notes)
    by_split: dict[str, set[str]] = {}
    for c in classes:
        by_split.setdefault(c.split, set()).add(c.name)
    for split, place in wanted.items():
        if split not in by_split:
            raise BadInput(f"{place} holds no class with images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    ordered = sorted(by_split)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            shared = by_split[a] & by_split[b]
            if shared:
                raise BadInput(f"Classes must be disjoint across splits; {a} ({wanted[a]}) and {b} ({wanted[b]}) "
                               f"share {', '.join(sorted(shared)[:3])}.")
    return fmt, classes


def _split_places(root: Path, fmt: str) -> dict[str, Path]:
    """Each split's file or folder that `root` holds in layout `fmt`."""
    base = root
    if fmt == SPLIT_CSV and not any((root / f).is_file() for f in SPLIT_FILES[fmt].values()):
        base = root / "split"  # FEAT keeps the same files in split/
    elif fmt == OMNIGLOT and (root / "omniglot-py").is_dir():
        base = root / "omniglot-py"  # torchvision's root holds omniglot-py/
    places = {split: base / name.rstrip("/") for split, name in SPLIT_FILES[fmt].items()}
    return {split: p for split, p in places.items() if (p.is_dir() if SPLIT_FILES[fmt][split].endswith("/")
                                                          else p.is_file())}


# ---- each layout's reader: {split: its file or folder} -> classes, in the order they are numbered


def _folders(places: dict[str, Path], image_root: Path | None, notes: list[str]) -> list[ClassFiles]:
    """DATA/SPLIT/CLASS/IMAGE, images found at any depth under a class folder; empty class folders are skipped."""
    classes = []
    for split, split_dir in places.items():
        for name in sorted(e.name for e in os.scandir(split_dir) if e.is_dir()):
            paths = _images_under(split_dir / name)
            if paths:
                classes.append(ClassFiles(split, name, paths))
    return classes


def _images_under(folder: Path) -> list[str]:
    """Image files at any depth under `folder`, in the order of their paths' parts (as `Path`s sort)."""
    found, nested = [], False
    for parent, folders, files in os.walk(folder):
        nested = nested or bool(folders)
        prefix = parent + os.sep
        found += [prefix + f for f in files if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.split(os.sep)) if nested else sorted(found)


def _paired_lists(places: dict[str, Path], keys: tuple[str, ...], needs: str) -> dict[str, dict[str, list]]:
    """Each split's JSON object with `keys`: lists of strings (a `*_labels` list holds labels), the last two as
    long as each other (`needs` says why, e.g. "one label per image")."""
    specs = {split: _load_json(path, keys) for split, path in places.items()}
    first, second = keys[-2:]
    for split, spec in specs.items():
        for key in (k for k in keys if not k.endswith("_labels")):
            _check_strings(places[split], spec, key)
        if len(spec[first]) != len(spec[second]):
            raise BadInput(f"{places[split]} has {len(spec[first])} {first} but {len(spec[second])} {second}; "
                           f"it needs {needs}.")
    return specs


def _filelists(places: dict[str, Path], image_root: Path | None, notes: list[str]) -> list[ClassFiles]:
    """CloserLookFewShot's {label_names, image_names, image_labels}; labels index label_names, which every list
    of a dataset shares."""
    lists = _paired_lists(places, ("label_names", "image_names", "image_labels"), "one label per image")
    prefix = _common_folder([n for spec in lists.values() for n in spec["image_names"]])
    classes, listings = [], {}
    for split, spec in lists.items():
        path, names = places[split], spec["label_names"]
        labels = _labels(path, spec["image_labels"], len(names))
        resolved = _resolve(spec["image_names"], path, image_root, prefix)
        _check_exist(resolved, path, "image_names", image_root, prefix, listings)
        files = np.asarray(resolved, dtype=object)
        order = np.argsort(labels, kind="stable")
        present, starts = np.unique(labels[order], return_index=True)
        for label, group in zip(present.tolist(), np.split(order, starts[1:]), strict=True):
            classes.append(ClassFiles(split, names[label], files[group].tolist()))
    return classes


def _split_csv(places: dict[str, Path], image_root: Path | None, notes: list[str]) -> list[ClassFiles]:
    """Ravi and Larochelle's `filename,label` rows; the files in images/ beside the CSVs (FEAT: beside split/)."""
    first = next(iter(places.values())).parent
    images = image_root or (first.parent / "images" if first.name == "split" else first / "images")
    if not images.is_dir():
        raise BadInput(f"The split files in {first} read their images from {images}, which is not a folder; pass "
                       f"--image-root DIR, the folder that holds them.")
    classes, listings = [], {}
    for split, path in places.items():
        by_label: dict[str, list[str]] = {}
        with _opened(path) as handle:
            rows = csv.reader(handle)
            header = next(rows, None)
            if header is None or [h.strip() for h in header] != ["filename", "label"]:
                raise BadInput(f"{path} must start with the header filename,label, not "
                               f"{','.join(header) if header else 'nothing'}.")
            for line, row in enumerate(rows, start=2):
                if not row:
                    continue
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise BadInput(f"{path} line {line} is {','.join(row)!r}, not FILENAME,LABEL.")
                by_label.setdefault(row[1].strip(), []).append(row[0].strip())
        prefix = str(images) + os.sep
        listed = [ClassFiles(split, label, [prefix + n for n in names]) for label, names in by_label.items()]
        _check_exist([p for c in listed for p in c.paths], path, "filename", image_root, prefix, listings)
        classes += listed
    return classes


def _easyfsl(places: dict[str, Path], image_root: Path | None, notes: list[str]) -> list[ClassFiles]:
    """easyfsl's {class_names, class_roots}: a class is the image files directly in its root (as EasySet lists
    them); a root without images is skipped with a note."""
    specs = _paired_lists(places, ("class_names", "class_roots"), "one root per class")
    prefix = _common_folder([r.rstrip("/") + "/" for spec in specs.values() for r in spec["class_roots"]])
    classes = []
    for split, spec in specs.items():
        path = places[split]
        roots = _resolve(spec["class_roots"], path, image_root, prefix)
        for i, (name, root) in enumerate(zip(spec["class_names"], roots, strict=True)):
            if not os.path.isdir(root):
                raise BadInput(f"{path}: class_roots entry {i} ({spec['class_roots'][i]}) is not a folder here"
                               f"{_moved_hint(image_root, prefix)}.")
            with os.scandir(root) as entries:
                files = sorted(e.path for e in entries
                               if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file())
            if files:
                classes.append(ClassFiles(split, name, files))
            else:
                notes.append(f"{path}: class {name!r} has no image in {root}; it is left out.")
    return classes


def _omniglot(places: dict[str, Path], image_root: Path | None, notes: list[str]) -> list[ClassFiles]:
    """torchvision's Omniglot: SET/ALPHABET/CHARACTER/*.png, a class per character (named ALPHABET/CHARACTER)."""
    classes = []
    for split, folder in places.items():
        for alphabet in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
            for character in sorted(e.name for e in os.scandir(folder / alphabet) if e.is_dir()):
                with os.scandir(folder / alphabet / character) as entries:
                    files = sorted(e.path for e in entries if e.name.endswith(".png"))
                if files:
                    classes.append(ClassFiles(split, f"{alphabet}/{character}", files))
    return classes


_READERS: dict[str, Callable[[dict[str, Path], Path | None, list[str]], list[ClassFiles]]] = {
    FOLDERS: _folders, FILELISTS: _filelists, SPLIT_CSV: _split_csv, EASYFSL: _easyfsl, OMNIGLOT: _omniglot}


# ---- helpers of the list layouts


def _opened(path: Path):
    try:
        return path.open(newline="", encoding="utf-8")
    except OSError as err:
        raise BadInput(f"Cannot read {path}: {err.strerror or err}.") from None


def _load_json(path: Path, keys: tuple[str, ...]) -> dict:
    with _opened(path) as handle:
        try:
            spec = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInput(f"{path} is not valid JSON: {err}.") from None
    if not isinstance(spec, dict) or any(not isinstance(spec.get(k), list) for k in keys):
        raise BadInput(f"{path} must be a JSON object with the lists {', '.join(keys)}.")
    return spec


def _check_strings(path: Path, spec: dict, key: str) -> None:
    for i, value in enumerate(spec[key]):
        if not isinstance(value, str) or not value:
            raise BadInput(f"{path}: {key} entry {i} is {value!r}, not a name.")


def _labels(path: Path, values: list, n_names: int) -> np.ndarray:
    """image_labels as integers, each an index into label_names."""
    good = [isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_names for v in values]
    if not all(good):
        i = good.index(False)
        raise BadInput(f"{path}: image_labels entry {i} is {values[i]!r}, not an index into its {n_names} "
                       f"label_names.")
    return np.asarray(values, dtype=np.int64)


def _common_folder(paths: list[str]) -> str:
    """The longest folder every path starts with, with its trailing separator ('' when none)."""
    if not paths:
        return ""
    prefix = os.path.commonprefix([min(paths), max(paths)])
    return prefix[:prefix.rfind("/") + 1]


def _resolve(names: list[str], list_file: Path, image_root: Path | None, prefix: str) -> list[str]:
    """Listed paths as this machine reads them. With `image_root`, the folder the listed paths have in common is
    replaced by it; else a relative path is relative to the list's folder, or, where the first is not found
    there, to the current directory (easyfsl's specs are written relative to its repository's root)."""
    if image_root is not None:
        start, new = len(prefix), str(image_root).rstrip("/") + "/"
        return [new + n[start:] for n in names]
    if not names or all(os.path.isabs(n) for n in (names[0], names[-1])):
        return list(names)
    here = str(list_file.parent) + os.sep
    if not os.path.exists(here + names[0]) and os.path.exists(names[0]):
        here = os.getcwd() + os.sep
    return [n if os.path.isabs(n) else here + n for n in names]


def _check_exist(files: list[str], list_file: Path, key: str, image_root: Path | None, prefix: str,
                 listings: dict[str, frozenset[str]]) -> None:
    """Every listed file exists: one directory listing per folder (`listings`, shared by a dataset's lists), no
    file opened."""
    for i, path in enumerate(files):
        folder, _, name = path.rpartition(os.sep)
        listing = listings.get(folder)
        if listing is None:
            try:
                listing = listings[folder] = frozenset(os.listdir(folder or "."))
            except OSError:
                listing = listings[folder] = frozenset()
        if name not in listing:
            raise BadInput(f"{list_file}: {key} entry {i} ({path}) does not exist{_moved_hint(image_root, prefix)}.")


def _moved_hint(image_root: Path | None, prefix: str) -> str:
    if image_root is not None or not prefix:
        return ""
    return (f"; if the images have moved since the list was written, pass --image-root DIR, the folder that now "
            f"holds what {prefix} held")
