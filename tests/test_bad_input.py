"""Bad usage and bad input: exit 2, one sentence, no traceback, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SMALL, fewshot


def _refused(result, runs: Path, needle: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert needle.lower() in result.stderr.lower()
    assert not list(runs.glob("*/metrics.json")) and not list(runs.glob("*/log.jsonl"))


@pytest.mark.parametrize(("args", "needle"), [
    (["--no-such-option"], "no such option"),
    (["--preset", "tpu"], "unknown preset"),
    (["--device", "cuda"], "no cuda device"),
    (["--device", "mps"], "mps"),
    (["--device", "tpu"], "unknown --device"),
    (["--n-way", "0"], "--n-way must be at least 1"),
    (["--head", "knn"], "invalid value"),
    (["--memory-budget", "lots"], "not a size"),
    (["--memory-budget", "1MiB"], "does not fit"),
    (["--n-way", "30"], "30-way episodes need 30"),
    (["--backbone", "conv4", "--flatten"], "--flatten applies"),
])
def test_bad_options_are_refused(args: list[str], needle: str, runs: Path) -> None:
    _refused(fewshot("mahalanobis-train", *SMALL, "--out", runs, *args), runs, needle)


def test_missing_data_is_refused(runs: Path, tmp_path: Path) -> None:
    _refused(fewshot("mahalanobis-train", *SMALL, "--out", runs, "--data", tmp_path / "nope"), runs, "does not exist")


def test_malformed_data_is_refused(runs: Path, tmp_path: Path) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    _refused(fewshot("mahalanobis-train", *SMALL, "--out", runs, "--data", tmp_path / "data"), runs, "missing: test")


def test_missing_weights_file_is_refused(runs: Path, tmp_path: Path) -> None:
    _refused(fewshot("mahalanobis-train", *SMALL, "--out", runs, "--weights", tmp_path / "w.pt"), runs,
             "does not exist")


def test_an_existing_run_directory_is_not_overwritten(runs: Path) -> None:
    (runs / "taken").mkdir(parents=True)
    result = fewshot("mahalanobis-train", *SMALL, "--out", runs, "--name", "taken")
    assert result.returncode == 2 and "already exists" in result.stderr


def test_resume_of_something_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    result = fewshot("mahalanobis-train", "--resume", tmp_path)
    assert result.returncode == 2 and "not a run directory" in result.stderr


def test_debug_shows_the_traceback(runs: Path) -> None:
    result = fewshot("mahalanobis-train", *SMALL, "--out", runs, "--preset", "tpu", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_version_and_help_work() -> None:
    assert fewshot("--version").stdout.startswith("fewshot ")
    assert "mahalanobis-train" in fewshot("--help").stdout
    assert "--reduced-dim" in fewshot("mahalanobis-train", "--help").stdout
