"""The plan cache: a configuration traced once is read back the same, and only by that configuration and code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fewshot

from fewshot_cli.commands.mahalanobis import COMMAND
from fewshot_cli.memory import plan
from fewshot_cli.runner.config import resolve

CPU = torch.device("cpu")


def _resolved(**knobs):
    return resolve(COMMAND.config, COMMAND.presets, "cpu", {"image_size": 32, "n_query": 6, **knobs})


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "plans"
    monkeypatch.setenv(plan.CACHE_ENV, str(folder))
    monkeypatch.setattr(plan, "startup_baseline", lambda device: 123 * 1024**2)  # the one figure measured live
    return folder


def _traces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The commands `plan.trace` traces from now on (it still traces them)."""
    traced, trace = [], plan.trace
    monkeypatch.setattr(plan, "trace", lambda command, *a, **k: traced.append(command.name) or trace(command, *a, **k))
    return traced


def test_a_cached_plan_is_the_traced_plan_and_traces_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plan.CACHE_ENV, "off")
    uncached = plan.plan_run(COMMAND, _resolved(), CPU, None)
    monkeypatch.setenv(plan.CACHE_ENV, str(cache))
    traced = _traces(monkeypatch)
    first = plan.plan_run(COMMAND, _resolved(), CPU, None)
    second = plan.plan_run(COMMAND, _resolved(), CPU, None)
    assert traced == [COMMAND.name] and len(list(cache.glob("*.json"))) == 1
    assert first == second == uncached  # every line, note, peak and verdict
    assert plan.render(second, verbose=True) == plan.render(uncached, verbose=True)
    assert list(second["phases"]) == list(uncached["phases"])  # the phases in their order


def test_every_knob_is_in_the_key_but_the_weights(cache: Path) -> None:
    base = plan.trace_key(COMMAND, _resolved().config)
    assert plan.trace_key(COMMAND, _resolved().config) == base
    assert plan.trace_key(COMMAND, _resolved(n_query=5).config) != base
    assert plan.trace_key(COMMAND, _resolved(lr=0.5).config) != base  # any knob: a trace is keyed on all of them
    assert plan.trace_key(COMMAND, _resolved(weights="some/file.pt").config) == base  # traces leave weights out


def test_a_change_to_the_code_or_torch_is_a_new_key(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _resolved().config
    base = plan.trace_key(COMMAND, config)
    monkeypatch.setattr(plan, "_code_hash", lambda: "another")
    assert plan.trace_key(COMMAND, config) != base
    monkeypatch.undo()
    # a command registered from outside fewshot: its task's and config's own files are in the key
    hashes = {plan._module_hash(name) for name in (COMMAND.task_path.partition(":")[0], type(config).__module__)}
    assert None not in hashes
    monkeypatch.setattr(plan, "_module_hash", lambda name: "another")
    assert plan.trace_key(COMMAND, config) != base
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert plan.trace_key(COMMAND, config) != base


def test_a_damaged_or_foreign_file_is_traced_again_and_replaced(cache: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    expected = plan.plan_run(COMMAND, _resolved(), CPU, None)
    (path,) = cache.glob("*.json")
    kept = json.loads(path.read_text())
    traced = _traces(monkeypatch)
    for damaged in ("{not json", json.dumps({"format": plan.CACHE_FORMAT, "phases": {"train": {"activations": "x"}},
                                             "notes": {}}), json.dumps({"format": -1}), "[]"):
        path.write_text(damaged)
        assert plan.plan_run(COMMAND, _resolved(), CPU, None) == expected
        assert json.loads(path.read_text()) == kept
    assert traced == [COMMAND.name] * 4


def test_off_keeps_nothing_and_an_unwritable_folder_is_passed_by(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    monkeypatch.setenv(plan.CACHE_ENV, "off")
    assert plan.cache_dir() is None
    plan.plan_run(COMMAND, _resolved(), CPU, None)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv(plan.CACHE_ENV, str(blocked / "plans"))  # under a file: cannot be made
    assert plan.plan_run(COMMAND, _resolved(), CPU, None)["fits"]
    assert list(tmp_path.iterdir()) == [blocked]


def test_the_default_folder_is_the_users_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(plan.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert plan.cache_dir() == tmp_path / "fewshot" / "plans"


# what a run has loaded when its first training step starts
FIRST_STEP = """
import json, sys
from fewshot_cli import cli
from fewshot_cli.commands.mahalanobis import MahalanobisTask
step, seen = MahalanobisTask.train_step, {}
def first(self, *args, **kwargs):
    if self.ctx.run_dir is not None:
        seen.setdefault("loaded", sorted(m for m in HEAVY if m in sys.modules))
    return step(self, *args, **kwargs)
MahalanobisTask.train_step = first
HEAVY = ("torch._dynamo", "sympy", "torchvision", "scipy", "sklearn", "matplotlib", "torch.distributed._tools")
sys.argv = ["fewshot", *sys.argv[1:]]
try:
    cli.main()
finally:
    print(json.dumps({**seen, "at_end": sorted(m for m in HEAVY if m in sys.modules)}))
"""


def test_a_run_whose_plan_is_cached_loads_nothing_it_does_not_use_before_its_first_step(tmp_path: Path) -> None:
    """`fewshot plan` keeps the trace; the run of the same configuration reads it and, on the built-in data with
    conv4, loads neither the tracer's libraries (torch._dynamo, sympy) nor torchvision, nor the reports'
    (matplotlib) before its first step, and never scipy or scikit-learn; the reports load matplotlib after the
    test."""
    env = {plan.CACHE_ENV: str(tmp_path / "plans")}
    knobs = ["--preset", "cpu", "--image-size", "16", "--episodes", "2", "--n-query", "2", "--test-episodes", "2",
             "--val-every", "0"]
    planned = fewshot("plan", "mahalanobis-train", *knobs, env=env)
    assert planned.returncode == 0, planned.stderr
    assert len(list((tmp_path / "plans").glob("*.json"))) == 1
    done = subprocess.run([sys.executable, "-c", FIRST_STEP, "mahalanobis-train", *knobs, "--quiet", "--out",
                           str(tmp_path / "runs"), "--name", "run"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["loaded"] == [], seen
    assert seen["at_end"] == ["matplotlib"], seen  # the reports draw with it; their scores need no scikit-learn
    assert (tmp_path / "runs" / "run" / "confusion.png").is_file()


def test_a_run_that_traces_its_plan_loads_no_dynamo_before_its_first_step(tmp_path: Path) -> None:
    """A configuration's first run traces its plan on meta tensors: before its first step it has loaded neither
    torch._dynamo (which torch's fake tensors load) nor torchvision nor matplotlib, and it plans the same bytes as a
    trace on fake tensors (tests/test_step_tracker.py)."""
    knobs = ["--preset", "cpu", "--image-size", "16", "--episodes", "2", "--n-query", "2", "--test-episodes", "2",
             "--val-every", "0"]
    done = subprocess.run([sys.executable, "-c", FIRST_STEP, "mahalanobis-train", *knobs, "--quiet", "--out",
                           str(tmp_path / "runs"), "--name", "run"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", plan.CACHE_ENV: "off"})
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert [m for m in seen["loaded"] if m != "sympy"] == [], seen  # meta kernels' shape checks load sympy
    assert json.loads((tmp_path / "runs" / "run" / "config.json").read_text())["plan"]["fits"] is True
