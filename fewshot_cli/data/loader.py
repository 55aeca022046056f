"""Episodes' images through torch's DataLoader: worker processes, prefetch and pinned memory, in a fixed order."""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fewshot_cli.runner.faults import Faults

#: batches each worker holds ready; an episode's images are a few MB at 84 px, so 4 ahead cost little
PREFETCH_FACTOR = 4

Key = Hashable
Schedule = Callable[[Key], Iterator[tuple[Key, list[int]]]]


MiB = 1024 * 1024


class ImageCache:
    """Decoded, resized items by id, least recently used first out, at most `max_bytes` of tensors."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.hits = self.misses = 0
        self._items: OrderedDict[int, tuple[Any, int]] = OrderedDict()

    def get(self, item: int) -> Any:
        found = self._items.get(item)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(item)
        return found[0]

    def put(self, item: int, value: Any) -> None:
        size = tensor_bytes(value)
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, (_, freed) = self._items.popitem(last=False)
            self.bytes -= freed
        self._items[item] = (value, size)
        self.bytes += size

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a value (a tensor, or tuples, lists and dataclasses of them)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, tuple | list):
        return sum(map(tensor_bytes, value))
    if dataclasses.is_dataclass(value):
        return sum(tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


class ItemReader(Dataset):
    """Item id -> what the dataset reads for it (`data[i]`, or `data.<method>(i)`), in whichever process asks,
    through a cache of `cache_bytes` in each process that reads (a worker's copy starts empty)."""

    def __init__(self, data: Any, method: str = "__getitem__", cache_bytes: int = 0, faults: Faults | None = None
                 ) -> None:
        self.data, self.method, self.faults = data, method, faults
        self.cache = ImageCache(cache_bytes)

    def __getitem__(self, item: int) -> Any:
        value = self.cache.get(item)
        if value is None:
            if self.faults is not None:
                self.faults.read()
            value = getattr(self.data, self.method)(item)
            self.cache.put(item, value)
        return value


def cache_share(cache_mb: int, workers: int) -> int:
    """Each reading process's share of an --image-cache-mb budget: the workers split it, or the main process
    holds it all."""
    return cache_mb * MiB // max(1, workers)


def loader_bytes(cache_mb: int, items: int, item_bytes: int, workers: int, batch_bytes: int,
                 loaders: int = 1, reads: int | None = None) -> dict[str, int]:
    """Host memory `loaders` loaders alive at once hold that tracing a step does not see: the image cache at its
    bound (or the whole data, or the `reads` images the run reads by then, if smaller: a cache holds only what was
    read) and the batches their workers hold ready. With no workers every loader reads through the one cache of
    the main process."""
    copies = loaders if workers else 1
    out = {"image_cache": copies * min(cache_mb * MiB, _held(items, reads) * item_bytes)}
    if workers:
        out["loader_prefetch"] = loaders * workers * PREFETCH_FACTOR * batch_bytes
    return out


def loader_notes(cache_mb: int, items: int, item_bytes: int, workers: int, loaders: int = 1,
                 reads: int | None = None) -> dict[str, str]:
    """What `loader_bytes`' lines hold, in a few words for the plan: how many caches, and what bounds each."""
    copies = loaders if workers else 1
    each = cache_bound(cache_mb, items, item_bytes, reads)
    caches = {1: "one cache", 2: "train and val caches"}.get(copies, f"{copies} caches")
    notes = {"image_cache": f"{caches}, {copies} x {each}" if copies > 1 else f"{caches} of {each}"}
    if workers:
        notes["loader_prefetch"] = f"{loaders * workers} workers x {PREFETCH_FACTOR} batches"
    return notes


def cache_bound(cache_mb: int, items: int, item_bytes: int, reads: int | None = None) -> str:
    """What bounds one image cache, in words: its `--image-cache-mb`, or the images read by then."""
    held = _held(items, reads)
    return f"{cache_mb} MiB" if cache_mb * MiB <= held * item_bytes else f"{held:,} images"


def _held(items: int, reads: int | None) -> int:
    """The images a cache can hold by then: those read, no more than the data has."""
    return min(items, reads) if reads is not None else items


def image_bytes(data: Any, image_size: int) -> int:
    """One image's bytes as a loader holds, caches and sends it: 3 x size x size of the data's `pixel_dtype`
    (uint8 for image files, float32 for the built-in data)."""
    return 3 * image_size**2 * data.pixel_dtype.itemsize


def episode_reads(cfg: Any) -> dict[str, int]:
    """Images an episodic run reads (repeats included) by the end of its training (validation too) and by the end
    of its test: the most its image cache can hold then."""
    per_episode = cfg.n_way * (cfg.k_shot + cfg.n_query)
    vals = (cfg.steps() - 1) // cfg.val_every if cfg.val_every else 0
    train = (cfg.episodes + vals * cfg.val_episodes) * per_episode
    return {"train": train, "test": train + cfg.test_episodes * per_episode}


def stack_images(samples: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """(image, label) samples -> their images as one (B, 3, H, W) tensor; labels come from the episode."""
    return torch.stack([image for image, _ in samples])


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples and lists) onto `device`; pinned host memory lets the copy overlap compute."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


class Loaders:
    """One dataset's DataLoaders: `workers` processes, prefetch, pinned memory on CUDA. Each batch is the images of
    an item list the caller names, so what a batch holds never depends on the number of workers."""

    def __init__(self, reader: Dataset, collate: Callable[[list[Any]], Any], workers: int,
                 device: torch.device, received: Callable[[Any], None] | None = None,
                 finish: Callable[[Any], Any] | None = None) -> None:
        self.reader, self.collate, self.workers, self.device = reader, collate, workers, device
        self.finish = finish  # the main process's last stage of a batch (made float, JPEGs decoded), timed as wait
        self.received = received  # sees each batch once, in this process (counts a worker kept go here)
        self.wait_s = 0.0  # time spent waiting for a batch, since the last `take_wait`
        self._fixed: dict[str, tuple[list[list[int]], DataLoader]] = {}

    def loader(self, batches: Iterable[list[int]], persistent: bool = False) -> DataLoader:
        workers = self.workers
        return DataLoader(self.reader, batch_sampler=batches, collate_fn=self.collate, num_workers=workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=persistent and workers > 0,
                          prefetch_factor=PREFETCH_FACTOR if workers else None,
                          # a loader's own seed: drawing it from the global stream would shift the step's dropout
                          generator=torch.Generator().manual_seed(0))

    def fixed(self, name: str, batches: list[list[int]]) -> Iterator[Any]:
        """The batches of a phase that repeats (validation: the same episodes every time), on device, through one
        DataLoader whose workers persist between its passes; new batches make a new loader."""
        held = self._fixed.get(name)
        if held is None or held[0] != batches:
            self._fixed[name] = held = (batches, self.loader(_Batches(batches), persistent=True))
        return self._timed(iter(held[1]))

    def _timed(self, batches: Iterator[Any]) -> Iterator[Any]:
        while True:
            started = time.perf_counter()
            try:
                batch = to_device(next(batches), self.device)
            except StopIteration:
                return
            if self.finish is not None:
                batch = self.finish(batch)
            self.wait_s += time.perf_counter() - started
            if self.received is not None:
                self.received(batch)
            yield batch

    def take_wait(self) -> float:
        """Seconds spent waiting for input since the last call."""
        wait, self.wait_s = self.wait_s, 0.0
        return round(wait, 4)

    def release(self, name: str) -> None:
        """Let a phase's workers go (the test runs once)."""
        self._fixed.pop(name, None)

    def drop_cache(self) -> None:
        """Empty this process's image cache: nothing will read these images again (training is over)."""
        cache = getattr(self.reader, "cache", None)
        if cache is not None:
            cache.clear()


class _Batches:
    """A fixed list of item lists as a batch sampler that can be iterated again (for persistent workers)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Feed:
    """Training batches keyed `(step, part)`, fetched ahead in the order `schedule(first key)` gives. A step
    retried after an OOM back-off gets the batches it already had; a key out of order (a resume) restarts the
    loader there."""

    def __init__(self, loaders: Loaders, schedule: Schedule) -> None:
        self.loaders, self.schedule = loaders, schedule
        self._batches: Iterator[Any] | None = None
        self._keys: deque = deque()  # keys the loader has taken, in the order it yields their batches
        self._held: dict[Key, Any] = {}

    def get(self, key: tuple) -> Any:
        if key in self._held:
            return self._held[key]
        if key[0] != next(iter(self._held), (None,))[0]:
            self._held.clear()  # a new step: the last one's batches can go
        batch = self._next(key) if self._batches is not None else None
        if batch is None:
            self._start(key)
            batch = self._next(key)
            if batch is None:
                raise KeyError(f"{key} is not in the schedule")
        self._held[key] = batch
        return batch

    def start(self, key: tuple) -> None:
        """Start fetching at `key` now: the workers start and read ahead before the first `get` asks."""
        self._held.clear()
        self._start(key)

    def _start(self, key: Key) -> None:
        self._keys.clear()

        def items() -> Iterator[list[int]]:
            for k, batch_items in self.schedule(key):
                self._keys.append(k)
                yield batch_items

        self._batches = self.loaders._timed(iter(self.loaders.loader(items())))

    def _next(self, key: Key) -> Any:
        assert self._batches is not None
        batch = next(self._batches, None)
        if batch is None or self._keys.popleft() != key:
            self._batches = None  # exhausted, or asked out of order
            return None
        return batch

    def close(self) -> None:
        """Let the workers go (training is over)."""
        self._batches = None
        self._held.clear()
