"""The runner through the real CLI: files, events, determinism, interrupt and resume, OOM back-off, leaks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import SMALL, events, fewshot

from fewshot_cli.runner.checkpoint import load_checkpoint


def test_a_run_writes_config_log_metrics_and_checkpoint(runs: Path) -> None:
    result = fewshot("mahalanobis-train", *SMALL, "--out", runs, "--name", "r", "--json")
    assert result.returncode == 0, result.stderr
    run = runs / "r"
    metrics = json.loads(result.stdout)
    assert metrics == json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"accuracy", "accuracy_ci95", "test_episodes"}
    config = json.loads((run / "config.json").read_text())
    assert config["knobs"]["episodes"] == {"value": 6, "source": "cli"}
    assert config["knobs"]["backbone"] == {"value": "conv4", "source": "preset"}
    assert config["knobs"]["beta"]["source"] == "default"
    assert set(config["versions"]) == {"python", "torch", "torchvision", "fewshot"}
    kinds = [e["event"] for e in events(run)]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    steps = events(run, "step")
    assert [s["step"] for s in steps] == list(range(1, 7))
    assert all({"loss", "mem", "time", "elapsed_s", "episode_hash"} <= set(s) for s in steps)
    assert all("rss_mb" in s["mem"] for s in steps)
    assert [e["phase"] for e in events(run, "eval")] == ["val", "test"]
    assert (run / "checkpoint.pt").is_file()


def test_the_same_seed_gives_the_same_losses_and_metrics(runs: Path) -> None:
    for name in ("a", "b"):
        assert fewshot("mahalanobis-train", *SMALL, "--out", runs, "--name", name, "--seed", "3").returncode == 0
    losses = [[s["loss"] for s in events(runs / n, "step")] for n in ("a", "b")]
    assert losses[0] == losses[1]
    assert (runs / "a" / "metrics.json").read_text() == (runs / "b" / "metrics.json").read_text()


def test_another_seed_gives_other_episodes(runs: Path) -> None:
    for name, seed in (("a", "0"), ("b", "1")):
        assert fewshot("mahalanobis-train", *SMALL, "--out", runs, "--name", name, "--seed", seed).returncode == 0
    hashes = [[s["episode_hash"] for s in events(runs / n, "step")] for n in ("a", "b")]
    assert hashes[0] != hashes[1]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fewshot_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_step(run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = run / "log.jsonl"
        if log.exists() and any(f'"step": {step},' in line and '"event": "step"' in line
                                for line in log.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged")


def test_sigterm_checkpoints_and_resume_ends_with_the_uninterrupted_metrics(runs: Path) -> None:
    args = ["mahalanobis-train", *SMALL, "--episodes", "40", "--out", runs]
    assert fewshot(*args, "--name", "whole").returncode == 0
    proc = _start([*args, "--name", "cut"])
    _wait_for_step(runs / "cut", 5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    cut = runs / "cut"
    assert not (cut / "metrics.json").exists()
    assert events(cut, "run_end")[-1]["status"] == "interrupted"
    stopped_at = events(cut, "checkpoint")[-1]["step"]
    assert stopped_at < 40
    resumed = fewshot("mahalanobis-train", "--resume", cut, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert (cut / "metrics.json").read_text() == (runs / "whole" / "metrics.json").read_text()
    steps = [s["step"] for s in events(cut, "step")]
    assert steps[-1] == 40 and sorted(set(steps)) == list(range(1, 41))


def test_kill_9_keeps_every_step_logged_before_it(runs: Path) -> None:
    args = ["mahalanobis-train", *SMALL, "--episodes", "40", "--out", runs]
    assert fewshot(*args, "--name", "whole").returncode == 0
    proc = _start([*args, "--name", "k"])
    checkpoint = runs / "k" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    # the checkpoint is written after its step's event: stopped now, the log must already hold that step on disk,
    # whatever the process still has in memory; the kill then loses nothing that was logged
    proc.send_signal(signal.SIGSTOP)
    try:
        assert checkpoint.exists(), "no checkpoint before the run ended"
        saved_at = load_checkpoint(checkpoint)["step"]
    finally:
        proc.kill()
        proc.wait()
    text = (runs / "k" / "log.jsonl").read_text()
    assert text.endswith("\n"), "the last logged event is cut: not flushed when written"
    logged = [json.loads(line) for line in text.splitlines()]
    assert logged[0]["event"] == "run_start"
    steps = [(s["step"], s["loss"], s["episode_hash"]) for s in logged if s["event"] == "step"]
    assert len(steps) >= saved_at >= 2
    whole = [(s["step"], s["loss"], s["episode_hash"]) for s in events(runs / "whole", "step")]
    assert steps == whole[:len(steps)]


def test_a_simulated_oom_backs_off_with_gradient_accumulation_and_finishes(runs: Path) -> None:
    result = fewshot("mahalanobis-train", *SMALL, "--n-query", "8", "--out", runs, "--name", "o",
                     env={"FEWSHOT_SIMULATE_OOM": "n_query>2"})
    assert result.returncode == 0, result.stderr
    backoffs = events(runs / "o", "oom_backoff")
    assert [(b["from"], b["to"], b["grad_accumulation"]) for b in backoffs] == [(8, 4, 2), (4, 2, 4)]
    assert all(b["knob"] == "n_query" and b["step"] == 1 for b in backoffs)
    assert len(events(runs / "o", "step")) == 6


def test_oom_below_the_floor_fails_with_exit_1_and_names_the_knob(runs: Path) -> None:
    result = fewshot("mahalanobis-train", *SMALL, "--out", runs, "--name", "f",
                     env={"FEWSHOT_SIMULATE_OOM": "n_query>0"})
    assert result.returncode == 1
    assert "n_query" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert events(runs / "f", "run_end")[-1]["status"] == "failed"
    assert not (runs / "f" / "metrics.json").exists()


def test_a_deliberate_leak_is_flagged_during_the_run_and_by_memreport(runs: Path) -> None:
    result = fewshot("mahalanobis-train", *SMALL, "--episodes", "45", "--val-every", "0", "--out", runs, "--name", "l",
                     env={"FEWSHOT_SIMULATE_LEAK_MB": "8"})
    assert result.returncode == 0, result.stderr
    warnings = events(runs / "l", "leak_warning")
    assert warnings and warnings[0]["series"] == "rss_mb" and warnings[0]["growth_mb"] >= 32
    report = fewshot("memreport", runs / "l", "--json")
    assert json.loads(report.stdout)["leak"] is True


def test_a_clean_run_is_not_flagged(runs: Path) -> None:
    result = fewshot("mahalanobis-train", *SMALL, "--episodes", "45", "--val-every", "0", "--out", runs, "--name", "c")
    assert result.returncode == 0, result.stderr
    assert events(runs / "c", "leak_warning") == []
    assert json.loads(fewshot("memreport", runs / "c", "--json").stdout)["leak"] is False


def test_no_progress_bar_when_not_a_terminal(runs: Path) -> None:
    args = [a for a in SMALL if a != "--quiet"]
    result = fewshot("mahalanobis-train", *args, "--out", runs, "--name", "p")
    assert result.returncode == 0
    assert result.stderr == ""
