"""The planner's memory tracker: each storage under its kind, freed ones uncounted, the peak's split, and the same
bytes as torch's own MemTracker on a command's traced steps."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from fewshot_cli.memory import plan
from fewshot_cli.memory.step_tracker import StepTracker
from fewshot_cli.runner.config import resolve

CPU = torch.device("cpu")
F32 = 4


def _kinds(snapshot: dict) -> dict[str, int]:
    return {kind: size for kind, size in snapshot.get(CPU, {}).items() if size}


def test_a_training_step_counts_parameters_activations_temporaries_gradients_and_state() -> None:
    torch.manual_seed(0)
    model = nn.Linear(64, 32)
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(128, 64)
    tracker = StepTracker()
    tracker.track_external(model, optimizer)
    params = (64 * 32 + 32) * F32
    assert _kinds(tracker.get_tracker_snapshot()) == {"PARAM": params, "Total": params}
    with tracker:
        out = model(x)
        assert _kinds(tracker.get_tracker_snapshot())["ACT"] >= 128 * 32 * F32  # the output, at least
        out.square().mean().backward()
        optimizer.step()
        del out
    current = _kinds(tracker.get_tracker_snapshot())
    # the gradients were made in the backward pass (temporaries, as torch's MemTracker counts them when no module
    # hook marks them); Adam's two moments and its step counts are optimizer state
    assert current["OPT"] == 2 * params + 2 * F32
    assert current["TEMP"] == params
    assert current["PARAM"] == params and "ACT" not in current
    peak = _kinds(tracker.get_tracker_snapshot("peak"))
    assert peak["Total"] == sum(size for kind, size in peak.items() if kind != "Total")
    assert peak["Total"] >= current["Total"]


def test_a_freed_tensor_is_uncounted_and_a_known_one_relabelled() -> None:
    tracker = StepTracker()
    with tracker:
        a = torch.ones(1000)
        b = torch.ones(3000)
        assert _kinds(tracker.get_tracker_snapshot()) == {"ACT": 16000, "Total": 16000}
        del b
        assert _kinds(tracker.get_tracker_snapshot()) == {"ACT": 4000, "Total": 4000}
    assert _kinds(tracker.get_tracker_snapshot("peak")) == {"ACT": 16000, "Total": 16000}
    tracker.track_external(a)  # a tensor the caller names is "other", and counted once
    assert _kinds(tracker.get_tracker_snapshot()) == {"OTH": 4000, "Total": 4000}
    del a
    assert tracker.get_tracker_snapshot() == {}
    with pytest.raises(TypeError, match="cannot track a str"):
        tracker.track_external("model")


def test_a_resized_storage_counts_its_new_size_and_the_patch_is_undone() -> None:
    resize = torch.UntypedStorage.resize_
    tracker = StepTracker()
    with tracker:
        a = torch.ones(100)
        a.untyped_storage().resize_(1000)
        assert _kinds(tracker.get_tracker_snapshot())["ACT"] == 1000
    assert torch.UntypedStorage.resize_ is resize
    del a


CONFIGS = [("mahalanobis", {"image_size": 32, "n_query": 4}),
           ("mahalanobis", {"image_size": 32, "n_query": 4, "head": "mahalanobis", "adapt": "support", "amp": True}),
           ("mahalanobis", {"image_size": 32, "n_query": 4, "pretrain_epochs": 1, "checkpoint_activations": True}),
           ("detect", {"finetune_steps": 1}),
           ("embed", {}), ("food101", {"image_size": 32}), ("triplet", {})]


@pytest.mark.parametrize(("name", "knobs"), CONFIGS, ids=[f"{n}-{len(k)}" for n, k in CONFIGS])
def test_the_traced_plan_is_torch_memtrackers_to_the_byte(name: str, knobs: dict, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Every command's fake-tensor trace at the cpu preset: the same bytes per line and phase as torch's
    MemTracker (torch.distributed._tools) with its per-module statistics off, which the planner used before."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")

    class TorchTracker(mem_tracker.MemTracker):
        def _pre_fw_hook(self, module, inputs):  # noqa: ANN001, ANN202 - torch's signatures
            pass

        def _post_fw_hook(self, module, inputs, outputs):  # noqa: ANN001, ANN202
            pass

        def _pre_bw_hook(self, module, args):  # noqa: ANN001, ANN202
            pass

        def _post_bw_hook(self, module, args):  # noqa: ANN001, ANN202
            pass

        def get_tracker_snapshot(self, type="current"):  # noqa: A002, ANN001, ANN202 - its kinds by their names
            return {device: {getattr(kind, "name", kind): size for kind, size in kinds.items()}
                    for device, kinds in super().get_tracker_snapshot(type).items()}

    config = importlib.import_module(f"fewshot_cli.commands.{name}_config")
    cfg = resolve(config.COMMAND.config, config.PRESETS, "cpu", knobs).config
    ours = plan.trace(config.COMMAND, cfg)
    monkeypatch.setattr(plan, "StepTracker", TorchTracker)
    theirs = plan.trace(config.COMMAND, cfg)
    assert all(lines.get("parameters", 0) > 0 and lines.get("activations", 0) > 0 for lines in ours.values()), ours
    assert ours == theirs


#: each command's configurations, with the tensors their trace runs on: meta, or fake where a step cannot run on
#: meta tensors (autocast; embed's torchvision transforms, which test a tensor's CPU type)
META_CONFIGS = [(*config, "fake" if config[1].get("amp") or config[0] == "embed" else "meta") for config in [
    *CONFIGS, ("mahalanobis", {"image_size": 32, "n_query": 4, "backbone": "resnet12", "head": "mahalanobis"}),
    ("mahalanobis", {"image_size": 32, "n_query": 4, "backbone": "resnet18", "adapt": "support"}),
    ("food101", {"image_size": 32, "amp": True})]]


@pytest.mark.parametrize(("name", "knobs", "tensors"), META_CONFIGS,
                         ids=[f"{n}-{len(k)}-{t}" for n, k, t in META_CONFIGS])
def test_a_trace_on_meta_tensors_is_the_trace_on_fake_tensors(name: str, knobs: dict, tensors: str) -> None:
    """The planner traces on meta tensors, and on torch's fake CPU tensors where a step cannot run on them: every
    command's plan is the same bytes per line and phase either way."""
    config = importlib.import_module(f"fewshot_cli.commands.{name}_config")
    cfg = resolve(config.COMMAND.config, config.PRESETS, "cpu", knobs).config
    notes: dict = {}
    planned = plan.trace(config.COMMAND, cfg, notes=notes)
    assert notes["traced_on"] == tensors
    assert planned == plan.trace(config.COMMAND, cfg, tensors="fake")
