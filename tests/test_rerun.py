"""A run's command line typed again: `--resume` accepts what it repeats and names what differs; `--config` re-runs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import SMALL, events, fewshot
from test_cli_runs import _start, _wait_for_step
from typer.testing import CliRunner

from fewshot_cli.cli import app

# the line a user typed, as SMALL with a seed, a float knob, a choice and a budget the resume must compare
LINE = ["mahalanobis-train", *SMALL, "--seed", "3", "--lr", "0.002", "--head", "cosine", "--memory-budget", "1GiB"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed run of LINE (read-only for the tests: each copies it)."""
    out = tmp_path_factory.mktemp("finished")
    result = fewshot(*LINE, "--out", out, "--name", "a")
    assert result.returncode == 0, result.stderr
    return out / "a"


@pytest.fixture
def unfinished(finished: Path, tmp_path: Path) -> Path:
    """The finished run as if killed after its last checkpoint, before `metrics.json`: a resume just tests it."""
    run = tmp_path / "runs" / "a"
    shutil.copytree(finished, run)
    (run / "metrics.json").unlink()
    return run


def in_process(*args: object) -> subprocess.CompletedProcess:
    """The same Typer app as `fewshot`, called in this process: a refusal takes milliseconds, not an import."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def _refused(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr


def test_resume_with_the_original_line_ends_with_the_uninterrupted_metrics(finished: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    line = [*LINE, "--episodes", "40", "--out", tmp_path, "--name", "cut"]
    proc = _start(line)
    _wait_for_step(cut, 5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    whole = fewshot(*line[:-1], "whole", "--json")
    assert whole.returncode == 0, whole.stderr
    resumed = fewshot(*line, "--resume", cut, "--json", "--debug")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == json.loads(whole.stdout)
    assert 0 < events(cut, "run_start")[-1]["resumed_from_step"] < 40


def test_resume_accepts_the_same_values_however_they_are_spelled(unfinished: Path) -> None:
    respelled = ["mahalanobis-train", "--preset", "cpu", "--image-size", "16", "--episodes", "6", "--n-query", "4",
                 "--test-episodes", "10", "--val-every", "3", "--val-episodes", "2", "--checkpoint-every", "2",
                 "--seed", "3", "--lr", "2e-3", "--beta", "1", "--head", "cosine", "--no-flatten",
                 "--memory-budget", "1024MiB", "--device", "cpu", "--force", "--quiet", "--json",
                 "--out", unfinished.parent / ".." / "runs", "--name", "a"]
    result = fewshot(*respelled, "--resume", unfinished)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in json.loads(result.stdout)
    assert (unfinished / "metrics.json").is_file()


@pytest.mark.parametrize(("args", "needles"), [
    (["--episodes", "7"], ["--episodes 6", "not --episodes 7"]),
    (["--lr", "0.001"], ["--lr 0.002", "not --lr 0.001"]),
    (["--head", "euclidean"], ["--head cosine", "not --head euclidean"]),
    (["--flatten"], ["--no-flatten", "not --flatten"]),
    (["--weights", "w.pt"], ["no --weights", "not --weights w.pt"]),
    (["--seed", "0"], ["--seed 3", "not --seed 0"]),
    (["--preset", "t4"], ["--preset cpu", "not --preset t4"]),
    (["--memory-budget", "2GiB"], ["--memory-budget 1GiB", "not --memory-budget 2GiB"]),
    (["--data", "."], ["built-in synthetic data", "--data ."]),
    (["--name", "b"], ["--name b", "not at the run being resumed"]),
    (["--config", "x"], ["--config starts a new run"]),
])
def test_resume_refuses_a_different_value_naming_the_knob_and_both_values(unfinished: Path, args: list[str],
                                                                           needles: list[str]) -> None:
    _refused(in_process("mahalanobis-train", "--resume", unfinished, *args), *needles)
    assert not (unfinished / "metrics.json").exists()
    assert len(events(unfinished, "run_start")) == 1


def test_resume_on_another_device_type_warns(unfinished: Path) -> None:
    record = json.loads((unfinished / "config.json").read_text())
    record["device"] = "cuda:0"  # as if started on a GPU; continued here on the CPU
    (unfinished / "config.json").write_text(json.dumps(record))
    result = fewshot("mahalanobis-train", "--resume", unfinished, "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "started on cuda and continues on cpu" in result.stderr


def test_config_repeats_a_run_exactly(finished: Path, tmp_path: Path) -> None:
    result = fewshot("mahalanobis-train", "--config", finished, "--out", tmp_path, "--name", "again", "--quiet")
    assert result.returncode == 0, result.stderr
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    first = json.loads((finished / "config.json").read_text())
    assert again["from_config"] == str(finished / "config.json")
    assert (again["seed"], again["preset"], again["memory_budget_bytes"]) == (3, "cpu", 2**30)
    assert {k: v["value"] for k, v in again["knobs"].items()} == {k: v["value"] for k, v in first["knobs"].items()}
    assert {v["source"] for v in again["knobs"].values()} == {"config"}
    assert (tmp_path / "again" / "metrics.json").read_text() == (finished / "metrics.json").read_text()


def test_config_with_options_overrides_them(finished: Path, tmp_path: Path) -> None:
    result = fewshot("mahalanobis-train", "--config", finished / "config.json", "--seed", "0", "--episodes", "4",
                     "--out", tmp_path, "--name", "other", "--quiet")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    assert config["seed"] == 0
    assert config["knobs"]["episodes"] == {"value": 4, "source": "cli"}
    assert config["knobs"]["lr"] == {"value": 0.002, "source": "config"}
    assert len(events(tmp_path / "other", "step")) == 4


@pytest.mark.parametrize(("record", "needle"), [
    ('{"command": "detect-train", "knobs": {}}', "that is a detect-train run, not a mahalanobis-train one"),
    ('{"command": "mahalanobis-train", "knobs": ', "not valid JSON"),
    ('["mahalanobis-train"]', "not a run's config.json"),
    ('{"command": "mahalanobis-train", "knobs": {"episodes": {"value": "ten"}}}', "knob episodes is 'ten'"),
    ('{"command": "mahalanobis-train", "knobs": {"shots": {"value": 1}}}', "sets shots, which"),
    ('{"command": "mahalanobis-train", "knobs": {"episodes": {"value": -1}}}', "--episodes must be at least 0"),
])
def test_config_of_another_command_or_malformed_is_refused(tmp_path: Path, record: str, needle: str) -> None:
    (tmp_path / "config.json").write_text(record)
    _refused(in_process("mahalanobis-train", "--config", tmp_path / "config.json", "--out", tmp_path / "runs"),
             needle)
    assert not (tmp_path / "runs").exists()


def test_config_with_another_preset_is_refused(finished: Path, tmp_path: Path) -> None:
    _refused(in_process("mahalanobis-train", "--config", finished, "--preset", "t4", "--out", tmp_path),
             "--preset cpu", "drop --preset t4")
