"""TensorBoard: live curves beside the log, the same curves exported from a finished run, the missing extra."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import SMALL, events, fewshot

pytest.importorskip("tensorboard")


def _scalars(folder, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    done = fewshot("mahalanobis-train", *SMALL, "--out", root / "runs", "--name", "r", "--tensorboard", root / "live")
    assert done.returncode == 0, done.stderr
    return root


def test_a_live_run_writes_the_loss_series_of_its_log(run):
    logged = [(e["step"], e["loss"]) for e in events(run / "runs" / "r", "step")]
    curve = _scalars(run / "live" / "r", "train/loss")
    assert [s for s, _ in curve] == [s for s, _ in logged] == list(range(1, 7))
    assert [v for _, v in curve] == pytest.approx([v for _, v in logged], rel=1e-6)


def test_a_live_run_writes_evaluations_and_memory(run):
    val = [(e["step"], e["accuracy"]) for e in events(run / "runs" / "r", "eval") if e["phase"] == "val"]
    assert _scalars(run / "live" / "r", "val/accuracy") == [(s, pytest.approx(a, rel=1e-6)) for s, a in val]
    assert len(_scalars(run / "live" / "r", "train/mem/rss_mb")) == 6


def test_export_writes_the_same_curves_from_the_log(run):
    done = fewshot("export", run / "runs" / "r", "--tensorboard", run / "exported")
    assert done.returncode == 0, done.stderr
    for tag in ("train/loss", "val/accuracy", "test/accuracy"):
        assert _scalars(run / "exported" / "r", tag) == _scalars(run / "live" / "r", tag)
    again = fewshot("export", run / "runs" / "r", "--tensorboard", run / "exported")
    assert again.returncode == 2 and "already holds TensorBoard events" in again.stderr


def test_export_of_a_folder_that_is_no_run_is_bad_input(tmp_path):
    done = fewshot("export", tmp_path, "--tensorboard", tmp_path / "tb")
    assert done.returncode == 2 and "no log.jsonl" in done.stderr
    assert "Traceback" not in done.stderr


def test_without_tensorboard_the_option_is_exit_2_naming_the_extra_and_writes_nothing(tmp_path):
    hide = ("import sys; sys.modules['tensorboard'] = None; sys.argv = ['fewshot'] + sys.argv[1:]; "
            "from fewshot_cli.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", hide, "mahalanobis-train", *SMALL, "--out", str(tmp_path / "runs"),
                           "--tensorboard", str(tmp_path / "tb")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "fewshot[tensorboard]" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "tb").exists()
