"""Shared helpers: run the real CLI in a subprocess, and small configs that finish in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# A mahalanobis-train run of a few seconds: tiny images, few episodes, a short test.
SMALL = ["--preset", "cpu", "--image-size", "16", "--episodes", "6", "--n-query", "4", "--test-episodes", "10",
         "--val-every", "3", "--val-episodes", "2", "--checkpoint-every", "2", "--quiet"]


def fewshot(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m fewshot_cli ARGS` and capture its output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fewshot_cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def events(run_dir: Path, name: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [e for e in lines if name is None or e["event"] == name]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def one_torch_thread():
    """One intra-op thread, as the CLI tests run: tiny tensors only lose time to thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
