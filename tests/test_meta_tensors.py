"""Meta tensors for the planner: real inputs replaced, devices made meta, and what would differ from the CPU
refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewshot_cli.memory import plan
from fewshot_cli.memory.meta_tensors import MetaTensors, NotTraceable
from fewshot_cli.memory.step_tracker import StepTracker


def test_ops_on_real_tensors_and_cpu_factories_run_on_meta_tensors() -> None:
    real = torch.arange(12.0).reshape(3, 4)
    with MetaTensors():
        made = torch.zeros(3, 4, device="cpu") + real
        moved = made.to("cpu")
        as_half = made.to(torch.float16)
    assert made.is_meta and moved.is_meta and as_half.is_meta and as_half.dtype == torch.float16
    assert moved.untyped_storage()._cdata == made.untyped_storage()._cdata  # a move that changes nothing: a view
    assert not real.is_meta and real.sum().item() == 66.0  # the real tensor itself is untouched


def test_moving_to_the_device_makes_no_bytes_and_a_new_dtype_does() -> None:
    tracker = StepTracker()
    with MetaTensors():
        images = torch.zeros(8, 3, 16, 16, device="cpu")
        with tracker:
            moved = images.to("cpu", non_blocking=True)
            assert tracker.get_tracker_snapshot() == {}
            halved = moved.to(torch.bfloat16)
            kinds = tracker.get_tracker_snapshot()[torch.device("meta")]
    assert kinds["ACT"] == 8 * 3 * 16 * 16 * 2
    del halved


def test_autocast_and_attention_are_refused() -> None:
    with MetaTensors():
        with torch.autocast("cpu", enabled=False):  # switched off, it changes nothing
            torch.ones(2) * 2
        with pytest.raises(NotTraceable, match="autocast"), torch.autocast("cpu", dtype=torch.bfloat16):
            pass
        q = torch.zeros(1, 2, 8, 4)
        with pytest.raises(NotTraceable, match="attention"):
            F.scaled_dot_product_attention(q, q, q)
    assert torch.autocast.__enter__ is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the patch is gone once the mode ends
        assert torch.is_autocast_enabled("cpu")


def test_reading_a_value_gives_one_on_meta_tensors_only() -> None:
    real = torch.tensor([3.0])
    with plan.meta_tensors():
        meta = torch.tensor([5.0]) * 2
        assert meta.is_meta
        assert meta.item() == 1 and float(meta) == 1.0 and not bool(meta)
        assert real.item() == 3.0
