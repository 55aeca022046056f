"""Data-parallel runs: `torchrun --nproc-per-node 2 -m fewshot_cli ...` on CPU with gloo, against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import events, fewshot

from fewshot_cli.runner.checkpoint import load_checkpoint

# triplet-train normalises its loss per micro-step (by positives), so one process matches two ranks when it too
# takes two micro-steps per step: a simulated OOM halves the triplet batch and doubles gradient accumulation
TRIPLET = ["triplet-train", "--preset", "cpu", "--image-size", "32", "--episodes", "4", "--val-every", "2",
           "--val-episodes", "1", "--test-episodes", "2", "--quiet", "--json"]
MAHALANOBIS = ["mahalanobis-train", "--preset", "cpu", "--image-size", "16", "--n-query", "4", "--test-episodes", "5",
               "--val-every", "0", "--checkpoint-every", "1000", "--quiet"]


def torchrun_args(*args: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "fewshot_cli", *map(str, args)]


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(torchrun_args(*args, ranks=ranks), capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def triplet_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("runs")
    two = torchrun(*TRIPLET, "--out", runs, "--name", "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = fewshot(*TRIPLET, "--out", runs, "--name", "one", env={"FEWSHOT_SIMULATE_OOM": "triplet_batch_size>4"})
    assert one.returncode == 0, one.stderr
    return {"two": runs / "two", "one": runs / "one", "stdout": two.stdout}


def test_two_ranks_give_the_metrics_and_losses_of_one_process(triplet_runs: dict[str, Path]) -> None:
    two, one = triplet_runs["two"], triplet_runs["one"]
    assert [e["to"] for e in events(one, "oom_backoff")] == [4]  # one process: two micro-steps, as two ranks take
    # two partial sums added in either order are the same float: exact, not merely close
    assert [s["loss"] for s in events(two, "step")] == [s["loss"] for s in events(one, "step")]
    assert json.loads((two / "metrics.json").read_text()) == json.loads((one / "metrics.json").read_text())


def test_only_rank_0_writes_one_log_with_every_ranks_memory(triplet_runs: dict[str, Path]) -> None:
    two = triplet_runs["two"]
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl", "metrics.json"]
    assert [e["event"] for e in events(two)].count("run_start") == 1
    steps = events(two, "step")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(len(s["mem_ranks"]) == 2 and s["mem"] == s["mem_ranks"][0] for s in steps)
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert triplet_runs["stdout"].count("\"test_episodes\"") == 1  # rank 0 alone prints the metrics


def _step_reached(run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "log.jsonl").exists() and any(e["step"] >= step for e in events(run, "step")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {run} after {timeout} s")


def _rank(process: psutil.Process) -> int | None:
    try:
        rank = process.environ().get("RANK")
    except psutil.Error:
        return None
    return int(rank) if rank is not None and "fewshot_cli" in " ".join(process.cmdline()) else None


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-rank run whose rank 1 alone received SIGTERM after step 2."""
    runs = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(torchrun_args(*MAHALANOBIS, "--episodes", "40", "--out", runs, "--name", "r"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _step_reached(runs / "r", 2)
        workers = {_rank(p): p for p in psutil.Process(launcher.pid).children(recursive=True)}
        workers[1].send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    return {"run": runs / "r", "stderr": stderr, "returncode": launcher.returncode}


def test_sigterm_on_one_rank_stops_every_rank_after_a_checkpoint(interrupted: dict) -> None:
    run = interrupted["run"]
    assert [e["status"] for e in events(run, "run_end")] == ["interrupted"]
    assert events(run)[-1]["event"] == "run_end"
    last = events(run, "step")[-1]["step"]
    assert 2 <= last < 40
    assert load_checkpoint(run / "checkpoint.pt")["step"] == last
    assert not (run / "metrics.json").exists()
    # both workers left with the contract's 130; torchrun then reports the worker failure
    assert interrupted["stderr"].count("interrupted: checkpoint written") == 2, interrupted["stderr"][-3000:]
    assert interrupted["returncode"] != 0


def test_a_two_rank_run_resumes_in_one_process(interrupted: dict) -> None:
    run = interrupted["run"]
    stopped_at = load_checkpoint(run / "checkpoint.pt")["step"]
    result = fewshot("mahalanobis-train", "--resume", run, "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    steps = [s["step"] for s in events(run, "step")]
    assert steps == list(range(1, 41))  # each step once: the stop came after a whole step
    resumed = [s for s in events(run, "step") if s["step"] > stopped_at]
    assert all("mem_ranks" not in s for s in resumed)
    assert json.loads(result.stdout) == json.loads((run / "metrics.json").read_text())


def test_bad_input_stops_every_rank_with_exit_2_before_training(tmp_path: Path) -> None:
    result = torchrun(*MAHALANOBIS, "--episodes", "4", "--data", tmp_path / "missing", "--out", tmp_path / "runs")
    assert result.returncode != 0
    assert result.stderr.count("error: --data") == 2
    assert "exitcode  : 2" in result.stderr or "exitcode: 2" in result.stderr.replace(" ", "")
    assert not (tmp_path / "runs").exists()


def test_gradients_are_summed_across_ranks_by_the_gloo_backend(tmp_path: Path) -> None:
    """Two real processes: each adds its own gradient; both end with the sum, and untouched parameters keep none."""
    torch.multiprocessing.spawn(_sum_gradients, args=(str(tmp_path / "store"),), nprocs=2, join=True)


def _sum_gradients(rank: int, store: str) -> None:
    import torch.distributed as dist

    from fewshot_cli.runner.distributed import Distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        group = Distributed(rank=rank, world_size=2, local_rank=rank)
        group.broadcast_model(model)
        if rank == 0:  # rank 1 ran no micro-step through the first layer's bias
            model[0].bias.grad = torch.ones(2)
        model[0].weight.grad = torch.full((2, 2), float(rank + 1))
        group.sync_gradients(model)
        assert torch.equal(model[0].weight.grad, torch.full((2, 2), 3.0))
        assert torch.equal(model[0].bias.grad, torch.ones(2))
        assert model[1].weight.grad is None
    finally:
        dist.destroy_process_group()


def test_classify_food101_splits_batches_and_test_images_across_ranks(tmp_path: Path) -> None:
    result = torchrun("classify-food101", "--preset", "cpu", "--epochs", "1", "--synthetic-classes", "4",
                      "--image-size", "16", "--batch-size", "8", "--dev-samples", "6", "--quiet", "--json",
                      "--out", tmp_path, "--name", "f")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "f"
    metrics = json.loads((run / "metrics.json").read_text())
    test_images = events(run, "dataset")[0]["test_images"]
    # hit counts summed over the ranks' disjoint shares, divided by the whole test split
    for name in ("top1", "top5"):
        assert metrics[name] * test_images == pytest.approx(round(metrics[name] * test_images), abs=1e-9)
    assert (run / "model.pt").is_file() and len(events(run, "run_start")) == 1
    assert all(len(s["mem_ranks"]) == 2 for s in events(run, "step"))
