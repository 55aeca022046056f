"""`triplet-train`: ST-IoU, box AP, the triplet sampler, the frame cache, the clip layout, leak-free validation."""

from __future__ import annotations

import gc
import json
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from conftest import evaluate
from PIL import Image

from fewshot_cli.commands.triplet import (
    BoxAP,
    TripletConfig,
    TripletTask,
    baseline_boxes,
    load_backbone,
    st_iou,
)
from fewshot_cli.data.clips import DiskClipSource, FrameCache, sample_triplets
from fewshot_cli.errors import BadInput
from fewshot_cli.models.detection import FewShotDetector, build_feature_backbone
from fewshot_cli.models.localiser import Localiser
from fewshot_cli.runner.task import RunContext

NAN = [np.nan] * 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def boxes(*rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def tiny_config(**overrides) -> TripletConfig:
    values = dict(n_way=2, k_shot=1, n_query=1, image_size=32, clip_frames=3, num_aug=1, triplet_batch_size=2,
                  val_episodes=2, test_episodes=2, episodes=4, val_every=2, frame_cache_size=50,
                  frame_cache_mb=4, embedding_dim=16, workers=0)
    values.update(overrides)
    return TripletConfig(**values)


def tiny_task(data=None, **overrides) -> TripletTask:
    torch.manual_seed(0)
    return TripletTask(tiny_config(**overrides), RunContext(torch.device("cpu"), 0, None, data=data))


# --- ST-IoU: summed intersection over summed union across frames ---------------------------------------------

def test_st_iou_of_identical_tracks_is_one() -> None:
    track = boxes([0, 0, 10, 10], [5, 5, 20, 25])
    assert st_iou(track, track) == pytest.approx(1.0)


def test_st_iou_of_disjoint_tracks_is_zero() -> None:
    assert st_iou(boxes([0, 0, 10, 10], [0, 0, 10, 10]), boxes([20, 20, 30, 30], [10, 0, 20, 10])) == 0.0


def test_st_iou_of_partial_overlap_sums_before_dividing() -> None:
    # frame 0: intersection 50, union 150; frame 1: identical 10x10 boxes, 100 and 100 -> 150 / 250
    pred = boxes([0, 0, 10, 10], [0, 0, 10, 10])
    gt = boxes([5, 0, 15, 10], [0, 0, 10, 10])
    assert st_iou(pred, gt) == pytest.approx(150 / 250)


def test_st_iou_counts_frames_where_either_side_has_a_box_and_skips_frames_where_neither_does() -> None:
    # frame 0: only the truth (union 100); 1: neither (skipped); 2: only the prediction (union 100);
    # 3: identical boxes (intersection 100, union 100) -> 100 / 300
    pred = boxes(NAN, NAN, [0, 0, 10, 10], [0, 0, 10, 10])
    gt = boxes([0, 0, 10, 10], NAN, NAN, [0, 0, 10, 10])
    assert st_iou(pred, gt) == pytest.approx(100 / 300)


def test_st_iou_of_a_clip_where_both_agree_the_object_never_appears_is_one() -> None:
    assert st_iou(boxes(NAN, NAN), boxes(NAN, NAN)) == 1.0


def test_box_ap_is_one_when_every_hit_outscores_every_miss_and_half_when_half_the_truths_are_found() -> None:
    ap = BoxAP()
    ap.add(np.array([0.9, 0.8]), boxes([0, 0, 10, 10], [0, 0, 10, 10]), boxes([0, 0, 10, 10], [0, 0, 10, 10]))
    assert ap.value() == pytest.approx(1.0)
    ap.add(np.array([0.1, 0.2]), boxes([50, 50, 60, 60], [50, 50, 60, 60]), boxes([0, 0, 10, 10], [0, 0, 9, 9]))
    assert ap.value() == pytest.approx(0.5)


def test_baselines_are_a_centred_box_of_the_mean_true_size_and_the_whole_frame() -> None:
    centre, whole = baseline_boxes(boxes([0, 0, 10, 20], NAN, [30, 30, 40, 50]), 64)
    assert np.allclose(centre, [[27, 22, 37, 42]] * 3)
    assert np.allclose(whole, [[0, 0, 64, 64]] * 3)


# --- the triplet sampler -----------------------------------------------------------------------------------

def test_triplet_negatives_never_share_the_anchor_class_and_positives_always_do() -> None:
    rng = np.random.default_rng(0)
    for trial in range(50):
        labels = rng.integers(0, 2 + trial % 4, size=3 + trial % 7)
        if len(np.unique(labels)) < 2:
            continue
        picks = sample_triplets(labels, 64, rng)
        assert (labels[picks[:, 0]] == labels[picks[:, 1]]).all()
        assert (labels[picks[:, 0]] != labels[picks[:, 2]]).all()


def test_triplets_from_a_single_class_are_refused() -> None:
    with pytest.raises(BadInput, match="another class"):
        sample_triplets([3, 3, 3], 4, np.random.default_rng(0))


# --- the frame cache ---------------------------------------------------------------------------------------

def test_frame_cache_never_holds_more_frames_than_its_frame_bound() -> None:
    cache = FrameCache(max_frames=5, max_bytes=10**9)
    for i in range(40):
        cache.put(i, torch.zeros(3, 8, 8, dtype=torch.uint8))
        assert len(cache) <= 5
    assert cache.evictions == 35


def test_frame_cache_never_holds_more_bytes_than_its_byte_bound() -> None:
    cache = FrameCache(max_frames=1000, max_bytes=1000)
    rng = np.random.default_rng(0)
    for i in range(200):
        side = int(rng.integers(4, 16))
        cache.put(i, torch.zeros(3, side, side, dtype=torch.uint8))
        assert cache.bytes <= 1000
        assert cache.bytes == sum(f.untyped_storage().nbytes() for f in cache._frames.values())


def test_frame_cache_counts_a_view_as_its_own_bytes_not_its_parent_clip() -> None:
    clip = torch.zeros(100, 3, 8, 8, dtype=torch.uint8)
    cache = FrameCache(max_frames=10, max_bytes=10**6)
    cache.put("f0", clip[0])
    assert cache.bytes == 3 * 8 * 8


def test_frame_cache_evicts_the_least_recently_used_frame() -> None:
    cache = FrameCache(max_frames=2, max_bytes=10**6)
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.zeros(1))
    assert cache.get("a") is not None
    cache.put("c", torch.zeros(1))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None


def test_training_steps_report_cache_figures_within_the_bounds() -> None:
    task = tiny_task(frame_cache_size=4)
    figures = task.train_step(1)
    assert figures["cache_frames"] <= 4 and 0 <= figures["cache_hit_rate"] <= 1


# --- validation that cannot leak ---------------------------------------------------------------------------

def _live_tensors() -> list[torch.Tensor]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]


def test_a_validation_run_twice_leaves_no_retained_objects() -> None:
    task = tiny_task()
    task.model.eval()
    with torch.inference_mode():
        first = task.evaluate("val", 1)  # warms the frame cache with the validation clips
        # held, so that nothing alive before can be freed (or its id reused) while we look: what is new, stayed
        tensors_before = _live_tensors()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        second = task.evaluate("val", 2)
        task.evaluate("val", 3)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        known = {id(t) for t in tensors_before}
        retained = [tuple(t.shape) for t in _live_tensors() if id(t) not in known]
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename") if stat.size_diff > 0)
    assert retained == [], f"tensors kept across validations: {retained[:5]}"
    assert grown < 64 * 1024, f"{grown} bytes retained across validations"
    assert first["st_iou"] == pytest.approx(second["st_iou"])


def test_validation_returns_plain_floats() -> None:
    task = tiny_task()
    metrics = evaluate(task, "test", 1)
    assert {"st_iou", "box_ap50", "test_episodes", "st_iou_centre_box", "st_iou_whole_frame"} <= set(metrics)
    assert all(type(v) is float for v in metrics.values())
    assert metrics["test_episodes"] == 2.0


# --- training --------------------------------------------------------------------------------------------

def test_micro_steps_after_a_back_off_cover_the_same_triplets() -> None:
    whole = tiny_task(triplet_batch_size=4).train_step(1)
    task = tiny_task(triplet_batch_size=4)
    task.set_knob("triplet_batch_size", 2, 2)
    split = task.train_step(1)
    assert split["triplet_loss"] == pytest.approx(whole["triplet_loss"], rel=1e-4)


def test_episodes_load_the_same_in_worker_processes_as_in_the_main_one() -> None:
    in_process = tiny_task().train_step(1)
    in_worker = tiny_task(workers=1).train_step(1)
    assert in_worker["loss"] == pytest.approx(in_process["loss"], rel=1e-4)


def test_one_way_episodes_with_a_triplet_loss_are_refused() -> None:
    with pytest.raises(BadInput, match="--n-way 2"):
        tiny_task(n_way=1)


# --- --init from a stage-1 checkpoint ----------------------------------------------------------------------

def test_init_loads_the_backbone_of_a_stage_one_checkpoint(tmp_path) -> None:
    torch.manual_seed(1)
    stage1 = Localiser("small", 16)
    torch.save({"task": {"model": stage1.state_dict()}, "step": 3}, tmp_path / "checkpoint.pt")
    task = tiny_task(init=str(tmp_path))
    for name, value in stage1.backbone.state_dict().items():
        assert torch.equal(task.model.backbone.state_dict()[name], value)


def test_init_loads_the_backbone_of_a_detect_train_checkpoint(tmp_path) -> None:
    backbone, stride = build_feature_backbone("small", 16)
    detector = FewShotDetector(backbone, stride, 16, 32, 8)
    torch.save({"task": {"model": detector.state_dict()}}, tmp_path / "checkpoint.pt")
    model = Localiser("small", 16)
    assert load_backbone(model, str(tmp_path), "small") == len(detector.backbone.state_dict())
    assert torch.equal(model.backbone[0].weight, detector.backbone[0].weight)


def test_init_from_a_checkpoint_with_another_backbone_is_refused(tmp_path) -> None:
    torch.save({"model": Localiser("small", 32).state_dict()}, tmp_path / "checkpoint.pt")
    with pytest.raises(BadInput, match="--backbone small: .* has shape"):
        load_backbone(Localiser("small", 16), str(tmp_path / "checkpoint.pt"), "small")


def test_init_from_a_checkpoint_without_a_backbone_is_refused(tmp_path) -> None:
    torch.save({"model": {"head.weight": torch.zeros(2)}}, tmp_path / "checkpoint.pt")
    with pytest.raises(BadInput, match="holds no backbone"):
        load_backbone(Localiser("small", 16), str(tmp_path / "checkpoint.pt"), "small")


def test_init_from_a_missing_checkpoint_is_refused(tmp_path) -> None:
    with pytest.raises(BadInput, match="no checkpoint"):
        tiny_task(init=str(tmp_path / "nowhere"))


# --- the on-disk layout ------------------------------------------------------------------------------------

def write_dataset(root, classes=("cat", "dog"), clips=2, frames=3, size=40) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            cls_dir = root / split / f"{split}-{name}"
            (cls_dir / "support").mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(cls_dir / "support/a.png")
            for c in range(clips):
                clip_dir = cls_dir / "clips" / f"clip{c}"
                clip_dir.mkdir(parents=True)
                rows = ["frame,x0,y0,x1,y1"]
                for t in range(frames):
                    Image.fromarray(rng.integers(0, 255, (size, size * 2, 3), dtype=np.uint8)).save(
                        clip_dir / f"{t:03d}.png")
                    rows.append(f"{t:03d}.png,4,2,20,10" if t != 1 else f"{t:03d}.png,,,,")
                (clip_dir / "boxes.csv").write_text("\n".join(rows) + "\n")


def test_on_disk_clips_load_with_boxes_scaled_to_the_frame_size(tmp_path) -> None:
    write_dataset(tmp_path)
    source = DiskClipSource(tmp_path, 32, FrameCache(10, 10**6))
    frames, clip_boxes = source.clip(0)
    assert frames.shape == (3, 3, 32, 32) and frames.dtype == torch.uint8
    # frames are 80 wide and 40 high: x scales by 32/80, y by 32/40
    assert torch.allclose(clip_boxes[0], torch.tensor([1.6, 1.6, 8.0, 8.0]))
    assert torch.isnan(clip_boxes[1]).all()
    assert source.items_by_class("val") == source.items_by_class("test")


def test_a_task_trains_and_validates_on_on_disk_clips(tmp_path) -> None:
    write_dataset(tmp_path)
    task = tiny_task(data=tmp_path)
    assert np.isfinite(task.train_step(1)["loss"])


def test_a_clip_without_a_box_file_is_reported_with_its_path(tmp_path) -> None:
    write_dataset(tmp_path)
    clip = tmp_path / "train/train-dog/clips/clip1"
    (clip / "boxes.csv").unlink()
    with pytest.raises(BadInput, match=str(clip)):
        DiskClipSource(tmp_path, 32, FrameCache(10, 10**6))


def test_an_unreadable_frame_is_reported_with_its_clip_path(tmp_path) -> None:
    write_dataset(tmp_path)
    (tmp_path / "test/test-cat/clips/clip0/001.png").write_bytes(b"not a png")
    with pytest.raises(BadInput, match="test/test-cat/clips/clip0"):
        DiskClipSource(tmp_path, 32, FrameCache(10, 10**6))


def test_a_frame_without_a_box_row_is_reported_with_its_clip_path(tmp_path) -> None:
    write_dataset(tmp_path)
    clip = tmp_path / "train/train-cat/clips/clip0"
    lines = (clip / "boxes.csv").read_text().splitlines()
    (clip / "boxes.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(BadInput, match=f"{clip}: no box row for frame"):
        DiskClipSource(tmp_path, 32, FrameCache(10, 10**6))


def test_a_box_outside_its_frame_is_reported_with_its_clip_path(tmp_path) -> None:
    write_dataset(tmp_path)
    clip = tmp_path / "train/train-cat/clips/clip1"
    (clip / "boxes.csv").write_text("frame,x0,y0,x1,y1\n000.png,0,0,500,10\n001.png,,,,\n002.png,1,1,2,2\n")
    with pytest.raises(BadInput, match=f"{clip}: the box of frame 000.png"):
        DiskClipSource(tmp_path, 32, FrameCache(10, 10**6))


def test_a_missing_test_split_is_refused(tmp_path) -> None:
    write_dataset(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "test")
    with pytest.raises(BadInput, match="test is missing"):
        DiskClipSource(tmp_path, 32, FrameCache(10, 10**6))


def test_giou_loss_matches_torchvision() -> None:
    from torchvision.ops import generalized_box_iou_loss

    from fewshot_cli.models.localiser import giou_loss
    pred = torch.tensor([[0, 0, 10, 10.0], [5, 5, 20, 30], [0, 0, 4, 4]])
    target = torch.tensor([[2, 3, 12, 9.0], [0, 0, 4, 4], [10, 10, 20, 20]])
    assert torch.allclose(giou_loss(pred, target), generalized_box_iou_loss(pred, target), atol=1e-6)


# --- through the real CLI ----------------------------------------------------------------------------------

TINY_CLI = ["--preset", "cpu", "--image-size", "32", "--clip-frames", "3", "--episodes", "3", "--val-every", "1",
            "--val-episodes", "1", "--test-episodes", "1", "--n-way", "2", "--n-query", "1", "--k-shot", "1",
            "--num-aug", "0", "--triplet-batch-size", "2", "--embedding-dim", "16", "--quiet"]


def test_a_cli_run_logs_st_iou_and_cache_figures_and_a_second_stage_starts_from_it(runs) -> None:
    from conftest import events, fewshot
    first = fewshot("triplet-train", *TINY_CLI, "--out", runs, "--name", "stage1", "--json")
    assert first.returncode == 0, first.stderr
    metrics = json.loads(first.stdout)
    assert {"st_iou", "test_episodes", "box_ap50"} <= set(metrics)
    assert [e["phase"] for e in events(runs / "stage1", "eval")] == ["val", "val", "test"]
    assert all({"cache_hit_rate", "cache_frames", "cache_mb", "triplet_loss"} <= set(s)
               for s in events(runs / "stage1", "step"))
    second = fewshot("triplet-train", *TINY_CLI, "--out", runs, "--name", "stage2", "--init", runs / "stage1")
    assert second.returncode == 0, second.stderr
    assert events(runs / "stage2", "init_backbone")[0]["tensors"] > 0


def test_a_cli_run_on_a_broken_clip_exits_2_naming_the_clip(tmp_path, runs) -> None:
    from conftest import fewshot
    write_dataset(tmp_path / "data")
    (tmp_path / "data/train/train-dog/clips/clip0/boxes.csv").unlink()
    result = fewshot("triplet-train", *TINY_CLI, "--data", tmp_path / "data", "--out", runs)
    assert result.returncode == 2
    assert "train/train-dog/clips/clip0" in result.stderr and "Traceback" not in result.stderr
