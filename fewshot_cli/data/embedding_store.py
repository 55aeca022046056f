"""An append-only on-disk embedding store keyed by backbone identity and each file's path, size and mtime, and
the streamed extraction that fills it batch by batch in flat memory."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fewshot_cli.data.images import READ_ERRORS, read_pil

STORE_VERSION = 1


@dataclass(frozen=True)
class FileKey:
    """What decides whether a stored embedding is still valid for a file."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileKey:
        stat = path.stat()
        return cls(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


class EmbeddingStore:
    """`DIR/<backbone>-<digest>/`: `vectors.f32` (rows of float32, appended), `index.jsonl` (one line per file:
    its key and row, or its read error), `meta.json` (the identity and the dimension). The latest line for a
    path wins; a torn last line or a partial row left by an interrupted run is cut off when the store opens."""

    def __init__(self, root: Path, identity: dict[str, Any]) -> None:
        text = json.dumps({"store_version": STORE_VERSION, **identity}, sort_keys=True)
        self.identity = identity
        self.dir = Path(root) / f"{identity['backbone']}-{hashlib.sha1(text.encode()).hexdigest()[:16]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        # one writer per store: a second run sharing --cache-dir waits here instead of interleaving rows
        self._lock = (self.dir / "lock").open("w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.meta_path, self.vectors_path, self.index_path = (
            self.dir / "meta.json", self.dir / "vectors.f32", self.dir / "index.jsonl")
        self.dim: int | None = None
        if self.meta_path.exists():
            self.dim = json.loads(self.meta_path.read_text())["dim"]
        else:
            self.meta_path.write_text(json.dumps({"identity": identity, "dim": None}, sort_keys=True))
        self.entries: dict[str, dict[str, Any]] = {}
        self.rows = self._recover()
        self._vectors = self.vectors_path.open("ab")
        self._index = self.index_path.open("a", encoding="utf-8")
        self._view: np.memmap | None = None

    def _recover(self) -> int:
        """Cut a partial row and a torn index line; load the valid entries. Returns the number of rows."""
        rows = 0
        if self.dim and self.vectors_path.exists():
            row_bytes = self.dim * 4
            rows = self.vectors_path.stat().st_size // row_bytes
            os.truncate(self.vectors_path, rows * row_bytes)
        if not self.index_path.exists():
            return rows
        valid_bytes = 0
        with self.index_path.open("rb") as handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break
                try:
                    entry = json.loads(raw)
                except ValueError:
                    break
                if "row" in entry and entry["row"] >= rows:
                    break  # indexed past the rows on disk: cannot happen with our write order, but never trust it
                self.entries[entry["path"]] = entry
                valid_bytes += len(raw)
        os.truncate(self.index_path, valid_bytes)
        return rows

    def lookup(self, key: FileKey) -> dict[str, Any] | None:
        """The stored entry for this exact file version, or None if it must be (re)extracted."""
        entry = self.entries.get(key.path)
        if entry is None or entry["size"] != key.size or entry["mtime_ns"] != key.mtime_ns:
            return None
        return entry

    def append(self, keys: Sequence[FileKey], vectors: np.ndarray) -> None:
        """Write a batch of rows, then their index lines: an interruption between leaves rows nobody indexes."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.dim is None:
            self.dim = int(vectors.shape[1])
            self.meta_path.write_text(json.dumps({"identity": self.identity, "dim": self.dim}, sort_keys=True))
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"expected {len(keys)} x {self.dim} embeddings, got {vectors.shape}")
        self._vectors.write(vectors.tobytes())
        self._vectors.flush()
        for offset, key in enumerate(keys):
            self._write_entry({"path": key.path, "size": key.size, "mtime_ns": key.mtime_ns,
                               "row": self.rows + offset})
        self.rows += len(keys)
        self._index.flush()
        self._view = None

    def append_failure(self, key: FileKey, error: str) -> None:
        """Remember that this file version cannot be read, so a re-run lists it without decoding it again."""
        self._write_entry({"path": key.path, "size": key.size, "mtime_ns": key.mtime_ns, "error": error})
        self._index.flush()

    def _write_entry(self, entry: dict[str, Any]) -> None:
        self._index.write(json.dumps(entry, sort_keys=True) + "\n")
        self.entries[entry["path"]] = entry

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """The stored embeddings of these rows (a copy of only those rows, read through a memory map)."""
        if self._view is None:
            self._view = np.memmap(self.vectors_path, dtype=np.float32, mode="r", shape=(self.rows, self.dim))
        return np.asarray(self._view[np.asarray(rows, dtype=np.int64)], dtype=np.float32)

    def close(self) -> None:
        self._view = None
        self._vectors.close()
        self._index.close()
        self._lock.close()


class _ImageFiles(Dataset):
    """Decode + preprocess one file; a file that cannot be read comes back as its error, not an exception."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = read_pil(self.paths[index])
        except READ_ERRORS as err:
            return index, None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
        return index, self.preprocess(image).float(), None


@dataclass
class Batch:
    indices: list[int]
    pixels: torch.Tensor | None
    failures: list[tuple[int, str]]


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    ok = [(i, x) for i, x, _ in items if x is not None]
    return Batch([i for i, _ in ok], torch.stack([x for _, x in ok]) if ok else None,
                 [(i, e) for i, x, e in items if x is None and e is not None])


def iterate_batches(paths: Sequence[Path], preprocess: Callable[[Any], torch.Tensor], batch_size: int,
                    workers: int, pin_memory: bool = False) -> Iterator[Batch]:
    """Preprocessed batches of `paths` in order, decoded by `workers` processes (0: in this process)."""
    loader = DataLoader(_ImageFiles(paths, preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
                        persistent_workers=False)
    yield from loader


@dataclass
class ExtractionReport:
    extracted: int = 0
    cached: int = 0
    unreadable: int = 0


def extract(embedder: torch.nn.Module, paths: Sequence[Path], store: EmbeddingStore, device: torch.device,
            batch_size: int, workers: int = 0,
            on_batch: Callable[[int, int], None] | None = None,
            on_failure: Callable[[str, str], None] | None = None) -> ExtractionReport:
    """Embed every file the store lacks (or holds for an older version), a batch at a time: forward under
    inference mode, copied to the CPU at once and appended to the store; nothing is kept between batches."""
    report = ExtractionReport()
    todo: list[Path] = []
    keys: list[FileKey] = []
    for path in paths:
        key = FileKey.of(path)
        entry = store.lookup(key)
        if entry is None:
            todo.append(path)
            keys.append(key)
        elif "error" in entry:
            report.unreadable += 1
            if on_failure:
                on_failure(key.path, entry["error"])
        else:
            report.cached += 1
    for batch in iterate_batches(todo, embedder.preprocess, batch_size, workers, pin_memory=device.type == "cuda"):
        if batch.pixels is not None:
            with torch.inference_mode():
                out = embedder(batch.pixels.to(device, non_blocking=True))
                vectors = out.float().cpu().numpy()
            del out
            store.append([keys[i] for i in batch.indices], vectors)
            report.extracted += len(batch.indices)
        for index, error in batch.failures:
            store.append_failure(keys[index], error)
            report.unreadable += 1
            if on_failure:
                on_failure(keys[index].path, error)
        if on_batch:
            on_batch(report.extracted, len(todo))
    return report
