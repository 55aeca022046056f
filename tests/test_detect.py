"""Specifications of `detect-train`: proposals, box validation, the detector's heads, COCO data and scoring."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import evaluate
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fewshot_cli.commands import detect
from fewshot_cli.commands.detect import PRESETS, DetectConfig, DetectTask
from fewshot_cli.data.coco import DetectionItem
from fewshot_cli.data.loader import PREFETCH_FACTOR
from fewshot_cli.data.synthetic import SyntheticScenes
from fewshot_cli.errors import BadInput
from fewshot_cli.memory.torch_private import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from fewshot_cli.models import detection
from fewshot_cli.models.detection import (
    FewShotDetector,
    build_feature_backbone,
    dense_proposals,
    load_backbone_weights,
    validate_box_array,
    validate_boxes,
)
from fewshot_cli.runner.faults import Faults
from fewshot_cli.runner.task import RunContext

TINY = {"image_size": 64, "backbone": "small", "embedding_dim": 8, "head_hidden": 16, "objectness_hidden": 4,
        "proposal_step": 16, "proposals_top_k": 8, "n_way": 2, "k_shot": 1, "n_query": 2, "episodes": 2,
        "test_episodes": 2, "val_episodes": 1, "lr": 1e-3}


def tiny_task(tmp_path: Path | None = None, data: Path | None = None, events: list | None = None,
              **overrides: object) -> DetectTask:
    cfg = DetectConfig(**{**TINY, **overrides})
    emit = (lambda event, **fields: events.append((event, fields))) if events is not None else (lambda e, **f: None)
    ctx = RunContext(device=torch.device("cpu"), seed=0, run_dir=tmp_path, data=data, emit=emit)
    return DetectTask(cfg, ctx)


def write_coco(root: Path, bad_box: bool = False) -> Path:
    """A tiny COCO dataset drawn from the synthetic scenes: 6 classes, 40 train and 30 test images."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    categories = [{"id": c + 1, "name": f"thing{c}"} for c in range(6)]
    for split, count, seed in (("train", 40, 1), ("test", 30, 2)):
        scenes = SyntheticScenes(image_size=64, n_classes=6, n_scenes=count, seed=seed)
        images, annotations = [], []
        for i in range(count):
            scene = scenes[i]
            name = f"{split}-{i}.png"
            Image.fromarray((scene.image * 255).astype(np.uint8)).save(root / "images" / name)
            images.append({"id": i + 1, "file_name": name, "width": 64, "height": 64})
            for box, label in zip(scene.boxes.tolist(), scene.labels.tolist(), strict=True):
                x0, y0, x1, y1 = box
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                    "iscrowd": 0})
        if bad_box:
            annotations.append({"id": len(annotations) + 1, "image_id": 1, "category_id": 1,
                                "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0})
        (root / "annotations" / f"{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


# ---------------------------------------------------------------- proposals and boxes


def test_proposals_cover_the_whole_image_at_the_configured_stride() -> None:
    size, step = 100, 24
    boxes = dense_proposals(size, step, (12.0, 30.0))
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    xs = torch.unique(torch.round(centres[:, 0]))
    assert len(boxes) == 2 * math.ceil(size / step) ** 2
    points = torch.stack(torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij"), -1)
    points = points.reshape(-1, 2)
    inside = ((points[:, None, 0] >= boxes[None, :, 0]) & (points[:, None, 0] <= boxes[None, :, 2])
              & (points[:, None, 1] >= boxes[None, :, 1]) & (points[:, None, 1] <= boxes[None, :, 3]))
    assert inside.any(dim=1).all()  # every pixel lies in some proposal
    assert (boxes >= 0).all() and (boxes <= size).all()
    assert xs[0] == step / 2 and float(xs[-1]) >= size - step / 2


def test_proposal_ratios_shape_boxes_of_the_same_area_around_the_same_centres() -> None:
    square = dense_proposals(64, 32, (20.0,))
    shaped = dense_proposals(64, 32, (20.0,), ratios=(0.5, 1.0))
    sides = shaped[:, 2:] - shaped[:, :2]
    assert len(shaped) == 2 * len(square)
    assert torch.allclose(sides[:, 0] * sides[:, 1], torch.full((len(shaped),), 400.0))
    assert torch.allclose(sides[:len(square), 0] / sides[:len(square), 1], torch.tensor(0.5))
    assert torch.allclose(shaped[len(square):], square)


@pytest.mark.parametrize("on", ["device", "host"])
def test_box_validation_drops_non_finite_and_degenerate_boxes_and_clamps_the_rest(on: str) -> None:
    boxes = torch.tensor([
        [10.0, 10.0, 20.0, 20.0],  # good
        [float("nan"), 0.0, 5.0, 5.0],  # non-finite
        [0.0, 0.0, float("inf"), 5.0],  # non-finite
        [5.0, 5.0, 5.0, 9.0],  # zero width
        [9.0, 9.0, 4.0, 4.0],  # inverted
        [70.0, 70.0, 90.0, 90.0],  # wholly outside the 64x64 image
        [-5.0, 50.0, 10.0, 80.0],  # partly outside: clamped, kept
    ])
    validate = validate_boxes if on == "device" else validate_box_array
    kept, keep, counts = validate(boxes if on == "device" else boxes.numpy(), 64, 64)
    assert keep.tolist() == [True, False, False, False, False, False, True]
    assert kept[1].tolist() == [0.0, 50.0, 10.0, 64.0]
    assert (counts.non_finite, counts.degenerate, counts.clamped) == (2, 3, 1)


def test_box_deltas_round_trip() -> None:
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 8.0, 30.0, 20.0]])
    truth = torch.tensor([[1.0, 2.0, 12.0, 9.0], [4.0, 4.0, 40.0, 24.0]])
    decoded = detection.decode_boxes(detection.encode_boxes(truth, proposals), proposals)
    assert torch.allclose(decoded, truth, atol=1e-4)


# ---------------------------------------------------------------- the detector


@pytest.mark.parametrize("n_way", [1, 2, 5, 9])
def test_objectness_input_has_the_embedding_size_for_every_n_way(n_way: int) -> None:
    backbone, stride = build_feature_backbone("small", 16)
    model = FewShotDetector(backbone, stride, 16, 32, 8)
    seen = []
    model.objectness[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    prototypes = torch.nn.functional.normalize(torch.randn(n_way, 16), dim=1)
    logits, objectness, deltas = model.score(torch.randn(7, 16), prototypes)
    assert seen == [torch.Size([7, 16])]
    assert logits.shape == (7, n_way) and objectness.shape == (7,) and deltas.shape == (7, 4)


def test_class_scores_softmax_shares_the_objectness_and_both_weighs_it_by_the_sigmoid() -> None:
    torch.manual_seed(0)
    backbone, stride = build_feature_backbone("small", 8)
    model = FewShotDetector(backbone, stride, 8, 16, 4).eval()
    prototypes = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    proposals = dense_proposals(64, 16, (16.0, 32.0))
    images = torch.rand(2, 3, 64, 64)
    boxes, sigmoid = model.candidates(images, prototypes, prototypes, proposals, 8)
    same_boxes, softmax = model.candidates(images, prototypes, prototypes, proposals, 8, "softmax")
    assert torch.equal(boxes, same_boxes)
    # the same class ranks first either way; with softmax the scores of a box add up to its objectness (at most 1)
    objectness = softmax.sum(dim=2)
    assert torch.all(objectness <= 1) and not torch.allclose(sigmoid.sum(dim=2), objectness)
    assert torch.equal(sigmoid.argmax(dim=2), softmax.argmax(dim=2))
    # both: the softmax's share of the objectness times the sigmoid of the class's own logit
    _, both = model.candidates(images, prototypes, prototypes, proposals, 8, "both")
    assert torch.allclose(both, softmax * sigmoid / objectness[..., None])
    assert torch.all(both < softmax) and torch.equal(both.argmax(dim=2), softmax.argmax(dim=2))


def test_support_encoder_is_frozen() -> None:
    backbone, stride = build_feature_backbone("small", 8)
    model = FewShotDetector(backbone, stride, 8, 16, 4)
    prototypes, pooled = model.prototypes(torch.rand(3, 3, 32, 32), torch.tensor([[4.0, 4.0, 20.0, 20.0]] * 3),
                                          torch.tensor([0, 1, 1]), 2)
    assert not prototypes.requires_grad and not pooled.requires_grad
    assert prototypes.shape == (2, 8) and torch.allclose(prototypes.norm(dim=1), torch.ones(2))


def test_nms_and_focal_loss_are_torchvisions(monkeypatch: pytest.MonkeyPatch) -> None:
    assert detection.batched_nms is torchvision.ops.batched_nms
    assert detection.sigmoid_focal_loss is torchvision.ops.sigmoid_focal_loss
    calls = {"nms": 0, "focal": 0}

    def nms(*args: object, **kwargs: object) -> torch.Tensor:
        calls["nms"] += 1
        return torchvision.ops.batched_nms(*args, **kwargs)

    def focal(*args: object, **kwargs: object) -> torch.Tensor:
        calls["focal"] += 1
        return torchvision.ops.sigmoid_focal_loss(*args, **kwargs)

    monkeypatch.setattr(detection, "batched_nms", nms)
    monkeypatch.setattr(detection, "sigmoid_focal_loss", focal)
    task = tiny_task(score_threshold=0.0)
    task.train_step(1)
    assert calls["focal"] > 0
    evaluate(task, "val", 1)
    assert calls["nms"] > 0


def test_soft_nms_between_classes_lowers_a_boxs_other_classes_and_leaves_the_rest() -> None:
    # what class-aware NMS can leave: class 0's best box and a neighbour of it, classes 1 and 2 over the same object
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 8], [20, 20, 30, 30], [0, 0, 10, 9], [5, 0, 15, 10]])
    scores = torch.tensor([0.9, 0.8, 0.6, 0.85, 0.7])
    classes = torch.tensor([0, 1, 1, 2, 0])
    decayed = detection.decay_across_classes(boxes, scores, classes, sigma=0.5)

    def decay(iou: float) -> float:
        return math.exp(-iou**2 / 0.5)

    # taken by score: box 0 decays boxes 1 and 3, box 4 decays them a little, box 2 is far from all, then box 1
    # (now above box 3) decays box 3 once more; boxes of the taker's own class are never touched
    assert decayed.tolist() == pytest.approx([0.9, 0.8 * decay(0.8) * decay(40 / 140), 0.6,
                                              0.85 * decay(0.9) * decay(45 / 145) * decay(80 / 90), 0.7])
    assert torch.equal(detection.decay_across_classes(boxes[:1], scores[:1], classes[:1], 0.5), scores[:1])


def test_detections_with_soft_nms_keep_their_boxes_and_best_classes_and_lower_the_others() -> None:
    task = tiny_task(score_threshold=0.0)
    task.train_step(1)
    episode = task.samplers["test"].episode(0)
    read = detect._by_item(episode, next(task.loaders["test"].fixed("check", [detect._episode_items(episode)])))
    support = task._support(read, episode)
    prototypes, pooled = task.model.prototypes(support.images, torch.stack(support.boxes), torch.cat(support.labels),
                                               task.cfg.n_way)
    images = task._queries(read, task.test_data, task._query_chunks(episode)[0], episode.classes).images
    found = [task.model.detect(images, prototypes, pooled, task.proposals, 8, 0.0, 0.5, 100, "both", sigma)[0]
             for sigma in (0.0, 0.5)]
    for (boxes, scores, classes), (soft_boxes, soft_scores, soft_classes) in zip(*found, strict=True):
        plain = {(tuple(b.tolist()), int(c)): float(s) for b, s, c in zip(boxes, scores, classes, strict=True)}
        soft = {(tuple(b.tolist()), int(c)): float(s) for b, s, c in zip(soft_boxes, soft_scores, soft_classes,
                                                                          strict=True)}
        assert soft.keys() == plain.keys() and all(soft[k] <= plain[k] for k in plain)
        assert soft_scores.tolist() == sorted(soft_scores.tolist(), reverse=True)
        assert max(soft.values()) == max(plain.values())
    assert any(s < p for f, g in zip(*found, strict=True) for s, p in zip(sorted(g[1].tolist()),
                                                                        sorted(f[1].tolist()), strict=True))


def test_the_plan_holds_the_soft_nms_pairs() -> None:
    plain, soft = (tiny_task(soft_nms_sigma=sigma).plan_extra_bytes()["test"]["nms_inputs"] for sigma in (0.0, 0.5))
    detections = TINY["proposals_top_k"] * TINY["n_way"]  # an image's candidates, one per class
    assert soft - plain == detections**2 * (4 + 8 + 1 + 8)  # IoU, its float64 copy, the class test, the decay


def test_hard_negative_mining_keeps_the_fixed_ratio() -> None:
    task = tiny_task(negative_ratio=2.0)
    figures = task.train_step(1)
    assert figures["positives"] > 0
    assert figures["hard_negatives"] == 2.0 * figures["positives"]


def test_back_off_splits_the_same_queries_into_micro_steps() -> None:
    task = tiny_task(n_query=4)
    episode = task.samplers["train"].episode(0)
    before = task._query_chunks(episode)
    task.set_knob("n_query", 1, 4)
    after = task._query_chunks(episode)
    assert len(before) == 1 and len(after) == 4
    assert sorted(q for chunk in after for q in chunk) == sorted(before[0])
    assert math.isfinite(task.train_step(1)["loss"])


# ---------------------------------------------------------------- data and scoring


def test_built_in_scenes_train_on_base_classes_and_test_on_novel_ones() -> None:
    task = tiny_task()
    assert set(task.base).isdisjoint(task.novel)
    for index in range(5):
        assert set(task.samplers["train"].episode(index).classes) <= set(task.base)
        assert set(task.samplers["test"].episode(index).classes) <= set(task.novel)


def test_a_tiny_coco_dataset_trains_and_is_scored_by_pycocotools_from_the_written_files(tmp_path: Path) -> None:
    data = write_coco(tmp_path / "data")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    task = tiny_task(run_dir, data=data, novel_classes="thing4,thing5", score_threshold=0.0)
    for step in (1, 2):
        assert math.isfinite(task.train_step(step)["loss"])
    metrics = task.finish(evaluate(task, "test", 2))
    gt = COCO(str(run_dir / "gt.json"))
    assert {c["name"] for c in gt.dataset["categories"]} == {"thing4", "thing5"}
    assert len(gt.getAnnIds()) > 0
    evaluator = COCOeval(gt, gt.loadRes(str(run_dir / "detections.json")), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert metrics["map"] == max(0.0, float(evaluator.stats[0]))
    assert metrics["map50"] == max(0.0, float(evaluator.stats[1]))
    assert metrics["test_episodes"] == 2.0


def test_coco_images_travel_as_uint8_and_reach_the_step_as_the_readers_floats(tmp_path: Path) -> None:
    from fewshot_cli.commands.detect import _episode_items
    from fewshot_cli.data.images import read_image

    task = tiny_task(tmp_path, write_coco(tmp_path / "coco"), novel_classes="thing4,thing5")
    assert task.train_data.item(0).image.dtype == torch.uint8  # what the loader caches and carries
    task.prefetch(1)
    images, samples = task.feed.get((1, 0))
    items = _episode_items(task._train_episodes(1)[0])
    files = [Path(task.train_data.dataset.root) / task.train_data.file_name(i) for i in items]
    assert images.dtype == torch.float32 and torch.equal(images, torch.stack([read_image(f, 64) for f in files]))
    task.feed.close()


def test_coco_data_without_novel_classes_is_bad_input(tmp_path: Path) -> None:
    data = write_coco(tmp_path / "data")
    with pytest.raises(BadInput, match="--novel-classes"):
        tiny_task(data=data)
    with pytest.raises(BadInput, match="not a category"):
        tiny_task(data=data, novel_classes="thing4,unicorn")


def test_missing_coco_annotations_are_bad_input(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(BadInput, match="train.json"):
        tiny_task(data=tmp_path, novel_classes="x")


def test_dropped_coco_boxes_are_counted_in_the_log(tmp_path: Path) -> None:
    data = write_coco(tmp_path / "data", bad_box=True)
    events: list = []
    tiny_task(data=data, novel_classes="5,6", events=events)
    dropped = [fields for event, fields in events if event == "boxes_dropped"]
    assert dropped and dropped[0]["degenerate"] == 2  # one bad box in each split


# ---------------------------------------------------------------- weights and presets


def _load(name: str, path: Path) -> torch.nn.Module:
    backbone, _ = build_feature_backbone(name, 8)
    load_backbone_weights(backbone, str(path), name, lambda event, **fields: None)
    return backbone


def test_weights_that_do_not_match_the_backbone_are_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(BadInput, match="does not fit the backbone"):
        _load("small", path)
    with pytest.raises(BadInput, match="does not exist"):
        _load("small", tmp_path / "missing.pt")


def test_matching_weights_load_strictly(tmp_path: Path) -> None:
    source, _ = build_feature_backbone("small", 8)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = _load("small", path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))


def test_t4_preset_is_the_seeds_configuration_after_its_oom_fix() -> None:
    t4 = PRESETS["t4"]
    assert (t4["image_size"], t4["embedding_dim"], t4["k_shot"], t4["n_query"], t4["proposal_step"],
            t4["head_hidden"], t4["objectness_hidden"], t4["backbone"]) == (256, 256, 3, 10, 24, 512, 64, "resnet50")
    assert set(PRESETS) == {"cpu", "t4", "mps", "a100", "h100"}


def test_plan_extra_bytes_grow_with_proposal_density() -> None:
    task = tiny_task()
    sparse = task.plan_extra_bytes()["train"]["proposal_ranking"]
    task.cfg.proposal_step = 8
    assert task.plan_extra_bytes()["train"]["proposal_ranking"] == 4 * sparse


def test_the_planner_can_trace_both_phases_under_fake_tensors() -> None:
    plan = pytest.importorskip("fewshot_cli.memory.plan")
    phases = plan.trace(detect.COMMAND, DetectConfig(**TINY))
    assert set(phases) == {"train", "test"}
    assert phases["train"]["proposal_grid"] > 0 and phases["train"].get("activations", 0) > 0


# ---------------------------------------------------------------- the command line

CLI_TINY = ["--image-size", "64", "--embedding-dim", "8", "--head-hidden", "16", "--objectness-hidden", "4",
            "--proposal-step", "16", "--proposals-top-k", "8", "--n-way", "2", "--k-shot", "1", "--n-query", "1",
            "--episodes", "2", "--test-episodes", "1", "--score-threshold", "0.0", "--quiet"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewshot_cli", "detect-train", "--preset", "cpu", "--device", "cpu",
                           *args], capture_output=True, text=True, timeout=300)


def test_cli_run_writes_metrics_that_pycocotools_reproduces_from_the_run_files(tmp_path: Path) -> None:
    data = write_coco(tmp_path / "data")
    done = run_cli("--data", str(data), "--novel-classes", "thing4,thing5", "--out", str(tmp_path / "runs"),
                   "--name", "r", *CLI_TINY)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "r"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= {"map", "map50", "test_episodes"}
    assert (metrics["map"], metrics["map50"]) == detect.coco_map_files(run_dir / "gt.json",
                                                                       run_dir / "detections.json")


def test_cli_coco_data_without_novel_classes_exits_2(tmp_path: Path) -> None:
    data = write_coco(tmp_path / "data")
    done = run_cli("--data", str(data), "--out", str(tmp_path / "runs"), *CLI_TINY)
    assert done.returncode == 2
    assert "--novel-classes" in done.stderr and "Traceback" not in done.stderr


def _fake_query() -> tuple[DetectionItem, FewShotDetector]:
    """A query of three boxes and a small detector, made on fake tensors (no patch of the planner's)."""
    item = DetectionItem(torch.rand(3, 32, 32), torch.rand(3, 4) * 16 + torch.tensor([0, 0, 16, 16]),
                         torch.randint(1, 4, (3,)), 32, 32)
    backbone, stride = build_feature_backbone("small", 8)
    return item, FewShotDetector(backbone, stride, 8, 16, 4)


def test_fake_tensors_still_cannot_pick_a_querys_boxes() -> None:
    """detect-train's plan keeps every box of a query (`detect._traced_boxes`) because torch's fake tensors cannot
    follow `_boxes_of`. When this fails, torch can: delete `_traced_boxes` and the line of `plan_phases` that sets
    it, and let the planner trace `_boxes_of`."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        item, _ = _fake_query()
        with pytest.raises(DataDependentOutputException):  # reading the labels' values
            DetectTask._boxes_of(item, {1: 0, 2: 1})
        with pytest.raises(DynamicOutputShapeException):  # a mask of them: its output's shape is the data's
            item.boxes[item.labels == 1]  # noqa: B018 - the indexing is the test


def test_fake_tensors_still_cannot_trace_a_detection() -> None:
    """detect-train's plan traces its test up to the ranked candidates (`_traced_test`) and declares what `detect`
    keeps after them (`nms_inputs`), because torch's fake tensors cannot follow the score mask and the NMS. When
    this fails, torch can: let the test phase trace `evaluate`'s `_detect` and drop `nms_inputs`."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        item, model = _fake_query()
        prototypes = torch.nn.functional.normalize(torch.rand(2, 8), dim=1)
        proposals = dense_proposals(32, 8, (8.0, 16.0))
        with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)), torch.no_grad():
            model.detect(item.image[None], prototypes, prototypes, proposals, 8, 0.05, 0.5, 10)


# ---------------------------------------------------------------- fine-tuning on the support


def _detections_by_episode(task: DetectTask, order: list[int] | None = None) -> dict[int, list[tuple]]:
    """Evaluate the test phase, with its episodes taken in `order` where given: per episode index, every detection
    as (query file, category, box, score)."""
    if order is not None:
        sampler = task.samplers["test"]
        task.samplers["test"] = type("Reordered", (), {"episode": lambda self, i: sampler.episode(order[i])})()
    evaluate(task, "test", 1)
    gt, detections = task.test_files
    images = {image["id"]: image for image in gt["images"]}
    out: dict[int, list[tuple]] = {}
    for d in detections:
        image = images[d["image_id"]]
        episode = image["episode"] if order is None else order[image["episode"]]
        out.setdefault(episode, []).append((image["file_name"], d["category_id"], tuple(d["bbox"]), d["score"]))
    return out


def _trained(**overrides: object) -> DetectTask:
    torch.manual_seed(0)  # the model's initial weights, as a run's launch seeds them
    task = tiny_task(score_threshold=0.0, test_episodes=3, **overrides)
    task.train_step(1)
    return task


def test_finetuning_changes_the_scores_and_puts_the_trained_head_back() -> None:
    plain = _detections_by_episode(_trained())
    task = _trained(finetune_steps=3)
    trained = {k: v.clone() for k, v in task.model.state_dict().items()}
    tuned = _detections_by_episode(task)
    assert tuned != plain
    assert all(torch.equal(v, task.model.state_dict()[k]) for k, v in trained.items())


def test_finetuning_is_deterministic_and_each_episode_independent_of_the_others() -> None:
    forward = _detections_by_episode(_trained(finetune_steps=3))
    assert _detections_by_episode(_trained(finetune_steps=3)) == forward
    assert _detections_by_episode(_trained(finetune_steps=3), order=[2, 1, 0]) == forward


def test_finetuning_backs_off_on_an_injected_oom_to_the_same_detections() -> None:
    expected = _detections_by_episode(_trained(finetune_steps=3, eval_batch_size=4))
    task = _trained(finetune_steps=3, eval_batch_size=4)
    task.ctx.faults = Faults(task.cfg, oom_phase="test", oom_knob="eval_batch_size", oom_above=1)
    assert _detections_by_episode(task) == expected
    assert task.cfg.eval_batch_size == 1


def test_finetuning_negatives_are_training_images_without_the_episodes_classes_drawn_by_the_episode(
        tmp_path: Path) -> None:
    data = write_coco(tmp_path / "data")  # its training images hold the novel classes too, unannotated for training
    task = tiny_task(data=data, novel_classes="thing4,thing5", finetune_steps=1, finetune_negatives=5,
                     test_episodes=4)
    coco = json.loads((data / "annotations" / "train.json").read_text())
    held = {}
    for annotation in coco["annotations"]:
        held.setdefault(annotation["image_id"] - 1, set()).add(annotation["category_id"])
    episodes = [task.samplers["test"].episode(i) for i in range(4)]
    drawn = [task._negative_items(episode) for episode in episodes]
    for episode, items in zip(episodes, drawn, strict=True):
        assert len(items) == len(set(items)) == 5
        assert all(not held.get(item, set()) & set(episode.classes) for item in items)
    assert any(set(items) != set(drawn[0]) for items in drawn[1:])  # each episode draws its own
    again = tiny_task(data=data, novel_classes="thing4,thing5", finetune_steps=1, finetune_negatives=5)
    assert [again._negative_items(episode) for episode in reversed(episodes)] == drawn[::-1]
    assert tiny_task(data=data, novel_classes="thing4,thing5", finetune_negatives=5)._negative_items(episodes[0]) == []


def test_finetuning_negatives_change_the_scores_and_keep_episodes_independent() -> None:
    plain = _detections_by_episode(_trained(finetune_steps=3))
    forward = _detections_by_episode(_trained(finetune_steps=3, finetune_negatives=2))
    assert forward != plain
    assert _detections_by_episode(_trained(finetune_steps=3, finetune_negatives=2), order=[2, 1, 0]) == forward


def test_finetuning_negatives_back_off_on_an_injected_oom_to_the_same_detections() -> None:
    expected = _detections_by_episode(_trained(finetune_steps=3, finetune_negatives=3, eval_batch_size=4))
    task = _trained(finetune_steps=3, finetune_negatives=3, eval_batch_size=4)
    task.ctx.faults = Faults(task.cfg, oom_phase="test", oom_knob="eval_batch_size", oom_above=1)
    assert _detections_by_episode(task) == expected
    assert task.cfg.eval_batch_size == 1


def test_the_plan_holds_the_finetuning_negatives_and_their_loader() -> None:
    plan = pytest.importorskip("fewshot_cli.memory.plan")
    tuned = plan.trace(detect.COMMAND, DetectConfig(**TINY, finetune_steps=2))["test"]
    negatives = plan.trace(detect.COMMAND, DetectConfig(**TINY, finetune_steps=2, finetune_negatives=6))["test"]
    assert sum(negatives.values()) > sum(tuned.values())
    pixels = 3 * TINY["image_size"] ** 2 * 4  # the built-in data's float32 images
    plain, more = (tiny_task(finetune_steps=2, finetune_negatives=n, test_episodes=5) for n in (0, 6))
    cache = more.plan_extra_bytes()["test"]["image_cache"] - plain.plan_extra_bytes()["test"]["image_cache"]
    assert cache == 5 * 6 * pixels  # the training data's cache, emptied when the test begins, holds every one read
    assert "negatives cache 30 images" in more.plan_notes()["test"]["image_cache"]
    workers = tiny_task(finetune_steps=2, finetune_negatives=6, workers=2).plan_extra_bytes()["test"]
    alone = tiny_task(finetune_steps=2, workers=2).plan_extra_bytes()["test"]
    assert workers["loader_prefetch"] - alone["loader_prefetch"] == 2 * PREFETCH_FACTOR * 6 * pixels  # per worker


def test_evaluation_keeps_its_own_number_of_proposals_per_image() -> None:
    def most_per_image(task: DetectTask) -> int:
        evaluate(task, "test", 1)
        counts: dict[int, int] = {}
        for d in task.test_files[1]:
            counts[d["image_id"]] = counts.get(d["image_id"], 0) + 1
        return max(counts.values())

    n_way = TINY["n_way"]
    assert most_per_image(_trained(eval_top_k=2)) <= 2 * n_way < most_per_image(_trained())
    assert _trained(eval_top_k=2).plan_extra_bytes()["test"]["nms_inputs"] * 4 == \
        _trained().plan_extra_bytes()["test"]["nms_inputs"]


def test_the_planned_test_holds_the_finetuning() -> None:
    plan = pytest.importorskip("fewshot_cli.memory.plan")
    plain = plan.trace(detect.COMMAND, DetectConfig(**TINY))["test"]
    tuned = plan.trace(detect.COMMAND, DetectConfig(**TINY, finetune_steps=2))["test"]
    assert sum(tuned.values()) > sum(plain.values())


@pytest.mark.parametrize("option", [("--finetune-steps", "-1"), ("--finetune-lr", "-0.1"),
                                    ("--finetune-negatives", "-2"), ("--soft-nms-sigma", "-0.5"),
                                    ("--class-scores", "logits"), ("--proposal-ratios", "0"),
                                    ("--proposal-ratios", "wide")])
def test_cli_bad_finetuning_values_exit_2(option: tuple[str, str], tmp_path: Path) -> None:
    done = run_cli(*option, "--out", str(tmp_path / "runs"), *CLI_TINY)
    assert done.returncode == 2
    assert option[0] in done.stderr and "Traceback" not in done.stderr
