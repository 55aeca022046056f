"""Atomic writes: a file is either its old whole self or its new whole self, never half of either."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fewshot_cli.errors import CannotWrite
from fewshot_cli.models.weights import safe_load


class _Recording:
    """A file handle that keeps the OSError of a failed write: torch.save reports a full disk as a RuntimeError
    ("unexpected pos 704 vs 598") that names neither the file nor the cause."""

    def __init__(self, handle) -> None:
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_write_bytes(path: Path, write, durable: bool = True) -> None:
    """Write to a hidden temporary file, fsync (unless not `durable`: a file rebuilt from the seed at will), rename
    over `path`. Any operating-system error is a CannotWrite naming `path`, and the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.tmp")
    recording = None
    try:
        with open(tmp, "wb") as handle:
            recording = _Recording(handle)
            write(recording)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:
        failed = recording.error if recording is not None and recording.error is not None else err
        if not isinstance(failed, OSError):
            raise
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CannotWrite(path, failed) from err


def atomic_write_file(path: Path, write: Callable[[Path], None], durable: bool = True) -> None:
    """`atomic_write_bytes` for a writer that opens the file by its name (safetensors' `save_file`, which writes
    tensor by tensor, where `save` first builds the whole file in memory: twice the tensors' bytes at its peak).
    The writer's own errors, whatever their type (safetensors raises SafetensorError for a full disk), are
    failures to write `path`."""

    def by_name(handle: _Recording) -> None:
        try:
            write(Path(handle.handle.name))  # this empty handle then fsyncs what the writer wrote
        except Exception as err:  # noqa: BLE001 - any failure of the writer is a failed write of the file
            handle.error = err if isinstance(err, OSError) else OSError(f"{type(err).__name__}: {err}")
            raise handle.error from err

    atomic_write_bytes(path, by_name, durable)


def save_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, lambda h: h.write(text.encode()))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda h: torch.save(state, h))


def load_checkpoint(path: Path, option: str = "--resume") -> dict[str, Any]:
    """A checkpoint holds tensors and plain containers only: read with `weights_only=True`, so no pickled code
    runs; a file that needs more is a BadInput."""
    return safe_load(path, option)
