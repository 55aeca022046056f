"""The run directory, claimed atomically: of two runs started with the same name, one gets it, the other exit 2."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from fewshot_cli.errors import BadInput, CannotWrite
from fewshot_cli.runner.checkpoint import save_json


def claim(run_dir: Path, config: dict[str, Any]) -> None:
    """Create `run_dir` (its parents as needed) and write `config.json` into it, or raise BadInput naming the path
    and the cause and leave nothing behind. `os.mkdir` fails when the directory exists, so exactly one of several
    runs started at once with the same `--out`/`--name` gets it."""
    parent = run_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir(exist_ok=True) says so when a file is in the way
        raise BadInput(f"Cannot create run directory {run_dir}: {_in_the_way(parent)} is not a directory.") from None
    except OSError as err:
        raise BadInput(f"Cannot create run directory {run_dir}: {err.strerror or err}.") from None
    try:
        os.mkdir(run_dir)
    except FileExistsError:
        raise BadInput(f"Run directory {run_dir} already exists; pass --resume {run_dir} or another --name.") from None
    except OSError as err:
        raise BadInput(f"Cannot create run directory {run_dir}: {err.strerror or err}.") from None
    try:
        save_json(run_dir / "config.json", config)
    except CannotWrite as err:
        release(run_dir)
        raise BadInput(str(err)) from None


def release(run_dir: Path) -> None:
    """Remove a freshly claimed run directory and what the run wrote before its first step, so its name is free."""
    for name in ("config.json", "log.jsonl", ".config.json.tmp"):
        with contextlib.suppress(OSError):
            (run_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def _in_the_way(path: Path) -> Path:
    """The first component of `path` that exists and is not a directory."""
    for part in reversed([path, *path.parents]):
        if part.exists() and not part.is_dir():
            return part
    return path
