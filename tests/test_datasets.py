"""mahalanobis-train's data on disk: every layout read in place, --test-data, --image-root, and bad data refused."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL, events, fewshot, read_csv
from PIL import Image

from fewshot_cli.data.splits import open_splits
from fewshot_cli.errors import BadInput

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits_split.py"
LAYOUTS = ("filelists", "split-csv", "easyfsl", "omniglot")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits, train 0-4 and test 5-9, written by the recipe in every layout: DIGITS/LAYOUT."""
    root = tmp_path_factory.mktemp("digits")
    for layout in ("folders", *LAYOUTS):
        subprocess.run([sys.executable, RECIPE, root / layout, "--layout", layout], check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def folder_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run on the folder layout every other layout's run is compared with."""
    runs = tmp_path_factory.mktemp("runs")
    assert fewshot("mahalanobis-train", *SMALL, "--data", digits / "folders", "--out", runs, "--name", "folders"
                   ).returncode == 0
    return runs / "folders"


def _train(data: Path, runs: Path, name: str, *args: str) -> Path:
    result = fewshot("mahalanobis-train", *SMALL, "--data", data, "--out", runs, "--name", name, *args)
    assert result.returncode == 0, result.stderr
    return runs / name


def _refused(result: subprocess.CompletedProcess, runs: Path, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_gives_the_folder_layouts_classes_images_and_run(layout: str, digits: Path, folder_run: Path,
                                                                      runs: Path) -> None:
    run = _train(digits / layout, runs, layout)
    config = json.loads((run / "config.json").read_text())
    assert config["data_format"] == layout
    assert events(run, "dataset")[0]["splits"] == events(folder_run, "dataset")[0]["splits"]
    assert events(folder_run, "dataset")[0]["splits"]["test"] == {"classes": 5, "images": 896}
    # the recipe lists the same images in the same order in every layout: the same episodes, the same accuracy
    assert json.loads((run / "metrics.json").read_text()) == json.loads((folder_run / "metrics.json").read_text())


def test_the_folder_layout_is_recorded_as_folders(folder_run: Path) -> None:
    assert json.loads((folder_run / "config.json").read_text())["data_format"] == "folders"


def test_test_data_is_what_the_test_phase_samples_and_data_then_needs_no_test_split(digits: Path, tmp_path: Path,
                                                                                    runs: Path) -> None:
    train_only = tmp_path / "train-only"
    shutil.copytree(digits / "folders" / "train", train_only / "train")
    run = _train(train_only, runs, "cross", "--test-data", digits / "filelists")
    config = json.loads((run / "config.json").read_text())
    assert config["knobs"]["test_data"] == {"value": str(digits / "filelists"), "source": "cli"}
    assert (config["data_format"], config["test_data_format"]) == ("folders", "filelists")
    assert events(run, "dataset")[0]["splits"]["test"] == {"classes": 5, "images": 896}
    assert {row["class"] for row in read_csv(run / "per_class.csv")} == {f"test/digit{d}" for d in range(5, 10)}


def test_the_table_groups_runs_by_their_test_data(digits: Path, folder_run: Path, runs: Path) -> None:
    cross = _train(digits / "folders", runs, "cross", "--test-data", digits / "easyfsl", "--episodes", "2")
    table = fewshot("table", folder_run, cross, "--group-by", "test_data,test_data_format", "--format", "csv")
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader(table.stdout.splitlines()))
    assert {(r["test_data"], r["test_data_format"]) for r in rows} == {("", ""), (str(digits / "easyfsl"), "easyfsl")}


def test_the_plan_names_each_datasets_layout(digits: Path) -> None:
    result = fewshot("plan", "mahalanobis-train", "--preset", "cpu", "--data", digits / "split-csv", "--test-data",
                     digits / "omniglot")
    assert result.returncode == 0, result.stderr
    assert f"data on disk: {digits / 'split-csv'}, layout split-csv; test data layout omniglot" in result.stdout
    as_json = json.loads(fewshot("plan", "mahalanobis-train", "--preset", "cpu", "--data", digits / "easyfsl",
                                 "--json").stdout)
    assert as_json["data_format"] == "easyfsl"


def test_lists_written_on_another_machine_are_refused_naming_the_first_missing_file(digits: Path, tmp_path: Path,
                                                                                   runs: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(digits / "filelists", moved)
    shutil.rmtree(moved / "images")  # the lists still name the images of digits/filelists, which are gone
    for name in ("base.json", "novel.json"):
        spec = json.loads((moved / name).read_text())
        spec["image_names"] = [p.replace(str(digits / "filelists"), "/elsewhere/mini") for p in spec["image_names"]]
        (moved / name).write_text(json.dumps(spec))
    first = json.loads((moved / "base.json").read_text())["image_names"][0]
    _refused(fewshot("mahalanobis-train", *SMALL, "--data", moved, "--out", runs), runs,
             f"{moved / 'base.json'}: image_names entry 0 ({first}) does not exist", "--image-root")


def test_image_root_reads_lists_from_where_the_images_are_now_and_resume_may_give_another(
        digits: Path, tmp_path: Path, runs: Path, folder_run: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    for name in ("base.json", "novel.json"):
        spec = json.loads((digits / "filelists" / name).read_text())
        spec["image_names"] = [p.replace(str(digits / "filelists"), "/elsewhere/mini") for p in spec["image_names"]]
        (lists / name).write_text(json.dumps(spec))
    shutil.copytree(digits / "filelists" / "images", tmp_path / "now")
    run = _train(lists, runs, "moved", "--image-root", tmp_path / "now")
    assert (run / "metrics.json").read_text() == (folder_run / "metrics.json").read_text()
    # the images move again; the run resumes from its checkpoint (its test phase) reading them where they are
    (tmp_path / "now").rename(tmp_path / "later")
    (run / "metrics.json").unlink()
    resumed = fewshot("mahalanobis-train", "--resume", run, "--image-root", tmp_path / "later", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "metrics.json").read_text() == (folder_run / "metrics.json").read_text()


# ---- bad data: exit 2, one sentence naming the file and the entry, nothing written


def _png(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(path)
    return str(path)


def _filelists(root: Path, per_class: int = 6) -> None:
    """base.json (classes a, b) and novel.json (c, d) over images/, paths relative to the lists' folder."""
    names = ["a", "b", "c", "d"]
    for list_name, labels in (("base", (0, 1)), ("novel", (2, 3))):
        files = [(f"images/{names[label]}/{i}.png", label) for label in labels for i in range(per_class)]
        for path, _ in files:
            _png(root / path)
        spec = {"label_names": names, "image_names": [p for p, _ in files], "image_labels": [lb for _, lb in files]}
        (root / f"{list_name}.json").write_text(json.dumps(spec))


def _split_csv(root: Path, rows: dict[str, list[str]]) -> None:
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("\n".join(["filename,label", *lines]) + "\n")
        for line in lines:
            _png(root / "images" / line.split(",")[0])


def _edit(path: Path, **changes) -> None:
    spec = json.loads(path.read_text())
    spec.update(changes)
    path.write_text(json.dumps(spec))


@pytest.mark.parametrize(("spoil", "needle"), [
    (lambda root: (root / "base.json").write_text('{"label_names": ["a"], "image_names": ['),
     "base.json is not valid JSON"),
    (lambda root: _edit(root / "base.json", image_labels=[0] * 5 + [7] * 7),
     "base.json: image_labels entry 5 is 7, not an index into its 4 label_names"),
    (lambda root: _edit(root / "novel.json", image_labels=[2]),
     "novel.json has 12 image_names but 1 image_labels"),
    (lambda root: _edit(root / "novel.json", image_names=None),
     "novel.json must be a JSON object with the lists label_names, image_names, image_labels"),
    (lambda root: (root / "images" / "c" / "3.png").unlink(),
     "novel.json: image_names entry 3"),
    (lambda root: _edit(root / "novel.json", image_labels=[0] * 6 + [3] * 6),
     "share a"),
    (lambda root: (root / "novel.json").unlink(),
     "missing: novel.json"),
])
def test_malformed_file_lists_are_refused_naming_the_file_and_the_entry(tmp_path: Path, spoil, needle: str) -> None:
    _filelists(tmp_path)
    spoil(tmp_path)
    with pytest.raises(BadInput) as err:
        open_splits(tmp_path, 8)
    assert needle in str(err.value)
    assert str(err.value).count(". ") == 0  # one sentence


@pytest.mark.parametrize(("rows", "needle"), [
    ({"train": ["x.png,a", "y.png,b"], "test": ["z.png,c,extra"]}, "test.csv line 2 is 'z.png,c,extra'"),
    ({"train": ["x.png,a"], "test": ["z.png,a"]}, "share a"),
])
def test_malformed_split_files_are_refused_naming_the_line(tmp_path: Path, rows, needle: str) -> None:
    _split_csv(tmp_path, rows)
    with pytest.raises(BadInput) as err:
        open_splits(tmp_path, 8)
    assert needle in str(err.value)


def test_a_split_file_without_its_header_is_refused(tmp_path: Path) -> None:
    _split_csv(tmp_path, {"train": ["x.png,a"], "test": ["y.png,b"]})
    (tmp_path / "test.csv").write_text("image,class\ny.png,b\n")
    with pytest.raises(BadInput, match=r"test.csv must start with the header filename,label, not image,class"):
        open_splits(tmp_path, 8)


def test_an_easyfsl_class_root_that_is_missing_is_refused_and_one_without_images_is_left_out(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _png(tmp_path / "images" / name / "0.png")
    (tmp_path / "images" / "empty").mkdir()
    spec = {"class_names": ["a", "b", "empty"], "class_roots": ["images/a", "images/b", "images/empty"]}
    (tmp_path / "train.json").write_text(json.dumps(spec))
    (tmp_path / "test.json").write_text(json.dumps({"class_names": ["c"], "class_roots": ["images/c"]}))
    data = open_splits(tmp_path, 8)
    assert data.describe() == {"train": {"classes": 2, "images": 2}, "test": {"classes": 1, "images": 1}}
    assert data.notes == [f"{tmp_path / 'train.json'}: class 'empty' has no image in {tmp_path / 'images/empty'}; "
                          f"it is left out."]
    (tmp_path / "test.json").write_text(json.dumps({"class_names": ["c"], "class_roots": ["images/gone"]}))
    with pytest.raises(BadInput, match=r"test.json: class_roots entry 0 \(images/gone\) is not a folder here"):
        open_splits(tmp_path, 8)


def test_an_unreadable_listed_image_is_bad_input_when_it_is_read(tmp_path: Path) -> None:
    _filelists(tmp_path)
    (tmp_path / "images" / "a" / "0.png").write_bytes(b"\x89PNG broken")
    data = open_splits(tmp_path, 8)  # indexing opens no image
    with pytest.raises(BadInput, match=f"Cannot read image {tmp_path / 'images/a/0.png'}"):
        data[0]


def test_a_folder_in_no_known_layout_is_refused_naming_the_layouts(tmp_path: Path) -> None:
    _png(tmp_path / "pictures" / "0.png")
    with pytest.raises(BadInput, match="holds none of the layouts read here"):
        open_splits(tmp_path, 8)


def test_image_root_with_folders_is_refused(tmp_path: Path) -> None:
    for split, name in (("train", "a"), ("test", "b")):
        _png(tmp_path / split / name / "0.png")
    with pytest.raises(BadInput, match="--image-root applies to the layouts that list their images"):
        open_splits(tmp_path, 8, image_root=tmp_path)


@pytest.mark.parametrize(("spoil", "needles"), [
    (lambda root: _edit(root / "base.json", image_labels=[0] * 5 + [9] * 7), ("base.json: image_labels entry 5",)),
    (lambda root: None, ("The train split has 0 classes with at least 29 images",)),
])
def test_bad_data_through_the_cli_is_exit_2_and_writes_nothing(tmp_path: Path, runs: Path, spoil,
                                                                needles: tuple[str, ...]) -> None:
    _filelists(tmp_path / "data")
    spoil(tmp_path / "data")
    _refused(fewshot("mahalanobis-train", *SMALL, "--data", tmp_path / "data", "--out", runs, "--n-way", "2",
                     "--n-query", "24"), runs, *needles)


def test_test_data_without_data_is_refused(digits: Path, runs: Path) -> None:
    _refused(fewshot("mahalanobis-train", *SMALL, "--test-data", digits / "filelists", "--out", runs), runs,
             "--test-data and --image-root read datasets on disk: give --data too.")


def test_feats_split_folder_beside_images_is_read_as_split_files(tmp_path: Path) -> None:
    _split_csv(tmp_path, {"train": ["x.png,a", "y.png,b"], "test": ["z.png,c"]})
    (tmp_path / "split").mkdir()
    for name in ("train.csv", "test.csv"):
        (tmp_path / name).rename(tmp_path / "split" / name)
    data = open_splits(tmp_path, 8)
    assert (data.data_format, data.class_names) == ("split-csv", ["train/a", "train/b", "test/c"])


def test_easyfsl_roots_relative_to_its_repository_are_read_from_there(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    specs = tmp_path / "data" / "CUB"
    for name in ("a", "b"):
        _png(specs / "images" / name / "0.png")
    for split, name in (("train", "a"), ("test", "b")):
        (specs / f"{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (specs / f"{split}.json").write_text(json.dumps({"class_names": [name],
                                                         "class_roots": [f"./data/CUB/images/{name}"]}))
    monkeypatch.chdir(tmp_path)  # easyfsl writes its specs' roots relative to its repository's root
    assert open_splits(specs, 8).describe() == {"train": {"classes": 1, "images": 1},
                                                "test": {"classes": 1, "images": 1}}
