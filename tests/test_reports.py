"""Open-set figures, the heads over frozen embeddings, confusion matrices and embedding pictures."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, embed_run, fewshot, read_csv
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from fewshot_cli.commands.embed import EmbedTask
from fewshot_cli.data.embed_layout import UNKNOWN, scan
from fewshot_cli.data.embedding_store import EmbeddingStore, FileKey
from fewshot_cli.models.frozen_heads import l2_normalise
from fewshot_cli.reports.confusion import write_confusion
from fewshot_cli.reports.open_set import unknown_auroc


def _embed(run_dir: Path, **knobs) -> tuple[EmbedTask, dict[str, float]]:
    return embed_run(run_dir, batch_size=16, k_shot=3, n_query=4, **knobs)


def _vectors(task: EmbedTask, run_dir: Path, refs) -> np.ndarray:
    store = EmbeddingStore(run_dir / "embeddings", task.model.identity)
    try:
        return store.vectors([store.lookup(FileKey.of(ref.path))["row"] for ref in refs])
    finally:
        store.close()


def test_unknown_auroc_of_a_hand_made_case():
    # known 0.9, 0.8, 0.4 against Unknown 0.5, 0.1: five of the six pairs are ranked right
    score = np.array([0.9, 0.5, 0.8, 0.1, 0.4])
    known = np.array([True, False, True, False, True])
    assert unknown_auroc(score, known) == pytest.approx(5 / 6)
    assert unknown_auroc(score, np.ones(5, dtype=bool)) is None


@pytest.fixture(scope="module")
def prototype_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("embed") / "run"
    return run_dir, *_embed(run_dir, plots=True)


def test_unknown_auroc_of_a_run_ranks_its_known_queries_against_its_unknown_ones(prototype_run):
    run_dir, _, metrics = prototype_run
    rows = [r for r in read_csv(run_dir / "predictions.csv") if r["true_class"]]
    known = np.array([r["true_class"] != UNKNOWN for r in rows])
    assert known.any() and not known.all()
    expected = unknown_auroc(np.array([float(r["score"]) for r in rows]), known)
    assert metrics["unknown_auroc"] == pytest.approx(expected, abs=1e-4)  # the CSV keeps 6 decimals


def test_the_sweep_at_the_chosen_threshold_is_the_runs_accuracy_and_unknown_rate(prototype_run):
    run_dir, _, metrics = prototype_run
    rows = read_csv(run_dir / "threshold_sweep.csv")
    chosen = [r for r in rows if r["chosen"] == "1"]
    assert len(chosen) == 1
    assert float(chosen[0]["threshold"]) == pytest.approx(metrics["threshold"], abs=1e-6)
    assert float(chosen[0]["accuracy"]) == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert float(chosen[0]["unknown_rate"]) == pytest.approx(metrics["unknown_rate"], abs=1e-6)
    rates = [float(r["unknown_rate"]) for r in rows]
    assert rates[0] == 0.0 and rates[-1] == 1.0 and rates == sorted(rates)


@pytest.mark.parametrize("head", ["logistic", "knn"])
def test_a_head_predicts_as_scikit_learn_does_on_the_same_embeddings(tmp_path, head):
    task, metrics = _embed(tmp_path / "run", head=head, neighbours=3, probe_c=2.0)
    data = scan(tmp_path / "run" / "builtin-data")
    classes = sorted({ref.label for ref in data.support})
    support = l2_normalise(_vectors(task, tmp_path / "run", data.support))
    labels = np.array([classes.index(ref.label) for ref in data.support])
    queries = sorted(data.queries, key=lambda r: r.name)
    if head == "logistic":
        model = LogisticRegression(C=2.0, max_iter=1000).fit(support, labels)
    else:
        model = KNeighborsClassifier(n_neighbors=3, metric="cosine", algorithm="brute").fit(support, labels)
    probabilities = model.predict_proba(l2_normalise(_vectors(task, tmp_path / "run", queries)))
    rows = read_csv(tmp_path / "run" / "predictions.csv")
    assert [r["path"] for r in rows] == [q.name for q in queries]
    assert [r["nearest"] for r in rows] == [classes[i] for i in probabilities.argmax(axis=1)]
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    assert [float(r["margin"]) for r in rows] == pytest.approx(top2[:, 1] - top2[:, 0], abs=1e-5)
    # the Unknown rule is the prototype head's, whatever the head
    for row in rows:
        accepted = float(row["score"]) >= metrics["threshold"] - 1e-6
        assert row["predicted"] == (row["nearest"] if accepted else UNKNOWN)


def test_confusion_and_per_class_of_a_hand_made_case(tmp_path):
    write_confusion(tmp_path, Counter({("a", "a"): 3, ("a", "b"): 1, ("b", "b"): 2, ("c", "a"): 1}), ["a", "b", "c"])
    assert read_csv(tmp_path / "confusion.csv") == [
        {"true \\ predicted": "a", "a": "3", "b": "1", "c": "0"},
        {"true \\ predicted": "b", "a": "0", "b": "2", "c": "0"},
        {"true \\ predicted": "c", "a": "1", "b": "0", "c": "0"}]
    per_class = {r["class"]: r for r in read_csv(tmp_path / "per_class.csv")}
    assert float(per_class["a"]["precision"]) == pytest.approx(3 / 4)
    assert float(per_class["a"]["recall"]) == pytest.approx(3 / 4)
    assert float(per_class["b"]["precision"]) == pytest.approx(2 / 3)
    assert float(per_class["b"]["f1"]) == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    assert per_class["c"]["support"] == "1" and float(per_class["c"]["recall"]) == 0.0
    assert Image.open(tmp_path / "confusion.png").size[0] > 100


def test_embed_classify_confusion_counts_its_labelled_predictions(prototype_run):
    run_dir, _, _ = prototype_run
    pairs = Counter((r["true_class"], r["predicted"]) for r in read_csv(run_dir / "predictions.csv") if r["true_class"])
    matrix = read_csv(run_dir / "confusion.csv")
    assert {(row["true \\ predicted"], p): int(n) for row in matrix for p, n in row.items()
            if p != "true \\ predicted" and int(n)} == dict(pairs)
    assert matrix[-1]["true \\ predicted"] == UNKNOWN


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_plots_draw_the_test_queries_in_two_dimensions(tmp_path, method):
    _embed(tmp_path / "run", plots=True, embedding_plot=method)
    with Image.open(tmp_path / "run" / "embedding.png") as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_without_plots_no_embedding_picture_is_drawn(tmp_path):
    _embed(tmp_path / "run")
    assert not (tmp_path / "run" / "embedding.png").exists()
    assert (tmp_path / "run" / "threshold_sweep.png").is_file()


def test_mahalanobis_confusion_holds_every_test_query_and_its_accuracy(tmp_path):
    done = fewshot("mahalanobis-train", *SMALL, "--out", tmp_path, "--name", "r", "--plots", "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    rows = read_csv(tmp_path / "r" / "confusion.csv")
    counts = np.array([[int(v) for k, v in row.items() if k != "true \\ predicted"] for row in rows])
    assert counts.sum() == 10 * 5 * 4  # test episodes x n_way x n_query
    # every episode has as many queries, so the mean episode accuracy is the share on the diagonal
    assert np.trace(counts) / counts.sum() == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert (tmp_path / "r" / "per_class.csv").is_file() and (tmp_path / "r" / "embedding.png").is_file()


def test_classify_food101_confusion_has_the_runs_top1_on_its_diagonal(tmp_path):
    done = fewshot("classify-food101", "--preset", "cpu", "--epochs", "1", "--synthetic-classes", "4",
                   "--dev-samples", "9", "--batch-size", "12", "--out", tmp_path, "--name", "r", "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    rows = read_csv(tmp_path / "r" / "confusion.csv")
    counts = np.array([[int(v) for k, v in row.items() if k != "true \\ predicted"] for row in rows])
    assert counts.shape == (4, 4) and counts.sum() == 4 * 3
    assert np.trace(counts) / counts.sum() == pytest.approx(metrics["top1"])


def test_the_confusion_scores_are_scikit_learns_to_the_bit() -> None:
    """Per class precision, recall, F1 and support, and the matrix, from (true, predicted) counts as scikit-learn
    gives them with the counts as weights: classes never predicted or never true, a pair outside the labels."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from fewshot_cli.reports.confusion import scores

    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(7)]
    for trial in range(20):
        pairs = {(str(rng.choice(names[:6])), str(rng.choice(names[1:] + ["Unknown"]))): int(rng.integers(1, 9))
                 for _ in range(int(rng.integers(1, 30)))}
        labels = names if trial % 2 else names[:5]
        y_true, y_pred = zip(*pairs, strict=True)
        weights = np.asarray(list(pairs.values()), dtype=np.int64)
        matrix, precision, recall, f1, support = scores(pairs, labels)
        assert np.array_equal(matrix, confusion_matrix(y_true, y_pred, labels=labels, sample_weight=weights))
        theirs = precision_recall_fscore_support(y_true, y_pred, labels=labels, sample_weight=weights,
                                                 zero_division=0)
        for ours, expected in zip((precision, recall, f1, support), theirs, strict=True):
            assert np.array_equal(ours, np.asarray(expected, dtype=np.float64)), trial


LIBRARIES = """
import json, resource, sys
if sys.argv[1] == "capped":
    resource.setrlimit(resource.RLIMIT_AS, (2**45, resource.getrlimit(resource.RLIMIT_AS)[1]))
from fewshot_cli.reports.files import load_libraries
print(json.dumps([load_libraries(), "matplotlib.pyplot" in sys.modules]))
"""


@pytest.mark.parametrize("limit, expected", [("none", [False, False]), ("capped", [True, True])])
def test_the_reports_library_loads_up_front_only_where_the_address_space_is_limited(limit: str, expected: list
                                                                                    ) -> None:
    import os
    import resource
    import subprocess
    import sys

    if limit == "capped" and resource.getrlimit(resource.RLIMIT_AS)[1] not in (resource.RLIM_INFINITY,):
        pytest.skip("RLIMIT_AS has a hard limit here")
    if limit == "none" and resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
        pytest.skip("this process's address space is limited already")
    done = subprocess.run([sys.executable, "-c", LIBRARIES, limit], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == expected
