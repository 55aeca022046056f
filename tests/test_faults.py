"""Fault injection as an object: read once at launch into the run's context, never from the environment in a step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import ToyTask

from fewshot_cli.memory.measure import is_oom
from fewshot_cli.runner.faults import Faults
from fewshot_cli.runner.task import RunContext


def test_no_variable_asks_for_no_faults() -> None:
    assert Faults.requested({}, SimpleNamespace()) is None
    assert Faults.requested({"FEWSHOT_SIMULATE_LEAK_MB": "0", "FEWSHOT_SIMULATE_SLOW_READ_S": ""},
                            SimpleNamespace()) is None


def test_an_oom_rule_names_its_phase_knob_and_bound_and_raises_what_the_allocator_raises() -> None:
    knobs = SimpleNamespace(batch_size=16, n_query=4)
    faults = Faults.requested({"FEWSHOT_SIMULATE_OOM": "test:batch_size>8"}, knobs)
    assert (faults.oom_phase, faults.oom_knob, faults.oom_above) == ("test", "batch_size", 8)
    faults.oom("train")  # another phase: nothing
    with pytest.raises(torch.OutOfMemoryError) as raised:
        faults.oom("test")
    assert is_oom(raised.value)  # the back-off path a real failure takes
    knobs.batch_size = 8  # backed off to the bound: it passes
    faults.oom("test")


def test_an_oom_rule_for_another_rank_is_not_this_ranks() -> None:
    environ = {"FEWSHOT_SIMULATE_OOM": "n_query>1", "FEWSHOT_SIMULATE_OOM_RANK": "1"}
    assert Faults.requested(environ, SimpleNamespace(n_query=4), rank=0) is None
    assert Faults.requested(environ, SimpleNamespace(n_query=4), rank=1).oom_knob == "n_query"


def test_a_leak_is_kept_by_the_faults_object_not_by_a_module() -> None:
    faults = Faults.requested({"FEWSHOT_SIMULATE_LEAK_MB": "1"}, SimpleNamespace())
    faults.leak("cpu")
    faults.leak("cpu")
    assert sum(t.nbytes for t in faults.kept) == 2 * 1024 * 1024
    assert Faults(leak_mb=1).kept == []


def test_a_step_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's faults are fixed at launch: a variable set while it runs changes nothing."""
    monkeypatch.setenv("FEWSHOT_SIMULATE_OOM", "n>0")
    task = ToyTask(cfg=SimpleNamespace(n=4), ctx=RunContext(device=torch.device("cpu"), seed=0, run_dir=None))
    task.model = torch.nn.Linear(3, 1)
    with task.accumulate(1, parts=1) as grads:
        for _ in grads.parts():
            for x in grads.micro_steps([torch.ones(2, 3)]):
                grads.backward(task.model(x).sum())
    faulty = ToyTask(cfg=task.cfg, ctx=RunContext(device=torch.device("cpu"), seed=0, run_dir=None,
                                                  faults=Faults(task.cfg, oom_knob="n", oom_above=0)))
    faulty.model = task.model
    with pytest.raises(torch.OutOfMemoryError), faulty.accumulate(1, parts=1) as grads:
        for _ in grads.parts():
            for _ in grads.micro_steps([torch.ones(2, 3)]):
                pass


def test_a_loaders_worker_gets_the_read_delay_without_the_runs_tensors() -> None:
    import pickle

    faults = Faults(SimpleNamespace(n=1), leak_mb=1, slow_read_s=0.5)
    faults.leak("cpu")
    copy = pickle.loads(pickle.dumps(faults))
    assert copy.slow_read_s == 0.5 and copy.kept == [] and copy.knobs is None
