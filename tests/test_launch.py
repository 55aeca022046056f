"""The one launcher: `launch()` runs a command as `fewshot` does, and an evaluation-only run has no training loop."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from conftest import events, fewshot

from fewshot_cli.commands.embed_config import COMMAND as EMBED
from fewshot_cli.runner.launch import LaunchOptions, launch

SMALL_EMBED = {"image_size": 16, "batch_size": 4, "categories": 2, "n_way": 2, "k_shot": 2, "n_query": 2}


def _flags(knobs: dict) -> list[str]:
    return [a for name, value in knobs.items() for a in (f"--{name.replace('_', '-')}", str(value))]


def _config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def test_launch_runs_a_command_as_fewshot_does(runs: Path, one_torch_thread) -> None:
    cli = fewshot("embed-classify", *_flags(SMALL_EMBED), "--preset", "cpu", "--out", runs, "--name", "cli",
                  "--quiet", "--json")
    assert cli.returncode == 0, cli.stderr
    metrics = launch(EMBED, dict(SMALL_EMBED), LaunchOptions(preset="cpu", out=runs, name="api", quiet=True))
    assert metrics == json.loads(cli.stdout) == json.loads((runs / "api" / "metrics.json").read_text())
    by_cli, by_api = _config(runs / "cli"), _config(runs / "api")
    for key in ("command", "preset", "knobs", "seed", "device", "data", "memory_budget_bytes"):
        assert by_api[key] == by_cli[key], key
    assert by_api["plan"] is not None and by_api["plan"].keys() == by_cli["plan"].keys()  # checked as the CLI does


def test_an_evaluation_only_run_evaluates_once_and_resume_finishes_it(runs: Path) -> None:
    args = ["embed-classify", *_flags(SMALL_EMBED), "--preset", "cpu", "--out", runs, "--quiet"]
    failed = fewshot(*args, "--name", "stopped", env={"FEWSHOT_SIMULATE_OOM": "test:batch_size>0"})
    assert failed.returncode == 1 and "out of memory in the test evaluation" in failed.stderr
    assert not (runs / "stopped" / "metrics.json").exists()
    resumed = fewshot("embed-classify", "--resume", runs / "stopped", "--quiet", "--json")
    assert resumed.returncode == 0, resumed.stderr
    fresh = fewshot(*args, "--name", "fresh", "--json")
    assert json.loads(resumed.stdout) == json.loads(fresh.stdout)
    kinds = [e["event"] for e in events(runs / "fresh")]
    assert "step" not in kinds and "checkpoint" not in kinds and not (runs / "fresh" / "checkpoint.pt").exists()
    assert [(e["phase"], e["step"]) for e in events(runs / "fresh", "eval")] == [("test", 0)]
    assert [e["status"] for e in events(runs / "stopped", "run_end")] == ["failed", "completed"]


def test_launch_options_are_the_clis_shared_options() -> None:
    from fewshot_cli.cli import SHARED

    shared = {name: default for name, _, default, *_ in SHARED if name not in ("json_out", "debug")}
    fields = {f.name: f.default for f in dataclasses.fields(LaunchOptions) if f.name != "given"}
    assert shared == fields


def test_an_evaluation_only_run_recorded_with_training_knobs_still_resumes(runs: Path) -> None:
    """Runs of embed-classify made while it still offered --val-every and the like (which did nothing for it)."""
    args = ["embed-classify", *_flags(SMALL_EMBED), "--preset", "cpu", "--out", runs, "--quiet"]
    failed = fewshot(*args, "--name", "old", env={"FEWSHOT_SIMULATE_OOM": "test:batch_size>0"})
    assert failed.returncode == 1
    config = _config(runs / "old")
    config["knobs"] |= {"val_every": {"value": 0, "source": "default"}, "val_episodes": {"value": 10, "source":
                        "default"}, "checkpoint_every": {"value": 50, "source": "default"}}
    (runs / "old" / "config.json").write_text(json.dumps(config))
    resumed = fewshot("embed-classify", "--resume", runs / "old", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert (runs / "old" / "metrics.json").exists()
