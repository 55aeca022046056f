"""Shared helpers: run the real CLI in a subprocess, and small configs that finish in seconds."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewshot_cli.runner.loop import _evaluate as evaluate
from fewshot_cli.runner.task import RunContext, Task

# every test traces its plans: a test that changes what a trace sees (a patched step) must not read another's, and
# no test writes to the user's cache; tests/test_plan_cache.py turns the cache on in folders of its own
os.environ["FEWSHOT_PLAN_CACHE"] = "off"

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


def read_csv(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows, each a dict by the header's names."""
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def embed_run(run_dir: Path, data: Path | None = None, **knobs) -> tuple:
    """An embed-classify task on 16 px images of two categories, evaluated and finished in `run_dir`: (task,
    metrics). `knobs` set the config's fields (the episode's shape, the batch)."""
    from fewshot_cli.commands.embed import EmbedConfig, EmbedTask

    cfg = EmbedConfig(image_size=16, categories=2, n_way=2)
    for name, value in knobs.items():
        setattr(cfg, name, value)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = EmbedTask(cfg, RunContext(device=torch.device("cpu"), seed=0, run_dir=run_dir, data=data))
    return task, task.finish(evaluate(task, "test", 0))  # as a run evaluates: eval mode, under inference_mode


class ToyTask(Task):
    """A Task with no steps of its own, for tests that drive the runner's helpers on a model they set."""

    def total_steps(self) -> int:
        return 1

    def train_step(self, step: int) -> dict[str, float]:
        return {}

    def evaluate(self, phase: str, step: int) -> dict[str, float]:
        return {}
