"""Evaluation backs off on OOM with its own knob and the same metrics; below the floor the run fails naming the
phase and knob, and `--resume` finishes it with a smaller knob. Workers' memory is counted; a killed run explained."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest
from conftest import SMALL, events, fewshot

# each command's evaluation knob, and a run of a few seconds that evaluates enough to halve it a few times
EVALUATIONS = {
    "detect-train": ("eval_batch_size", ["--preset", "cpu", "--image-size", "64", "--embedding-dim", "8",
                                         "--head-hidden", "16", "--objectness-hidden", "4", "--proposal-step", "16",
                                         "--proposals-top-k", "8", "--n-way", "2", "--k-shot", "1", "--n-query", "4",
                                         "--episodes", "2", "--test-episodes", "2", "--score-threshold", "0.0"]),
    "triplet-train": ("eval_frames", ["--preset", "cpu", "--image-size", "32", "--clip-frames", "8", "--episodes", "2",
                                      "--val-every", "1", "--val-episodes", "1", "--test-episodes", "1", "--n-way",
                                      "2", "--n-query", "1", "--k-shot", "1", "--num-aug", "0",
                                      "--triplet-batch-size", "2", "--embedding-dim", "16", "--eval-frames", "8"]),
    "classify-food101": ("eval_batch_size", ["--preset", "cpu", "--epochs", "1", "--synthetic-classes", "4",
                                             "--dev-samples", "8", "--batch-size", "8", "--eval-batch-size", "8"]),
    "embed-classify": ("batch_size", ["--preset", "cpu", "--batch-size", "16"]),
}


@pytest.mark.parametrize("command", sorted(EVALUATIONS))
def test_an_evaluation_backs_off_its_own_knob_and_keeps_its_metrics(runs: Path, command: str) -> None:
    knob, args = EVALUATIONS[command]
    plain = fewshot(command, *args, "--quiet", "--out", runs, "--name", "plain")
    assert plain.returncode == 0, plain.stderr
    backed = fewshot(command, *args, "--quiet", "--out", runs, "--name", "backed",
                     env={"FEWSHOT_SIMULATE_OOM": f"test:{knob}>1"})
    assert backed.returncode == 0, backed.stderr
    test = [e for e in events(runs / "backed", "oom_backoff") if e["phase"] == "test"]
    assert test and {e["knob"] for e in test} == {knob} and test[-1]["to"] == 1
    assert all(e["to"] == e["from"] // 2 for e in test)
    # equal up to float rounding: a batch's size may change the last bits of a backbone's output (embed-classify's
    # AUROC moved by 1e-10 between batches of 16 and of 1)
    backed_metrics = json.loads((runs / "backed" / "metrics.json").read_text())
    assert backed_metrics == pytest.approx(json.loads((runs / "plain" / "metrics.json").read_text()), rel=1e-6)


def test_validation_backs_off_and_later_evaluations_start_from_the_smaller_knob(runs: Path) -> None:
    result = fewshot("mahalanobis-train", *SMALL, "--batch-size", "64", "--out", runs, "--name", "v",
                     env={"FEWSHOT_SIMULATE_OOM": "val:batch_size>16"})
    assert result.returncode == 0, result.stderr
    backoffs = events(runs / "v", "oom_backoff")
    assert [(e["phase"], e["from"], e["to"]) for e in backoffs] == [("val", 64, 32), ("val", 32, 16)]
    assert all(e["knob"] == "batch_size" and e["step"] == 3 for e in backoffs)


def test_an_evaluation_oom_at_the_floor_fails_naming_phase_and_knob_and_resume_finishes_it(runs: Path) -> None:
    whole = fewshot("mahalanobis-train", *SMALL, "--out", runs, "--name", "whole")
    assert whole.returncode == 0, whole.stderr
    failed = fewshot("mahalanobis-train", *SMALL, "--out", runs, "--name", "f",
                     env={"FEWSHOT_SIMULATE_OOM": "test:batch_size>0"})
    assert failed.returncode == 1
    assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
    assert "test evaluation" in failed.stderr and "batch_size" in failed.stderr and "--batch-size" in failed.stderr
    run = runs / "f"
    assert events(run, "run_end")[-1]["status"] == "failed" and not (run / "metrics.json").exists()
    assert events(run, "checkpoint")[-1]["step"] == 6
    steps_before = len(events(run, "step"))
    resumed = fewshot("mahalanobis-train", "--resume", run, "--batch-size", "8", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert len(events(run, "step")) == steps_before  # the evaluation alone ran again
    assert events(run, "run_start")[-1]["config"]["batch_size"] == {"value": 8, "source": "cli"}
    assert (run / "metrics.json").read_text() == (runs / "whole" / "metrics.json").read_text()


def test_resume_still_refuses_a_knob_that_changes_the_result(runs: Path) -> None:
    failed = fewshot("mahalanobis-train", *SMALL, "--out", runs, "--name", "f",
                     env={"FEWSHOT_SIMULATE_OOM": "test:batch_size>0"})
    assert failed.returncode == 1
    refused = fewshot("mahalanobis-train", "--resume", runs / "f", "--n-query", "3", "--batch-size", "8")
    assert refused.returncode == 2 and "--n-query" in refused.stderr and "--batch-size" not in refused.stderr


def test_data_loading_workers_memory_is_in_every_step_record(runs: Path) -> None:
    _, args = EVALUATIONS["triplet-train"]
    result = fewshot("triplet-train", *args, "--episodes", "4", "--workers", "1", "--quiet", "--out", runs,
                     "--name", "w")
    assert result.returncode == 0, result.stderr
    for step in events(runs / "w", "step")[:-1]:  # the loader lets its worker go once it gave the last episode
        mem = step["mem"]
        assert mem["workers_pss_mb"] > 0
        assert mem["total_pss_mb"] > mem["workers_pss_mb"]
    report = json.loads(fewshot("memreport", runs / "w", "--json").stdout)
    assert "total_pss_mb" in report["phases"]["train"]["growth_mb"]  # the series leaks are judged on


def test_a_run_without_workers_records_no_workers_memory(runs: Path) -> None:
    _, args = EVALUATIONS["triplet-train"]
    assert fewshot("triplet-train", *args, "--workers", "0", "--quiet", "--out", runs, "--name", "n").returncode == 0
    assert all("workers_pss_mb" not in s["mem"] for s in events(runs / "n", "step"))


def _killed_run(root: Path, machine_mb: float, rss_mb: list[float], age_s: float = 3600, pid: int | None = None
                ) -> Path:
    """A run directory as a process killed after its last step leaves it: no run_end, no metrics.json."""
    run = root / "killed"
    run.mkdir(parents=True)
    config = {"command": "mahalanobis-train", "knobs": {}, "seed": 0, "device": "cpu",
              "machine_memory_bytes": int(machine_mb * 2**20)}
    (run / "config.json").write_text(json.dumps(config))
    now = time.time() - age_s
    lines = [{"event": "run_start", "time": now, "elapsed_s": 0.0, "command": "mahalanobis-train", "config": {},
              "pid": pid, "host": platform.node()}]
    lines += [{"event": "step", "time": now, "elapsed_s": 0.1, "phase": "train", "step": i + 1, "loss": 1.0,
               "mem": {"rss_mb": rss}} for i, rss in enumerate(rss_mb)]
    (run / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_memreport_explains_a_run_killed_near_the_machines_memory(tmp_path: Path) -> None:
    run = _killed_run(tmp_path, machine_mb=1000, rss_mb=[900.0] * 5)
    report = json.loads(fewshot("memreport", run, "--json").stdout)
    killed = report["killed"]
    assert killed["last_step"] == 5 and killed["held_mb"] == 900.0 and killed["machine_memory_mb"] == 1000.0
    assert "OOM killer" in killed["likely_cause"]
    text = fewshot("memreport", run).stdout
    assert "KILLED after step 5" in text and "OOM killer" in text


def test_memreport_says_a_run_killed_far_below_the_machines_memory_was_killed_from_outside(tmp_path: Path) -> None:
    run = _killed_run(tmp_path, machine_mb=100_000, rss_mb=[500.0] * 5)
    killed = json.loads(fewshot("memreport", run, "--json").stdout)["killed"]
    assert "from outside" in killed["likely_cause"] and killed["share"] == 0.005


def test_memreport_does_not_call_a_run_whose_process_is_alive_killed(tmp_path: Path) -> None:
    run = _killed_run(tmp_path, machine_mb=1000, rss_mb=[900.0] * 5, age_s=0, pid=os.getpid())
    assert "killed" not in json.loads(fewshot("memreport", run, "--json").stdout)


def test_memreport_of_a_completed_run_reports_no_kill(runs: Path) -> None:
    assert fewshot("mahalanobis-train", *SMALL, "--out", runs, "--name", "c").returncode == 0
    assert "killed" not in json.loads(fewshot("memreport", runs / "c", "--json").stdout)
