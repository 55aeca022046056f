"""classify-food101: the Food-101 layout, dev subsets, the exact resume, back-off, weights and MPS settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import evaluate as runner_evaluate
from conftest import events, fewshot
from PIL import Image

from fewshot_cli.commands.food101 import Food101Config, Food101Task, apply_mps_env
from fewshot_cli.data.food101 import StepBatches, eval_transform, stratified_subset
from fewshot_cli.errors import BadInput
from fewshot_cli.memory.plan import fake_tensors
from fewshot_cli.runner.task import RunContext

CLASSES = ("apple_pie", "bibimbap", "churros")
COLOURS = {"apple_pie": (200, 150, 60), "bibimbap": (40, 160, 60), "churros": (60, 60, 200)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_food101(root: Path, train_per_class: int = 6, test_per_class: int = 2) -> Path:
    """A tiny tree in the official layout: food-101/images/CLASS/ID.jpg and meta/{classes.txt,train,test}.json."""
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    rng = np.random.default_rng(0)
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    image_id = 1000
    for name in CLASSES:
        (base / "images" / name).mkdir(parents=True)
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for _ in range(count):
                image_id += 1
                pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 20, (48, 40, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(base / "images" / name / f"{image_id}.jpg")
                meta[split].setdefault(name, []).append(f"{name}/{image_id}")
    (base / "meta" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split in ("train", "test"):
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
    return root


def tiny_config(**overrides) -> Food101Config:
    values = dict(epochs=2, batch_size=4, image_size=32, model="mobilenet_v3_large", synthetic_classes=3)
    return Food101Config(**{**values, **overrides})


def make_task(cfg: Food101Config, data: Path | None = None, run_dir: Path | None = None) -> Food101Task:
    torch.manual_seed(0)  # as the runner seeds before building the task
    return Food101Task(cfg, RunContext(device=torch.device("cpu"), seed=0, run_dir=run_dir, data=data))


def run_steps(task: Food101Task, first: int, last: int) -> None:
    for step in range(first, last + 1):
        torch.manual_seed(step)  # as the runner seeds before each step
        task.train_step(step)


def evaluate(task: Food101Task) -> dict[str, float]:
    return runner_evaluate(task, "test", task.total_steps())


def test_trains_on_a_tree_in_the_food101_layout(tmp_path):
    data = make_food101(tmp_path / "data")
    task = make_task(tiny_config(epochs=1), data=data, run_dir=tmp_path)
    assert task.classes == list(CLASSES)
    assert task.total_steps() == 18 // 4
    losses = [task.train_step(step)["loss"] for step in range(1, task.total_steps() + 1)]
    metrics = evaluate(task)
    assert all(np.isfinite(losses))
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["classes"] == list(CLASSES)
    net = torchvision.models.get_model("mobilenet_v3_large", num_classes=3)
    net.load_state_dict(saved["model"])  # the best model loads into plain torchvision


@pytest.mark.parametrize("breakage, missing", [
    (lambda root: (root / "food-101").rename(root / "elsewhere"), "food-101"),
    (lambda root: (root / "food-101" / "meta" / "test.json").unlink(), "test.json"),
    (lambda root: (root / "food-101" / "meta" / "classes.txt").write_text("apple_pie\n"), "classes.txt"),
    (lambda root: next((root / "food-101" / "images" / "churros").glob("*.jpg")).unlink(), "churros"),
])
def test_a_wrong_layout_is_bad_input_naming_what_is_missing(tmp_path, breakage, missing):
    data = make_food101(tmp_path / "data")
    breakage(data)
    with pytest.raises(BadInput, match=missing):
        make_task(tiny_config(), data=data)


def test_dev_subsets_are_stratified_and_the_same_for_the_same_seed():
    labels = [c for c in range(5) for _ in range(30)]
    first = stratified_subset(labels, 7, seed=3, split="train")
    again = stratified_subset(labels, 7, seed=3, split="train")
    other = stratified_subset(labels, 7, seed=4, split="train")
    assert first == again
    assert first != other
    assert np.bincount([labels[i] for i in first]).tolist() == [7] * 5


def test_dev_samples_take_n_train_and_a_third_as_many_test_images_per_class(tmp_path):
    task = make_task(tiny_config(dev_samples=3), data=make_food101(tmp_path / "data"))
    assert len(task.train_indices) == 3 * len(CLASSES)
    assert len(task.test_indices) == 1 * len(CLASSES)


def test_a_steps_batch_does_not_depend_on_where_the_loader_started():
    from_start = StepBatches(range(50), batch_size=8, seed=1, first_step=1, last_step=20)
    resumed = StepBatches(range(50), batch_size=8, seed=1, first_step=9, last_step=20)
    assert list(from_start)[8:] == list(resumed)
    assert from_start.batch(1) != from_start.batch(7)  # epoch 2 reshuffles


@pytest.mark.parametrize("n_images", [50, 5])  # 5: one short batch, which DistributedSampler's padding must not fill
def test_ranks_share_each_batch_of_one_process_image_for_image(n_images: int):
    one = StepBatches(range(n_images), batch_size=8, seed=3, first_step=1, last_step=14)
    ranks = [StepBatches(range(n_images), batch_size=8, seed=3, first_step=1, last_step=14, rank=r, world_size=4)
             for r in range(4)]
    for step in range(1, 15):
        whole = one.batch(step)
        assert len(whole) == min(8, n_images)
        assert [key for r in range(4) for key in ranks[r].batch(step)] != [] and all(
            ranks[r].batch(step) == whole[r::4] for r in range(4))  # same images, same augmentation seeds
    with pytest.raises(ValueError, match="does not split evenly"):
        StepBatches(range(50), batch_size=6, seed=3, first_step=1, last_step=2, rank=0, world_size=4)


def test_resume_mid_epoch_gives_exactly_the_uninterrupted_weights():
    cfg = tiny_config(epochs=1, synthetic_classes=4)
    straight = make_task(cfg)
    run_steps(straight, 1, 4)
    interrupted = make_task(tiny_config(epochs=1, synthetic_classes=4))
    run_steps(interrupted, 1, 2)
    resumed = make_task(tiny_config(epochs=1, synthetic_classes=4))
    resumed.load_state_dict(interrupted.state_dict())
    run_steps(resumed, 3, 4)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_oom_backoff_splits_the_batch_into_micro_batches_of_the_new_size():
    task = make_task(tiny_config(epochs=1, batch_size=8, synthetic_classes=4))
    seen: list[int] = []
    task.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    task.set_knob("batch_size", 3, 2)
    task.train_step(1)
    assert seen == [3, 3, 2]


def test_weights_file_loads_all_but_the_class_layer(tmp_path):
    pretrained = torchvision.models.get_model("mobilenet_v3_large", num_classes=1000)
    torch.save(pretrained.state_dict(), tmp_path / "imagenet.pt")
    task = make_task(tiny_config(weights=str(tmp_path / "imagenet.pt"), freeze_backbone=True))
    loaded = task.model.net
    assert torch.equal(loaded.features[0][0].weight, pretrained.features[0][0].weight)
    assert loaded.classifier[3].out_features == 3
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in loaded.named_parameters() if name.startswith("classifier.")}
    # the frozen backbone's BatchNorm keeps the loaded statistics from the first step on, not from the first eval
    assert not loaded.features.training and loaded.classifier.training
    before = loaded.features[1].block[0][1].running_mean.clone()
    task.train_step(1)
    assert torch.equal(loaded.features[1].block[0][1].running_mean, before)


def test_weights_of_another_network_are_bad_input(tmp_path):
    torch.save(torchvision.models.get_model("resnet50", num_classes=10).state_dict(), tmp_path / "r50.pt")
    with pytest.raises(BadInput, match="does not fit the mobilenet_v3_large"):
        make_task(tiny_config(weights=str(tmp_path / "r50.pt")))


def test_mps_high_watermark_sets_the_low_ratio_no_higher(monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    set_env = apply_mps_env(tiny_config(mps_high_watermark=0.8))
    assert set_env == {"PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0.8", "PYTORCH_MPS_LOW_WATERMARK_RATIO": "0.8"}


def test_mps_high_watermark_zero_lifts_the_limit_and_leaves_the_low_ratio(monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    assert apply_mps_env(tiny_config(mps_high_watermark=0.0)) == {"PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0.0"}


def test_mps_high_watermark_above_two_is_bad_input(monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    with pytest.raises(BadInput, match="between 0 and 2"):
        apply_mps_env(tiny_config(mps_high_watermark=2.5))


def test_cli_wrong_layout_exits_2_with_one_sentence(tmp_path):
    data = make_food101(tmp_path / "data")
    (data / "food-101" / "meta" / "train.json").unlink()
    done = fewshot("classify-food101", "--preset", "cpu", "--data", data, "--out", tmp_path / "runs", "--quiet")
    assert done.returncode == 2
    assert "train.json is missing" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_run_on_the_food101_tree_writes_top1_top5_and_the_best_model(tmp_path):
    data = make_food101(tmp_path / "data")
    done = fewshot("classify-food101", "--preset", "cpu", "--data", data, "--out", tmp_path / "runs",
                   "--name", "tiny", "--epochs", "2", "--batch-size", "6", "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"top1", "top5"} <= metrics.keys()
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "model.pt").is_file()
    assert [e["step"] for e in events(run_dir, "eval")] == [3, 6]  # an epoch is 18 // 6 steps


def test_the_plan_traces_the_batch_a_split_smaller_than_a_batch_makes():
    from fewshot_cli.commands.food101 import COMMAND
    from fewshot_cli.memory.plan import trace

    def planned(batch_size):  # 6 classes x 2 dev samples: every training batch holds the 12 images there are
        return trace(COMMAND, Food101Config(image_size=32, batch_size=batch_size, dev_samples=2, synthetic_classes=6,
                                            model="mobilenet_v3_large", workers=0))

    assert planned(48) == planned(12) != planned(6)
    assert planned(48)["test"]["kept_train_batch"] == 12 * 3 * 32 * 32 * 4  # the batch kept for a retry


def test_fake_tensors_still_cannot_pass_torchvision_transforms() -> None:
    """classify-food101's plan runs its real step and scoring on batches of zeros (`Food101Task.plan_phases`)
    because torchvision's v2 transforms cannot wrap a fake tensor. When this fails, torch and torchvision can: let
    the plan trace `train_step(1)` and the test loader's first batch."""
    with fake_tensors(), pytest.raises(RuntimeError, match="Tensor subclass Image"):
        eval_transform(16)(Image.new("RGB", (24, 24)))
