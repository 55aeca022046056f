"""Every run checks its plan: `plan_check` events, `plan_error` in tables, earlier errors in `fewshot plan`, the
CPU budget as the whole process's, and gpu_check.py on a machine without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from conftest import SMALL, events, fewshot

from fewshot_cli.commands.mahalanobis import COMMAND
from fewshot_cli.memory.check import PlanCheck, predicted_mb
from fewshot_cli.memory.plan import plan_run
from fewshot_cli.runner.config import resolve

ROOT = Path(__file__).resolve().parents[1]
PLAN_KNOBS = [a for a in SMALL if a != "--quiet"]


def test_every_phase_of_a_run_logs_its_plan_check(runs: Path) -> None:
    result = fewshot("mahalanobis-train", *SMALL, "--out", runs, "--name", "a")
    assert result.returncode == 0, result.stderr
    checks = events(runs / "a", "plan_check")
    assert {c["phase"] for c in checks} == {"train", "val", "test"}
    planned = json.loads((runs / "a" / "config.json").read_text())["plan"]["predicted_mb"]
    for check in checks:
        assert check["measured_mb"] > 0
        assert check["predicted_mb"] == round(planned.get(check["phase"], planned["test"]), 1)
        # the error is the unrounded figures': within what rounding each to 0.1 MiB allows
        p, m = check["predicted_mb"], check["measured_mb"]
        low, high = (p - 0.05 - (m + 0.05)) / (m + 0.05), (p + 0.05 - (m - 0.05)) / (m - 0.05)
        assert low - 1e-4 <= check["error"] <= high + 1e-4
        assert check["freed_returned"] is True  # with no budget too: the default run is the planned run
    # the train check comes after training, before the test's
    order = [e["phase"] for e in events(runs / "a") if e["event"] == "plan_check"]
    assert order.index("train") < order.index("test")

    table = fewshot("table", runs / "a", "--metric", "plan_error")
    assert table.returncode == 0, table.stderr
    peak = max(checks, key=lambda c: c["measured_mb"])
    assert "plan_error" in table.stdout and f"{peak['error']:.4f}".rstrip("0")[:5] in table.stdout

    plan = fewshot("plan", "mahalanobis-train", *PLAN_KNOBS, "--out", runs)
    assert plan.returncode == 0, plan.stderr
    assert "earlier run(s) of this configuration" in plan.stdout and str(runs / "a") in plan.stdout
    other = fewshot("plan", "mahalanobis-train", *PLAN_KNOBS, "--n-query", "3", "--out", runs)
    assert other.returncode == 0 and "earlier run" not in other.stdout


def test_a_cpu_plan_states_the_start_up_baseline_and_the_check_leaves_it_out() -> None:
    resolved = resolve(COMMAND.config, COMMAND.presets, "cpu", {"image_size": 16, "n_query": 4})
    rss = psutil.Process().memory_info().rss
    report = plan_run(COMMAND, resolved, torch.device("cpu"), None)
    for phase, entry in report["phases"].items():
        baseline = entry["components"]["startup_baseline"]
        assert abs(baseline - rss) < 0.2 * rss  # this process's resident set, measured
        assert predicted_mb(report)[phase] * 1024**2 == entry["peak_bytes"] - baseline


def test_a_later_phase_on_a_caching_allocator_is_predicted_at_least_the_earlier_plans() -> None:
    check = PlanCheck(torch.device("mps"), {"train": 1000.0, "test": 200.0}, 0.0)
    check.observe("train", {"rss_mb": 1.0, "mps_driver_mb": 1100.0})
    assert check.end("train")["error"] == round((1000 - 1100) / 1100, 4)
    check.observe("val", {"rss_mb": 1.0, "mps_driver_mb": 1100.0})
    assert check.end("val")["predicted_mb"] == 1000.0  # the driver still holds what training took
    cpu = PlanCheck(torch.device("cpu"), {"train": 1000.0, "test": 200.0}, 50.0)
    cpu.observe("train", {"rss_mb": 900.0, "rss_peak_mb": 1050.0})
    cpu.observe("test", {"rss_mb": 300.0, "rss_peak_mb": 250.0})
    assert cpu.end("train")["measured_mb"] == 1000.0 and cpu.end("test")["predicted_mb"] == 200.0
    assert cpu.end("test") is None  # a phase's peak starts over once checked


def test_a_phase_whose_peak_rounds_to_zero_is_still_checked() -> None:
    """A run launched in a process that already held more (the API after another run) may measure a phase a few
    KiB above its baseline: 0.0 MiB as the event rounds it, and still a finite error."""
    check = PlanCheck(torch.device("cpu"), {"train": 20.0, "test": 20.0}, 100.0)
    check.observe("test", {"rss_mb": 100.0, "rss_peak_mb": 100.04})
    fields = check.end("test")
    assert fields["measured_mb"] == 0.0 and fields["error"] == round((20.0 - 0.04) / 0.04, 4)


def test_preset_auto_under_a_cpu_budget_keeps_the_whole_process_under_it(tmp_path: Path) -> None:
    budget = 1.5 * 1024**3
    args = [sys.executable, "-m", "fewshot_cli", "mahalanobis-train", "--device", "cpu", "--preset", "auto",
            "--memory-budget", "1.5GiB", "--episodes", "2", "--val-every", "0", "--test-episodes", "2", "--quiet",
            "--out", str(tmp_path), "--name", "auto"]
    # sampled from outside every millisecond: the run resets its own peak (VmHWM, and so ru_maxrss) at each probe
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    process, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.001)
    _, stderr = child.communicate(timeout=600)
    assert child.returncode == 0, stderr
    knobs = json.loads((tmp_path / "auto" / "config.json").read_text())["knobs"]
    assert knobs["n_query"]["source"] == "planner"
    assert 0.5 * budget < peak < budget, (peak / 1024**3, knobs["n_query"], knobs["image_size"])
    assert all(c["freed_returned"] for c in events(tmp_path / "auto", "plan_check"))


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path: Path) -> None:
    report = tmp_path / "gpu_check.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--markdown", str(report)],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout and not report.exists()
