"""A step's accumulation loop in one process: seeding per part, BatchNorm statistics, figures, errors in the body."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyTask

from fewshot_cli.runner.task import RunContext, step_seed


def _toy() -> ToyTask:
    torch.manual_seed(0)
    task = ToyTask(cfg=None, ctx=RunContext(device=torch.device("cpu"), seed=3, run_dir=None))
    task.model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    return task


def _part_mean(task: ToyTask, j: int) -> torch.Tensor:
    """BatchNorm's running mean after part j alone (its two halves), seeded as the step seeds it, from the step's
    statistics."""
    before = task.model[1].running_mean.clone()
    torch.manual_seed(step_seed(3, 2) + j)
    for half in torch.randn(6, 3).split(3):
        task.model(half)
    after = task.model[1].running_mean.clone()
    task.model[1].running_mean.copy_(before)
    return after


def test_each_part_starts_from_the_steps_statistics_and_the_step_ends_with_their_mean() -> None:
    task = _toy()
    expected = (_part_mean(task, 0).double() + _part_mean(task, 1).double()) / 2
    with task.accumulate(2, parts=2) as grads:
        for _ in grads.parts():
            x = torch.randn(6, 3)  # drawn from the part's own seed
            for half in grads.micro_steps(list(x.split(3))):
                grads.backward(task.model(half).pow(2).mean(), rows=len(half), micro_steps=1)
    assert grads.sums == {"rows": 12.0, "micro_steps": 4.0}
    torch.testing.assert_close(task.model[1].running_mean, expected.float(), rtol=0, atol=1e-7)
    assert all(p.grad is not None for p in task.model.parameters())


def test_an_out_of_memory_error_in_the_loop_body_reaches_the_caller_with_the_statistics_restored() -> None:
    task = _toy()
    start = task.model[1].running_mean.clone()
    with pytest.raises(torch.OutOfMemoryError), task.accumulate(1, parts=2) as grads:
        for j in grads.parts():
            task.model(torch.randn(6, 3))  # moves the running statistics
            if j == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (in the body)")
    assert torch.equal(task.model[1].running_mean, start)
