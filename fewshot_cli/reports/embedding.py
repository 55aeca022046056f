"""A picture of the embedding space: test features in 2-D (PCA or t-SNE), coloured by class, Unknown marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fewshot_cli.reports.files import figure, save_figure

#: at most this many points are drawn (a seeded sample): t-SNE's cost grows with the square of the points
MAX_POINTS = 2000
#: above this many classes the legend is left out
LEGEND_UP_TO = 20


def project(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(N, D) features to (N, 2) with scikit-learn's PCA or t-SNE (perplexity kept below N, as it must be)."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 3 or features.shape[1] < 2:
        return np.pad(features[:, :2], ((0, 0), (0, max(0, 2 - features.shape[1]))))
    if method == "tsne":
        from sklearn.manifold import TSNE  # scikit-learn: loaded only for the projection asked for

        perplexity = float(min(30.0, (len(features) - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    from sklearn.decomposition import PCA  # scikit-learn: loaded only for the projection asked for

    return PCA(n_components=2, random_state=seed).fit_transform(features)


def write_embedding_plot(path: Path, features: np.ndarray, classes: Sequence[str | None], unknown: str | None,
                         method: str, seed: int, title: str) -> None:
    """Each point a test feature (N, D); colour: its true class (N,); black crosses: true class `unknown`;
    grey: no label (None)."""
    classes = np.asarray([c if c is not None else "" for c in classes], dtype=object)
    if len(features) > MAX_POINTS:
        keep = np.sort(np.random.default_rng(seed).choice(len(features), MAX_POINTS, replace=False))
        features, classes = features[keep], classes[keep]
    points = project(features, method, seed)
    import matplotlib  # matplotlib: loaded only when a figure is drawn

    names = sorted({c for c in classes if c not in ("", unknown)})
    palette = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
    fig, ax = figure(8.0 if len(names) > 8 else 6.5, 5.0)
    for i, name in enumerate(names):
        mine = classes == name
        ax.scatter(points[mine, 0], points[mine, 1], s=12, color=palette(i % palette.N), label=name)
    for mask, style in ((classes == "", {"color": "lightgrey", "marker": "."}),
                        (classes == (unknown or ""), {"color": "black", "marker": "x"})):
        if mask.any():
            label = unknown if style["marker"] == "x" else "no label"
            ax.scatter(points[mask, 0], points[mask, 1], s=18, label=label, **style)
    if len(names) <= LEGEND_UP_TO:
        outside = len(names) > 8  # a long legend beside the points, not over them
        ax.legend(fontsize=7, markerscale=1.2, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if outside
                                                   else {"loc": "best"}))
    axis = "PC" if method == "pca" else "t-SNE "
    ax.set_xlabel(f"{axis}1")
    ax.set_ylabel(f"{axis}2")
    ax.set_title(f"{title} ({len(points)} points, {method.upper() if method == 'pca' else 't-SNE'})")
    save_figure(fig, path)
