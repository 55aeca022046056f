"""The memory planner: fake-tensor prediction against the real run, --preset auto, refusal and --force."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import SMALL, fewshot

from fewshot_cli.commands.mahalanobis import COMMAND
from fewshot_cli.plan import fit_to_budget, plan_run, startup_baseline, trace
from fewshot_cli.runner.config import resolve

CPU = torch.device("cpu")


def _config(**knobs):
    return resolve(COMMAND.config, COMMAND.presets, "cpu", {"image_size": 32, "n_query": 6, **knobs})


def test_the_fake_prediction_matches_the_real_tracker_within_10_percent() -> None:
    config = _config().config
    predicted = trace(COMMAND, config, fake=True)
    measured = trace(COMMAND, config, fake=False)
    for phase in ("train", "test"):
        p, m = sum(predicted[phase].values()), sum(measured[phase].values())
        assert abs(p - m) <= 0.10 * m, (phase, p, m)


def test_nothing_is_allocated_while_planning() -> None:
    import psutil

    rss = psutil.Process().memory_info().rss
    report = plan_run(COMMAND, _config(image_size=84, backbone="resnet12", n_query=15), CPU, None)
    assert report["peak_bytes"] > 500 * 1024**2  # a ResNet-12 episode at 84 px
    assert psutil.Process().memory_info().rss - rss < report["peak_bytes"] / 4


def test_auto_never_exceeds_the_budget_and_takes_more_of_a_larger_one() -> None:
    chosen = {}
    # a CPU budget holds the process's resident set too: here the test process's, whatever earlier tests left in
    # it, so each budget is that plus the room for the run (the planner keeps 10% of the whole budget back)
    for room_gib in (0.6, 3):
        budget = int((startup_baseline(CPU) + room_gib * 1024**3) / 0.9)
        resolved = _config(image_size=None, n_query=None)
        resolved.preset = "auto"
        fit_to_budget(COMMAND, resolved, CPU, budget, {})
        report = plan_run(COMMAND, resolved, CPU, budget)
        assert report["fits"] and report["peak_bytes"] <= 0.9 * budget
        assert resolved.sources["n_query"] == "planner"
        chosen[room_gib] = (resolved.config.n_query, resolved.config.image_size)
    assert chosen[3] > chosen[0.6]


def test_a_run_over_budget_is_refused_and_force_runs_it(tmp_path: Path) -> None:
    refused = fewshot("mahalanobis-train", *SMALL, "--memory-budget", "3MiB", "--out", tmp_path, "--name", "r")
    assert refused.returncode == 2 and "does not fit" in refused.stderr and "peak" in refused.stderr
    assert not (tmp_path / "r").exists()
    forced = fewshot("mahalanobis-train", *SMALL, "--memory-budget", "3MiB", "--force", "--out", tmp_path,
                     "--name", "f")
    assert forced.returncode == 0, forced.stderr
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["plan"]["fits"] is False


def test_preset_auto_records_what_the_planner_chose(tmp_path: Path) -> None:
    result = fewshot("mahalanobis-train", *[a for a in SMALL if a not in ("--preset", "cpu")], "--preset", "auto",
                     "--memory-budget", "2GiB", "--out", tmp_path, "--name", "a")
    assert result.returncode == 0, result.stderr
    knobs = json.loads((tmp_path / "a" / "config.json").read_text())["knobs"]
    assert knobs["image_size"]["source"] == "cli"  # SMALL sets it: the planner leaves it alone
    assert knobs["n_query"]["source"] == "cli"
