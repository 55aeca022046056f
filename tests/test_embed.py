"""embed-classify: layout rules, image modes, the embedding store, thresholds, HF backbones, outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import embed_run, evaluate, read_csv
from PIL import Image

from fewshot_cli.commands.embed import EmbedConfig, EmbedTask, leave_one_out_threshold
from fewshot_cli.data.embed_layout import UNKNOWN, scan, write_synthetic
from fewshot_cli.data.embedding_store import EmbeddingStore, extract
from fewshot_cli.data.images import read_pil as read_rgb
from fewshot_cli.errors import BadInput
from fewshot_cli.memory.plan import fake_tensors
from fewshot_cli.models.embedders import SmallConvNet, build_embedder
from fewshot_cli.runner.task import RunContext

CPU = torch.device("cpu")


def _png(path: Path, colour: tuple[int, int, int], size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def _builtin(tmp_path: Path, **shape: int) -> Path:
    shape = {"categories": 2, "n_way": 2, "k_shot": 2, "n_query": 2, "image_size": 16, **shape}
    return write_synthetic(tmp_path / "data", seed=0, **shape)


def _run(data: Path | None, run_dir: Path, **knobs) -> tuple[EmbedTask, dict[str, float]]:
    return embed_run(run_dir, data, **{"batch_size": 4, "k_shot": 2, "n_query": 2, **knobs})


def test_class_folders_are_classes_and_queries_take_the_deepest_class_folder(tmp_path):
    _png(tmp_path / "fruit/2.support-set/apple/shot1/a.png", (200, 0, 0))
    _png(tmp_path / "fruit/2.support-set/pear/shot1/p.png", (0, 200, 0))
    _png(tmp_path / "fruit/6.preprocessed/day1/apple/q1.png", (200, 0, 0))
    _png(tmp_path / "fruit/6.preprocessed/day1/q2.png", (0, 200, 0))
    data = scan(tmp_path)
    assert data.classes == ("apple", "pear")
    assert {q.name: q.label for q in data.queries} == {
        "fruit/6.preprocessed/day1/apple/q1.png": "apple", "fruit/6.preprocessed/day1/q2.png": None}


def test_shot_folders_make_the_category_its_own_class(tmp_path):
    _png(tmp_path / "bolt/2.support-set/shot1/a.png", (200, 0, 0))
    _png(tmp_path / "bolt/2.support-set/shot2/b.png", (190, 0, 0))
    _png(tmp_path / "bolt/6.preprocessed/x/q.png", (200, 0, 0))
    _png(tmp_path / "bolt/6.preprocessed/Unknown/r.png", (0, 0, 200))
    data = scan(tmp_path)
    assert data.classes == ("bolt",)
    assert len(data.support) == 2
    assert {q.name: q.label for q in data.queries} == {
        "bolt/6.preprocessed/x/q.png": "bolt", "bolt/6.preprocessed/Unknown/r.png": UNKNOWN}


def test_data_without_a_support_set_is_bad_input(tmp_path):
    _png(tmp_path / "bolt/6.preprocessed/q.png", (200, 0, 0))
    with pytest.raises(BadInput, match="2.support-set"):
        scan(tmp_path)


def _exif_rotated(path: Path) -> Path:
    image = Image.new("RGB", (20, 10), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, exif=exif)
    return path


@pytest.mark.parametrize("mode", ["L", "1", "RGBA", "LA", "P", "P-transparent", "I;16", "I", "F", "CMYK", "RGB"])
def test_every_image_mode_is_read_as_8_bit_rgb(tmp_path, mode):
    pil_mode = mode.split("-")[0]
    image = Image.new(pil_mode, (12, 8))
    if mode == "P-transparent":
        image.info["transparency"] = 0
    path = tmp_path / ("img.tiff" if mode in ("I;16", "I", "F", "CMYK") else "img.png")
    image.save(path)
    rgb = read_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (12, 8)


def test_16_bit_grey_is_scaled_to_8_bits(tmp_path):
    grey = np.full((4, 4), 65535, dtype=np.uint16)
    grey[0, 0] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    pixels = np.asarray(read_rgb(path))
    assert pixels[1, 1].tolist() == [255, 255, 255] and pixels[0, 0].tolist() == [0, 0, 0]


def test_transparent_pixels_are_laid_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)
    assert np.asarray(read_rgb(path))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    assert read_rgb(_exif_rotated(tmp_path / "rot.jpg")).size == (10, 20)


def test_corrupt_file_is_skipped_counted_and_listed(tmp_path):
    data = _builtin(tmp_path)
    bad = data / "category-00/6.preprocessed/broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    events = []
    cfg = EmbedConfig(image_size=16, batch_size=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    task = EmbedTask(cfg, RunContext(device=CPU, seed=0, run_dir=run_dir, data=data,
                                     emit=lambda event, **f: events.append((event, f))))
    metrics = task.finish(evaluate(task, "test", 0))
    assert metrics["unreadable_images"] == 1
    assert str(bad.resolve()) in (run_dir / "unreadable.txt").read_text()
    assert all(row["path"] != "category-00/6.preprocessed/broken.png" for row in read_csv(run_dir / "predictions.csv"))
    assert any(event == "unreadable_image" for event, _ in events)


def test_threshold_above_every_cosine_makes_everything_unknown(tmp_path):
    _, metrics = _run(_builtin(tmp_path), tmp_path / "run", threshold="1.01")
    assert metrics["unknown_rate"] == 1.0


def test_threshold_below_every_cosine_makes_nothing_unknown(tmp_path):
    task, metrics = _run(_builtin(tmp_path), tmp_path / "run", threshold="-1.01")
    assert metrics["unknown_rate"] == 0.0
    assert all(row["predicted"] != UNKNOWN for row in read_csv(tmp_path / "run/predictions.csv"))


def test_threshold_none_gives_every_query_a_class_for_a_closed_set_accuracy(tmp_path):
    _, metrics = _run(_builtin(tmp_path), tmp_path / "run", threshold="none")
    assert metrics["unknown_rate"] == 0.0


def test_auto_threshold_falls_between_own_class_and_other_class_cosines():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8)
    support = [c + rng.normal(0, 0.05, (4, 8)) for c in centres]
    threshold = leave_one_out_threshold(support)
    unit = [s / np.linalg.norm(s, axis=1, keepdims=True) for s in support]
    own = [a @ (u.sum(0) - a) / np.linalg.norm(u.sum(0) - a) for u in unit for a in u]  # prototype without the shot
    means = [u.mean(0) / np.linalg.norm(u.mean(0)) for u in unit]
    other = [a @ m for c, u in enumerate(unit) for a in u for d, m in enumerate(means) if d != c]
    assert max(other) < threshold <= min(own), (max(other), threshold, min(own))


def test_bad_threshold_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="--threshold"):
        _run(_builtin(tmp_path), tmp_path / "run", threshold="high")


def test_builtin_data_is_classified_well_by_the_small_backbone(tmp_path):
    _, metrics = _run(None, tmp_path / "run", image_size=32, categories=4, n_way=3, k_shot=5, n_query=4)
    assert metrics["test_episodes"] == 4 and metrics["accuracy"] >= 0.7


def test_outputs_are_identical_across_runs(tmp_path):
    data = _builtin(tmp_path)
    _run(data, tmp_path / "a")
    _run(data, tmp_path / "b")
    for name in ("predictions.csv", "per_category.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_cache_skips_unchanged_files_and_reextracts_a_changed_one(tmp_path):
    data = _builtin(tmp_path)
    cache = str(tmp_path / "cache")
    _, first = _run(data, tmp_path / "a", cache_dir=cache)
    _, second = _run(data, tmp_path / "b", cache_dir=cache)
    assert second["images_extracted"] == 0 and second["images_cached"] == first["images_extracted"]
    changed = next((data / "category-00/6.preprocessed").rglob("*.png"))
    _png(changed, (1, 2, 3))
    os.utime(changed, ns=(1, 1))
    _, third = _run(data, tmp_path / "c", cache_dir=cache)
    assert third["images_extracted"] == 1


def test_interrupted_extraction_resumes_where_it_stopped(tmp_path):
    data = _builtin(tmp_path)
    paths = sorted(ref.path for ref in scan(data).support)
    model = SmallConvNet(16)

    def stop_after_first_batch(done: int, total: int) -> None:
        raise KeyboardInterrupt

    store = EmbeddingStore(tmp_path / "cache", model.identity)
    with pytest.raises(KeyboardInterrupt):
        extract(model, paths, store, CPU, batch_size=2, on_batch=stop_after_first_batch)
    store.close()
    with (store.index_path).open("a") as index:
        index.write('{"path": "torn')  # a line cut off mid-write
    store = EmbeddingStore(tmp_path / "cache", model.identity)
    report = extract(model, paths, store, CPU, batch_size=2)
    assert (report.cached, report.extracted) == (2, len(paths) - 2)
    assert store.rows == len(paths)
    store.close()


def test_resnet50_uses_224_centre_crop_and_imagenet_statistics():
    model = build_embedder("resnet50")
    pixels = model.preprocess(Image.new("RGB", (300, 260), (124, 116, 104)))
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    assert pixels.abs().max() < 0.01  # the ImageNet mean colour normalises to about zero


def test_resnet50_rejects_a_weights_file_without_its_parameters(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"other.weight": torch.zeros(1)}, path)
    with pytest.raises(BadInput, match="does not fit the resnet50: .*missing"):
        build_embedder("resnet50", weights=str(path))


def _tiny_clip(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _tiny_dinov2(path: Path) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8)
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


@pytest.mark.parametrize(("backbone", "make", "dim"), [("clip", _tiny_clip, 8), ("dinov2", _tiny_dinov2, 16)])
def test_tiny_hf_backbone_loads_from_model_dir_and_classifies(tmp_path, backbone, make, dim):
    model_dir = make(tmp_path / backbone)
    task, metrics = _run(_builtin(tmp_path), tmp_path / "run", backbone=backbone, model=str(model_dir))
    rows = read_csv(tmp_path / "run/predictions.csv")
    assert metrics["queries"] == len(rows) == 10
    classes = {"category-01", "circle-0-solid", "square-3-stripes"}  # the support set's classes
    # each query goes to its nearest class when its cosine reaches the threshold, else Unknown (a score at the
    # threshold's sixth decimal cannot be told apart in the file)
    assert all(row["nearest"] in classes for row in rows)
    decided = [r for r in rows if abs(float(r["score"]) - metrics["threshold"]) > 1e-6]
    assert decided and all(r["predicted"] == (r["nearest"] if float(r["score"]) >= metrics["threshold"] else UNKNOWN)
                           for r in decided)
    meta = json.loads(next((tmp_path / "run/embeddings").glob(f"{backbone}-*/meta.json")).read_text())
    assert meta["dim"] == dim


def test_hf_backbone_without_model_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="needs --model"):
        build_embedder("clip")


def test_model_dir_of_the_wrong_model_type_is_bad_input(tmp_path):
    model_dir = _tiny_dinov2(tmp_path / "dino")
    with pytest.raises(BadInput, match="dinov2"):
        build_embedder("clip", model=str(model_dir))


def test_per_category_table_totals_match_predictions(tmp_path):
    _run(_builtin(tmp_path), tmp_path / "run")
    rows = read_csv(tmp_path / "run/per_category.csv")
    predictions = read_csv(tmp_path / "run/predictions.csv")
    total = rows[-1]
    assert total["category"] == "TOTAL" and int(total["queries"]) == len(predictions)
    assert int(total[UNKNOWN]) == sum(p["predicted"] == UNKNOWN for p in predictions)



def test_a_folder_named_like_shot_but_not_shot_number_is_a_class(tmp_path):
    _png(tmp_path / "guns/2.support-set/shotgun/shot1/a.png", (200, 0, 0))
    _png(tmp_path / "guns/6.preprocessed/q.png", (200, 0, 0))
    assert scan(tmp_path).classes == ("shotgun",)


def test_fake_tensors_still_cannot_run_an_extraction(tmp_path: Path) -> None:
    """embed-classify's plan traces the forward of one extraction batch on zeros (`EmbedTask.plan_phases`) because
    `extract` copies vectors out with `.numpy()`, which a fake tensor does not support. When this fails, torch can:
    let the plan trace `extract` on the data's first batch."""
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    model = SmallConvNet(16)
    store = EmbeddingStore(tmp_path / "store", model.identity)
    with fake_tensors(), pytest.raises(RuntimeError, match="numpy"):
        extract(model, [tmp_path / "a.png"], store, torch.device("cpu"), batch_size=1)
    store.close()
