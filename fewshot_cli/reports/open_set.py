"""Open-set evaluation: how well the best cosine tells known from Unknown queries, and the accuracy and
unknown-rate trade-off over thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewshot_cli.reports.files import figure, fmt, save_figure, write_csv

#: thresholds in the sweep: quantiles of the queries' scores, so the curve is as fine where the queries are dense
SWEEP_POINTS = 201


@dataclass
class OpenSetScores:
    """Per scored query (all shapes (Q,)): its open-set score (best cosine to a prototype), its episode
    (category) index, whether its true class is known (1), Unknown (0) or not given (-1), and whether the head's
    class is its true class."""

    score: np.ndarray
    category: np.ndarray
    truth: np.ndarray
    head_correct: np.ndarray

    @classmethod
    def concat(cls, parts: list[OpenSetScores]) -> OpenSetScores:
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros(0)
                     for name in ("score", "category", "truth", "head_correct")))

    def at(self, threshold: float) -> tuple[float, float]:
        """(accuracy, unknown rate) at a threshold: accuracy as the run reports it, the mean over categories of
        their labelled queries' accuracy (a known query is right when accepted with its class, an Unknown one
        when rejected); unknown rate over every scored query."""
        accepted = self.score >= threshold
        right = np.where(self.truth == 1, accepted & self.head_correct.astype(bool), ~accepted)
        labelled = self.truth >= 0
        n = int(self.category.max()) + 1 if len(self.category) else 0
        correct = np.bincount(self.category[labelled].astype(int), right[labelled], minlength=n)
        counts = np.bincount(self.category[labelled].astype(int), minlength=n)
        accuracy = float((correct[counts > 0] / counts[counts > 0]).mean()) if counts.any() else 0.0
        return accuracy, float((~accepted).mean()) if len(accepted) else 0.0


def unknown_auroc(score: np.ndarray, known: np.ndarray) -> float | None:
    """The AUROC of known (True) against Unknown (False) queries ranked by score; None without both kinds."""
    from sklearn.metrics import roc_auc_score  # scikit-learn: loaded only for open-set runs

    known = np.asarray(known, dtype=bool)
    if known.all() or not known.any():
        return None
    return float(roc_auc_score(known, score))


def sweep(scores: OpenSetScores, chosen: float) -> list[tuple[float, float, float]]:
    """(threshold, accuracy, unknown rate) from accepting every query to rejecting every one, with `chosen`."""
    if not len(scores.score):
        return []
    grid = np.quantile(scores.score, np.linspace(0.0, 1.0, SWEEP_POINTS))
    thresholds = np.unique(np.concatenate([grid, [chosen, scores.score.max() + 1e-6]]))
    return [(float(t), *scores.at(float(t))) for t in thresholds]


def write_sweep(run_dir: Path, scores: OpenSetScores, chosen: float, source: str) -> None:
    """threshold_sweep.csv and threshold_sweep.png, the threshold the run used marked on both."""
    rows = sweep(scores, chosen)
    write_csv(run_dir / "threshold_sweep.csv", ["threshold", "accuracy", "unknown_rate", "chosen"],
              ([fmt(t), fmt(a), fmt(u), int(t == chosen)] for t, a, u in rows))
    fig, ax = figure(6.0, 4.0)
    if rows:
        t, a, u = (np.asarray(column) for column in zip(*rows, strict=True))
        ax.plot(t, a, label="accuracy", color="tab:blue")
        ax.plot(t, u, label="unknown rate", color="tab:orange")
        at_a, at_u = scores.at(chosen)
        ax.axvline(chosen, color="black", linestyle="--", linewidth=1)
        ax.plot([chosen, chosen], [at_a, at_u], "o", color="black")
        right = chosen > (t.min() + t.max()) / 2  # the label on the side with room
        ax.annotate(f"{source} {chosen:.3f}\naccuracy {at_a:.3f}, unknown {at_u:.3f}", (chosen, at_a),
                    textcoords="offset points", xytext=(-6 if right else 6, -28), fontsize=8,
                    ha="right" if right else "left", bbox={"boxstyle": "round", "fc": "white", "alpha": 0.85})
    ax.set_xlabel("threshold on the best cosine")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("accuracy and unknown rate over thresholds")
    ax.legend(loc="center left")
    save_figure(fig, run_dir / "threshold_sweep.png")
