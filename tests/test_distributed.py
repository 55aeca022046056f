"""Data-parallel runs: `torchrun --nproc-per-node 2 -m fewshot_cli ...` on CPU with gloo, against one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torchvision
from conftest import ToyTask, events, fewshot

from fewshot_cli.runner.checkpoint import load_checkpoint

# Each step's episodes are split across ranks by index; a step's gradient is the sum of its episodes', and for two
# ranks with one episode each that sum is the very float one process makes (a + b == b + a): the comparisons below
# with one process are exact. With more episodes per rank the sums group differently: equal to float tolerance.
TRIPLET = ["triplet-train", "--preset", "cpu", "--image-size", "32", "--episodes", "8", "--episodes-per-step", "2",
           "--val-every", "2", "--val-episodes", "1", "--test-episodes", "2", "--quiet", "--json"]
MAHALANOBIS = ["mahalanobis-train", "--preset", "cpu", "--image-size", "16", "--n-query", "4", "--test-episodes", "5",
               "--episodes-per-step", "2", "--val-every", "0", "--checkpoint-every", "1000", "--quiet"]


def torchrun_args(*args: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "fewshot_cli", *map(str, args)]


def torchrun(*args: str, ranks: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(torchrun_args(*args, ranks=ranks), capture_output=True, text=True, env=full_env,
                          timeout=300)


def same_model(a: Path, b: Path) -> bool:
    one, two = (load_checkpoint(run / "checkpoint.pt")["task"]["model"] for run in (a, b))
    return one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.fixture(scope="module")
def triplet_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("runs")
    two = torchrun(*TRIPLET, "--out", runs, "--name", "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = fewshot(*TRIPLET, "--out", runs, "--name", "one")
    assert one.returncode == 0, one.stderr
    return {"two": runs / "two", "one": runs / "one", "stdout": two.stdout}


def test_two_ranks_give_the_metrics_and_losses_of_one_process(triplet_runs: dict[str, Path]) -> None:
    two, one = triplet_runs["two"], triplet_runs["one"]
    assert [s["loss"] for s in events(two, "step")] == [s["loss"] for s in events(one, "step")]
    assert [e["st_iou"] for e in events(two, "eval")] == [e["st_iou"] for e in events(one, "eval")]
    metrics_two, metrics_one = (json.loads((run / "metrics.json").read_text()) for run in (two, one))
    # the frame cache figures are rank 0's own cache, which saw only its episodes
    assert {k: v for k, v in metrics_two.items() if not k.startswith("cache_")} == {
        k: v for k, v in metrics_one.items() if not k.startswith("cache_")}
    assert metrics_two.keys() == metrics_one.keys()
    assert same_model(one, two)


def test_only_rank_0_writes_one_log_with_every_ranks_memory(triplet_runs: dict[str, Path]) -> None:
    two = triplet_runs["two"]
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl", "metrics.json"]
    assert [e["event"] for e in events(two)].count("run_start") == 1
    steps = events(two, "step")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # 8 episodes, 2 per step
    assert all(len(s["mem_ranks"]) == 2 and s["mem"] == s["mem_ranks"][0] for s in steps)
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert triplet_runs["stdout"].count("\"test_episodes\"") == 1  # rank 0 alone prints the metrics


def test_batchnorm_statistics_and_weights_match_one_process(tmp_path: Path) -> None:
    # 5 episodes, 2 per step: in the last step rank 1 has no episode and only meets the gradient all-reduce
    args = [*MAHALANOBIS, "--episodes", "5", "--json", "--out", tmp_path]
    two = torchrun(*args, "--name", "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = fewshot(*args, "--name", "one")
    assert one.returncode == 0, one.stderr
    assert json.loads(two.stdout) == json.loads(one.stdout)
    assert [s["episode_hash"] for s in events(tmp_path / "two", "step")] == [
        s["episode_hash"] for s in events(tmp_path / "one", "step")]
    assert same_model(tmp_path / "one", tmp_path / "two")  # conv4's BatchNorm running statistics included


def test_an_oom_on_one_rank_backs_off_every_rank_as_one_process_does(tmp_path: Path) -> None:
    args = [*MAHALANOBIS, "--episodes", "4", "--json", "--out", tmp_path]
    two = torchrun(*args, "--name", "two", env={"FEWSHOT_SIMULATE_OOM": "n_query>2", "FEWSHOT_SIMULATE_OOM_RANK": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    one = fewshot(*args, "--name", "one", env={"FEWSHOT_SIMULATE_OOM": "n_query>2"})
    assert one.returncode == 0, one.stderr
    for run in ("one", "two"):
        assert [(e["step"], e["to"], e["grad_accumulation"]) for e in events(tmp_path / run, "oom_backoff")] == [
            (1, 2, 2)]
    # two micro-steps per episode now: one process adds four gradients in a row, each rank two before the sum
    assert json.loads(two.stdout) == pytest.approx(json.loads(one.stdout), rel=1e-6)
    assert [s["loss"] for s in events(tmp_path / "two", "step")] == pytest.approx(
        [s["loss"] for s in events(tmp_path / "one", "step")], rel=1e-5)
    torch.testing.assert_close(*(load_checkpoint(tmp_path / run / "checkpoint.pt")["task"]["model"]
                                 for run in ("two", "one")), rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_torchrun_nodes_give_the_metrics_and_losses_of_one_process(tmp_path: Path) -> None:
    """Two torchrun nodes on this host, one rank each, meeting at a c10d rendezvous: the same run as two ranks on
    one machine, each adding one episode's gradient per step, so one process's run bit for bit."""
    args = [*MAHALANOBIS, "--episodes", "4", "--out", tmp_path]
    nodes = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{_free_port()}", "--rdzv-id", "two-nodes"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *nodes, "-m", "fewshot_cli",
                                   *map(str, args), "--name", "two"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
    try:
        outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    one = fewshot(*args, "--name", "one")
    assert one.returncode == 0, one.stderr
    two, one = tmp_path / "two", tmp_path / "one"
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert json.loads((two / "metrics.json").read_text()) == json.loads((one / "metrics.json").read_text())
    assert [s["loss"] for s in events(two, "step")] == [s["loss"] for s in events(one, "step")]
    assert all(len(s["mem_ranks"]) == 2 for s in events(two, "step"))
    assert same_model(one, two)


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
    assert 2 <= last < 20
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
    assert steps == list(range(1, 21))  # each step once: the stop came after a whole step
    resumed = [s for s in events(run, "step") if s["step"] > stopped_at]
    assert all("mem_ranks" not in s for s in resumed)
    assert json.loads(result.stdout) == json.loads((run / "metrics.json").read_text())
    # two ranks then one process: the run one process makes alone
    straight = fewshot(*MAHALANOBIS, "--episodes", "40", "--json", "--out", run.parent, "--name", "straight")
    assert straight.returncode == 0, straight.stderr
    assert json.loads(result.stdout) == json.loads(straight.stdout)
    assert [s["loss"] for s in events(run, "step")] == [s["loss"] for s in events(run.parent / "straight", "step")]


def test_a_one_process_run_resumes_under_two_ranks(tmp_path: Path) -> None:
    args = [*MAHALANOBIS, "--episodes", "40", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.Popen([sys.executable, "-m", "fewshot_cli", *map(str, args), "--out", tmp_path, "--name", "r"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _step_reached(tmp_path / "r", 2)
        single.send_signal(signal.SIGTERM)
        single.communicate(timeout=60)
    finally:
        if single.poll() is None:
            single.kill()
    assert single.returncode == 130
    stopped_at = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"]
    resumed = torchrun("mahalanobis-train", "--resume", tmp_path / "r", "--quiet", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = fewshot(*args, "--out", tmp_path, "--name", "straight")
    assert json.loads(resumed.stdout) == json.loads(straight.stdout)
    steps = events(tmp_path / "r", "step")
    assert [s["step"] for s in steps] == list(range(1, 21))
    assert [s["loss"] for s in steps] == [s["loss"] for s in events(tmp_path / "straight", "step")]
    assert all(("mem_ranks" in s) == (s["step"] > stopped_at) for s in steps)


@pytest.mark.parametrize(("extra", "message"), [
    (["--data", "missing"], "error: --data"),
    (["--episodes-per-step", "1"], "use --episodes-per-step 2"),  # rank 1 would never train
])
def test_bad_input_stops_every_rank_with_exit_2_before_training(tmp_path: Path, extra: list[str],
                                                                message: str) -> None:
    result = torchrun(*MAHALANOBIS, "--episodes", "4", *extra, "--out", tmp_path / "runs")
    assert result.returncode != 0
    assert result.stderr.count(message) == 2, result.stderr[-2000:]
    assert "exitcode  : 2" in result.stderr or "exitcode: 2" in result.stderr.replace(" ", "")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("parts", [3, 1])
def test_accumulate_under_distributed_data_parallel_gives_one_process_gradients(tmp_path: Path, parts: int) -> None:
    """Two real processes with gloo: a loop over `Task.accumulate` splits a step's parts across them; DDP
    sums the gradients, BatchNorm running statistics are merged, and both equal one process's (exactly with one
    part; with three, rank 0 adds two parts first)."""
    torch.multiprocessing.spawn(_accumulate, args=(str(tmp_path), parts, 2), nprocs=2, join=True)
    expected = _accumulate(0, str(tmp_path), parts, 1)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["figures"] == pytest.approx(expected["figures"], rel=1e-12)
        for name in ("grads", "buffers"):
            assert got[name].keys() == expected[name].keys()
            for key, value in expected[name].items():
                if parts == 1:
                    assert torch.equal(got[name][key], value), (name, key)
                else:
                    torch.testing.assert_close(got[name][key], value, rtol=1e-5, atol=1e-7)
        assert got["unused_grad"] is None  # a parameter no part uses keeps no gradient, as in one process


class _ToyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(4, 1))
        self.unused = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _ToyWithUnused(ToyTask):
    find_unused_parameters = True  # the model's `unused` layer, which its forward never calls


def _accumulate(rank: int, folder: str, parts: int, world_size: int) -> dict:
    import torch.distributed as dist

    from fewshot_cli.runner.distributed import Distributed
    from fewshot_cli.runner.task import RunContext

    group = None
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
        group = Distributed(rank=rank, world_size=world_size, local_rank=rank)
    try:
        torch.manual_seed(0)
        task = _ToyWithUnused(cfg=None, ctx=RunContext(device=torch.device("cpu"), seed=0, run_dir=None,
                                                       distributed=group))
        task.model = _ToyModel()
        task.wrap_data_parallel()
        data = torch.randn(parts, 2, 5, 3, generator=torch.Generator().manual_seed(1))  # 2 micro-steps per part

        with task.accumulate(1, parts) as grads:
            for j in grads.parts():
                for x in grads.micro_steps(list(data[j])):
                    loss = task.ddp_or_model(x).pow(2).mean() / (2 * parts)
                    grads.backward(loss, loss=float(loss.detach()), rows=len(x))
        figures = grads.sums
        result = {"figures": figures, "unused_grad": task.model.unused.weight.grad,
                  "grads": {k: p.grad for k, p in task.model.named_parameters() if p.grad is not None},
                  "buffers": {k: b.clone() for k, b in task.model.named_buffers()}}
        if world_size > 1:
            torch.save(result, Path(folder) / f"rank{rank}.pt")
        return result
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def test_classify_food101_shares_each_batch_and_the_test_images_across_ranks(tmp_path: Path) -> None:
    """DistributedSampler's shares of one process's batches: with the backbone frozen (BatchNorm as loaded; on CPU
    BatchNorm cannot be synchronised) two ranks train as one process does, to float tolerance (each rank sums its
    half of the batch's gradient first); hit counts over the ranks' disjoint test shares add up exactly."""
    torch.save(torchvision.models.resnet50(num_classes=1000).state_dict(), tmp_path / "r50.pt")
    args = ["classify-food101", "--preset", "cpu", "--epochs", "1", "--synthetic-classes", "4", "--image-size", "16",
            "--batch-size", "8", "--dev-samples", "6", "--model", "resnet50", "--weights", tmp_path / "r50.pt",
            "--freeze-backbone", "--workers", "0", "--quiet", "--json", "--out", tmp_path]
    two = torchrun(*args, "--name", "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = fewshot(*args, "--name", "one")
    assert one.returncode == 0, one.stderr
    run = tmp_path / "two"
    steps_two, steps_one = events(run, "step"), events(tmp_path / "one", "step")
    assert len(steps_two) == len(steps_one) == events(run, "dataset")[0]["steps_per_epoch"] == 3
    assert [s["train_top1"] for s in steps_two] == [s["train_top1"] for s in steps_one]
    assert [s["loss"] for s in steps_two] == pytest.approx([s["loss"] for s in steps_one], rel=1e-5)
    metrics = json.loads(two.stdout)
    assert metrics == pytest.approx(json.loads(one.stdout), rel=1e-6)
    test_images = events(run, "dataset")[0]["test_images"]
    for name in ("top1", "top5"):  # hits summed over the ranks' shares, divided by the whole test split
        assert metrics[name] * test_images == pytest.approx(round(metrics[name] * test_images), abs=1e-9)
    assert (run / "model.pt").is_file() and len(events(run, "run_start")) == 1
    assert all(len(s["mem_ranks"]) == 2 for s in steps_two)


def test_embed_classify_is_refused_under_torchrun_with_exit_2(tmp_path: Path) -> None:
    result = torchrun("embed-classify", "--preset", "cpu", "--out", tmp_path / "runs")
    assert result.stderr.count("embed-classify runs in one process") == 2, result.stderr[-2000:]
    assert "exitcode  : 2" in result.stderr or "exitcode: 2" in result.stderr.replace(" ", "")
    assert not (tmp_path / "runs").exists()


def test_a_batch_that_does_not_split_over_the_ranks_is_bad_input(tmp_path: Path) -> None:
    result = torchrun("classify-food101", "--preset", "cpu", "--batch-size", "7", "--out", tmp_path / "runs")
    assert result.returncode != 0 and result.stderr.count("make it a multiple of 2") == 2
    assert not (tmp_path / "runs").exists()
