"""Where the errors are: `confusion.csv`, `confusion.png` and `per_class.csv` from true and predicted classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fewshot_cli.reports.files import figure, fmt, save_figure, write_csv

#: above this many classes the matrix is drawn without per-cell counts (they would not be legible)
ANNOTATE_UP_TO = 20
#: above this many classes the axes carry no class names
NAME_UP_TO = 40


def write_confusion(run_dir: Path, pairs: Mapping[tuple[str, str], int], labels: Sequence[str]) -> None:
    """confusion.csv (rows: true class, columns: predicted), confusion.png and per_class.csv in `run_dir`, from
    the number of queries of each (true, predicted) pair (kept as counts: their memory does not grow with the
    queries). Nothing is written without a labelled query."""
    if not pairs:
        return
    labels = list(labels)
    matrix, precision, recall, f1, support = scores(pairs, labels)
    write_csv(run_dir / "confusion.csv", ["true \\ predicted", *labels],
              ([name, *row.tolist()] for name, row in zip(labels, matrix, strict=True)))
    rows = [[name, fmt(p), fmt(r), fmt(f), int(s)]
            for name, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)]
    write_csv(run_dir / "per_class.csv", ["class", "precision", "recall", "f1", "support"], rows)
    plot_confusion(run_dir / "confusion.png", matrix, labels)


def scores(pairs: Mapping[tuple[str, str], int], labels: Sequence[str]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """From the (true, predicted) counts: the confusion matrix over `labels` (int64, rows true) and per label its
    precision, recall, F1 and support, 0 where a ratio has nothing to divide by. The same numbers, to the bit, as
    scikit-learn's `confusion_matrix` and `precision_recall_fscore_support(..., zero_division=0)` with the counts as
    sample weights (`tests/test_reports.py` holds them equal), without loading scikit-learn and scipy (a second
    or more) to divide a few counts: a pair whose true or predicted class is not among `labels` is left out of the
    matrix and still counts in the other class's sums, as there."""
    index = {name: i for i, name in enumerate(labels)}
    n = len(labels)
    matrix = np.zeros((n, n), dtype=np.int64)
    true_sum, pred_sum = np.zeros(n), np.zeros(n)
    for (true, predicted), count in pairs.items():
        t, p = index.get(true), index.get(predicted)
        if t is not None and p is not None:
            matrix[t, p] += count
        if t is not None:
            true_sum[t] += count
        if p is not None:
            pred_sum[p] += count
    hits = np.diag(matrix).astype(np.float64)

    def ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
        return np.divide(top, bottom, out=np.zeros(n), where=bottom != 0)

    return matrix, ratio(hits, pred_sum), ratio(hits, true_sum), ratio(2 * hits, true_sum + pred_sum), true_sum


def plot_confusion(path: Path, matrix: np.ndarray, labels: Sequence[str]) -> None:
    """Cells coloured by the share of their true class (row), so rare classes read as clearly as common ones."""
    n = len(labels)
    side = min(12.0, 3.0 + 0.35 * n)
    fig, ax = figure(side + 1.0, side)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= NAME_UP_TO:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
    if n <= ANNOTATE_UP_TO:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion over {int(matrix.sum())} test queries")
    save_figure(fig, path)
