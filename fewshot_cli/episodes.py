"""The one episode sampler: episode i is a pure function of (seed, split, i)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fewshot_cli.errors import BadInput

#: the splits of an episodic dataset, in the order that numbers them
SPLITS = ("train", "val", "test")


def split_id(split: str, splits: Sequence[str] = SPLITS) -> int:
    """The number a random stream's seed gives `split`: its place in the dataset's own splits, 9 for any other.
    A dataset with other splits passes its own (Food-101: train 0, test 1), so its streams stay what they were."""
    return splits.index(split) if split in splits else 9


@dataclass(frozen=True)
class Episode:
    """N classes; for each, K support items and Q query items (item ids as the dataset numbers them)."""

    index: int
    classes: tuple
    support: tuple[tuple[int, ...], ...]
    query: tuple[tuple[int, ...], ...]

    @property
    def hash(self) -> str:
        text = repr((self.classes, self.support, self.query)).encode()
        return hashlib.sha1(text).hexdigest()[:12]

    def support_items(self) -> tuple[list[int], list[int]]:
        """Flat support item ids and their episode labels 0..N-1, class-major."""
        return _flatten(self.support)

    def query_items(self) -> tuple[list[int], list[int]]:
        return _flatten(self.query)


def steps_hash(episodes: Sequence[Episode]) -> str:
    """The hash a training step logs: its episode's, or of its episodes' hashes in order."""
    if len(episodes) == 1:
        return episodes[0].hash
    return hashlib.sha1(" ".join(e.hash for e in episodes).encode()).hexdigest()[:12]


def _flatten(groups: tuple[tuple[int, ...], ...]) -> tuple[list[int], list[int]]:
    items = [item for group in groups for item in group]
    labels = [label for label, group in enumerate(groups) for _ in group]
    return items, labels


def episode_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one episode, scoped to it alone."""
    return np.random.default_rng([seed, split_id(split), index])


class EpisodeSampler:
    """N-way K-shot Q-query episodes over `items_by_class` ({class: [item ids]}), checked up front."""

    def __init__(self, items_by_class: Mapping[object, Sequence[int]], n_way: int, k_shot: int, n_query: int,
                 seed: int, split: str) -> None:
        self.n_way, self.k_shot, self.n_query, self.seed, self.split = n_way, k_shot, n_query, seed, split
        need = k_shot + n_query
        self.classes = sorted((c for c, items in items_by_class.items() if len(items) >= need), key=str)
        self.items = {c: np.asarray(sorted(items_by_class[c])) for c in self.classes}
        if len(self.classes) < n_way:
            short = len(items_by_class) - len(self.classes)
            detail = f" ({short} more have fewer)" if short else ""
            raise BadInput(
                f"The {split} split has {len(self.classes)} classes with at least {need} images "
                f"({k_shot} shots + {n_query} queries){detail}; {n_way}-way episodes need {n_way}. "
                f"Lower --n-way, --k-shot or --n-query, or add data.")

    def episode(self, index: int) -> Episode:
        rng = episode_rng(self.seed, self.split, index)
        chosen = rng.choice(len(self.classes), size=self.n_way, replace=False)
        classes, support, query = [], [], []
        for c in chosen:
            cls = self.classes[int(c)]
            picks = rng.choice(self.items[cls], size=self.k_shot + self.n_query, replace=False)
            classes.append(cls)
            support.append(tuple(int(i) for i in picks[: self.k_shot]))
            query.append(tuple(int(i) for i in picks[self.k_shot:]))
        return Episode(index, tuple(classes), tuple(support), tuple(query))
