"""Runs held to the limit where they run: each test starts the real CLI inside a real memory cgroup (the kernel kills
past its limit, as in a container or a batch job) or under a real RLIMIT_AS, and removes the cgroup afterwards."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SMALL, events

from fewshot_cli.memory.limits import cgroup

GiB, MiB = 1024**3, 1024**2
V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


class MemoryCgroup:
    """A child memory cgroup made for one test: `run` starts the CLI inside it."""

    def __init__(self, path: Path, version: int, limit: int) -> None:
        self.path, self.version, self.limit = path, version, limit
        path.mkdir()
        (path / ("memory.max" if version == 2 else "memory.limit_in_bytes")).write_text(str(limit))
        if version == 1 and (path / "memory.swappiness").exists():
            (path / "memory.swappiness").write_text("0")

    def start(self, *args: object, env: dict[str, str] | None = None) -> subprocess.Popen:
        procs = self.path / "cgroup.procs"

        def enter() -> None:  # in the child, before exec: everything it runs is counted against the limit
            procs.write_text(str(os.getpid()))

        return subprocess.Popen([sys.executable, "-m", "fewshot_cli", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=enter,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def run(self, *args: object, env: dict[str, str] | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
        child = self.start(*args, env=env)
        out, err = child.communicate(timeout=timeout)
        return subprocess.CompletedProcess(child.args, child.returncode, out, err)

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        return next(int(line.split()[1]) for line in (self.path / name).read_text().splitlines()
                    if line.startswith("oom_kill "))

    def remove(self) -> None:
        for _ in range(50):  # the kernel frees a cgroup once its last process has been reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        self.path.rmdir()


def _where() -> tuple[int, Path] | str:
    """Where a child memory cgroup can be made here (v2's memory controller, else v1's), or why not."""
    if (V2 / "cgroup.subtree_control").is_file() and "memory" in (V2 / "cgroup.subtree_control").read_text():
        return 2, V2
    if (V1 / "memory.limit_in_bytes").is_file() and os.access(V1, os.W_OK):
        return 1, V1
    return "no writable memory cgroup (v2 memory controller or v1 hierarchy) on this machine"


_WHERE = _where()
needs_cgroup = pytest.mark.skipif(isinstance(_WHERE, str), reason=str(_WHERE))


@pytest.fixture
def memory_cgroup(request: pytest.FixtureRequest) -> Iterator:
    made: list[MemoryCgroup] = []

    def make(limit: int) -> MemoryCgroup:
        version, root = _WHERE
        name = f"fewshot-{request.node.name[:40]}-{os.getpid()}-{len(made)}"
        made.append(MemoryCgroup(root / name, version, limit))
        return made[-1]

    yield make
    for group in made:
        group.remove()


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


@needs_cgroup
def test_preset_auto_inside_a_container_fits_its_limit_and_completes(memory_cgroup, runs: Path) -> None:
    group = memory_cgroup(int(1.5 * GiB))
    done = group.run("mahalanobis-train", "--preset", "auto", "--episodes", "4", "--val-every", "2", "--val-episodes",
                     "2", "--test-episodes", "5", "--quiet", "--out", runs, "--name", "a")
    assert done.returncode == 0, done.stderr
    config = _config(runs / "a")
    assert config["memory_limit"]["source"] == "cgroup" and config["memory_limit"]["bytes"] == group.limit
    assert "memory.limit_in_bytes" in config["memory_limit"]["text"] or "memory.max" in config["memory_limit"]["text"]
    assert {k for k, v in config["knobs"].items() if v["source"] == "planner"}  # the planner chose for the limit
    assert config["plan"]["fits"] and config["plan"]["budget_bytes"] == group.limit
    assert group.oom_kills() == 0


#: a ResNet-18 run whose plan needs about 1.9 GiB at its peak
OVER = ["mahalanobis-train", "--preset", "cpu", "--backbone", "resnet18", "--image-size", "112", "--n-query", "30",
        "--batch-size", "512", "--episodes", "3", "--test-episodes", "2", "--quiet"]


@needs_cgroup
def test_a_plan_over_the_container_limit_is_exit_2_naming_it_with_nothing_written(memory_cgroup, runs: Path) -> None:
    group = memory_cgroup(int(1.25 * GiB))
    refused = group.run(*OVER, "--out", runs, "--name", "r")
    assert refused.returncode == 2, refused.stderr
    first = refused.stderr.splitlines()[0]
    assert "this container's memory limit (cgroup memory." in first and "is 1.25 GiB" in first, first
    assert "--n-query" in first and "--force" in first and "Traceback" not in refused.stderr
    assert not runs.exists()


@needs_cgroup
def test_a_budget_above_the_container_limit_is_refused(memory_cgroup, runs: Path) -> None:
    group = memory_cgroup(GiB)
    refused = group.run("mahalanobis-train", *SMALL, "--memory-budget", "4GiB", "--out", runs, "--name", "b")
    assert refused.returncode == 2
    assert "--memory-budget 4.00 GiB is above this container's memory limit" in refused.stderr
    assert not runs.exists()


@needs_cgroup
def test_forced_over_the_limit_it_backs_off_in_training_and_evaluation_and_is_never_killed(memory_cgroup,
                                                                                          runs: Path) -> None:
    group = memory_cgroup(int(1.25 * GiB))
    done = group.run(*OVER, "--episodes", "2", "--force", "--out", runs, "--name", "f")
    assert done.returncode == 0, done.stderr
    backoffs = events(runs / "f", "oom_backoff")
    assert {e["phase"] for e in backoffs} == {"train", "test"}, backoffs
    assert all("out of memory (guard)" in e["error"] for e in backoffs)
    assert group.oom_kills() == 0
    assert _config(runs / "f")["plan"]["fits"] is False


@needs_cgroup
def test_a_leak_toward_the_limit_stops_with_a_checkpoint_before_the_kill_and_resume_finishes(memory_cgroup,
                                                                                            runs: Path) -> None:
    group = memory_cgroup(GiB)
    leak_mb, episodes = 40, 30
    args = ["mahalanobis-train", *SMALL, "--episodes", str(episodes), "--checkpoint-every", "100", "--val-every", "0"]
    stopped = group.run(*args, "--out", runs, "--name", "l", env={"FEWSHOT_SIMULATE_LEAK_MB": str(leak_mb)})
    run = runs / "l"
    assert stopped.returncode == 1, stopped.stderr
    assert len(stopped.stderr.strip().splitlines()) == 1 and "memory held between steps" in stopped.stderr
    assert group.oom_kills() == 0
    done = len(events(run, "step"))
    assert episodes * leak_mb * MiB > group.limit  # left to leak, the run would have passed the limit
    assert events(run, "checkpoint")[-1]["step"] == done < episodes
    assert events(run, "run_end")[-1]["status"] == "failed"
    resumed = group.run("mahalanobis-train", "--resume", run, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert len(events(run, "step")) == episodes and (run / "metrics.json").exists()


@needs_cgroup
def test_memreport_names_the_limit_a_killed_run_ran_under_and_the_kernels_kill(memory_cgroup, runs: Path) -> None:
    group = memory_cgroup(GiB)
    # the first step keeps 800 MiB at once: with the process's own memory, more than the limit before the guard has
    # seen any growth to stop on, so the kernel kills inside that step
    child = group.start("mahalanobis-train", *SMALL, "--episodes", "30", "--out", runs, "--name", "k",
                        env={"FEWSHOT_SIMULATE_LEAK_MB": "800"})
    child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL
    assert group.oom_kills() >= 1
    report = subprocess.run([sys.executable, "-m", "fewshot_cli", "memreport", runs / "k", "--json"],
                            capture_output=True, text=True, timeout=120)
    killed = json.loads(report.stdout)["killed"]
    assert killed["limit"].startswith("this container's memory limit") and killed["limit_mb"] == 1024.0
    assert killed["oom_kills"] >= 1 and "OOM killer" in killed["likely_cause"]


def _startup_size() -> int:
    """The address space a Python process holds once torch and the CLI are imported."""
    code = ("import torch, fewshot_cli.cli; print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
            "if l.startswith('VmSize:')))")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="no /proc/self/status to read VmSize")
def test_a_plan_over_the_address_space_limit_is_exit_2_before_anything_is_built(runs: Path) -> None:
    cap = _startup_size() + int(1.2 * GiB)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))

    refused = subprocess.run([sys.executable, "-m", "fewshot_cli", *OVER, "--out", runs, "--name", "v"],
                             capture_output=True, text=True, preexec_fn=limit, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert refused.returncode == 2, refused.stderr
    assert "the address-space limit (RLIMIT_AS, ulimit -v)" in refused.stderr.splitlines()[0]
    assert not runs.exists()


def test_a_cgroup_v2_limit_is_the_tightest_along_the_path_less_reclaimable_cache(tmp_path: Path) -> None:
    """cgroup v2 as a container's /proc and /sys show it, written out: the parent's memory.max binds, memory.high
    is the soft limit, and the usage that counts is memory.current less inactive file pages."""
    proc, mount = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/job/step\n")
    (proc / "mountinfo").write_text(f"30 23 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    own = mount / "job" / "step"
    own.mkdir(parents=True)
    levels = ((mount, "max", "max"), (mount / "job", str(GiB), "max"), (own, "max", str(GiB // 2)))
    for directory, limit, high in levels:
        (directory / "memory.max").write_text(limit + "\n")
        (directory / "memory.high").write_text(high + "\n")
    (own / "memory.current").write_text(str(300 * MiB))
    (own / "memory.stat").write_text(f"anon {200 * MiB}\ninactive_file {80 * MiB}\nactive_file {20 * MiB}\n")
    (mount / "job" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    found = cgroup(proc)
    assert found is not None and found.version == 2
    assert (found.limit, found.limit_dir, found.high) == (GiB, mount / "job", GiB // 2)
    assert found.usage() == 220 * MiB and found.oom_kills() == 1


@needs_cgroup
def test_fewshot_env_and_the_run_directory_name_the_container_limit(memory_cgroup) -> None:
    group = memory_cgroup(int(1.5 * GiB))
    shown = group.run("env", "--json")
    assert shown.returncode == 0, shown.stderr
    limits = json.loads(shown.stdout)["memory_limits"]["cpu"]
    mine = [x for x in limits if x["source"] == "cgroup"]
    assert mine and mine[0]["bytes"] <= group.limit and str(group.path) == mine[0]["where"]
    assert any(x["source"] == "machine" for x in limits)
