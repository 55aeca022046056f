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
    from sklearn.metrics import (  # scikit-learn: loaded only when a confusion matrix is written
        confusion_matrix,
        precision_recall_fscore_support,
    )

    if not pairs:
        return
    labels = list(labels)
    y_true, y_pred = zip(*pairs, strict=True)
    weights = np.asarray(list(pairs.values()), dtype=np.int64)
    matrix = confusion_matrix(y_true, y_pred, labels=labels, sample_weight=weights)
    write_csv(run_dir / "confusion.csv", ["true \\ predicted", *labels],
              ([name, *row.tolist()] for name, row in zip(labels, matrix, strict=True)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                     sample_weight=weights, zero_division=0)
    rows = [[name, fmt(p), fmt(r), fmt(f), int(s)]
            for name, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)]
    write_csv(run_dir / "per_class.csv", ["class", "precision", "recall", "f1", "support"], rows)
    plot_confusion(run_dir / "confusion.png", matrix, labels)


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
