"""Heads over frozen embeddings: cosine to class prototypes, a logistic-regression linear probe (as CLIP's paper
evaluates embeddings), and k-nearest neighbours. Each fits on the support set and scores queries per class."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prototypes(support_by_class: list[np.ndarray]) -> np.ndarray:
    """(C, D): per class the mean of its L2-normalised support embeddings, normalised so a dot is a cosine."""
    return l2_normalise(np.stack([l2_normalise(e).mean(axis=0) for e in support_by_class]))


class FrozenHead(ABC):
    """`fit` on the support set (L2-normalised embeddings), then `scores` of queries: higher is likelier."""

    @abstractmethod
    def fit(self, support: np.ndarray, labels: np.ndarray, n_classes: int) -> FrozenHead:
        """support (N, D), labels (N,) in 0..n_classes-1, every class present."""

    @abstractmethod
    def scores(self, queries: np.ndarray) -> np.ndarray:
        """queries (Q, D) -> (Q, n_classes)."""


class PrototypeHead(FrozenHead):
    """Cosine to each class's prototype."""

    def fit(self, support: np.ndarray, labels: np.ndarray, n_classes: int) -> PrototypeHead:
        self.protos = prototypes([support[labels == c] for c in range(n_classes)])
        return self

    def scores(self, queries: np.ndarray) -> np.ndarray:
        return l2_normalise(queries) @ self.protos.T


class LogisticHead(FrozenHead):
    """scikit-learn's LogisticRegression (L-BFGS, L2 penalty of strength 1/C) on L2-normalised embeddings;
    scores are its class probabilities."""

    def __init__(self, c: float) -> None:
        self.c = c

    def fit(self, support: np.ndarray, labels: np.ndarray, n_classes: int) -> LogisticHead:
        from sklearn.linear_model import LogisticRegression  # scikit-learn: loaded only by the head that uses it

        self.n_classes = n_classes
        if n_classes > 1:  # one class has nothing to separate: every query scores 1 for it
            self.model = LogisticRegression(C=self.c, max_iter=1000).fit(l2_normalise(support), labels)
        return self

    def scores(self, queries: np.ndarray) -> np.ndarray:
        if self.n_classes == 1:
            return np.ones((len(queries), 1))
        return self.model.predict_proba(l2_normalise(queries))


class KnnHead(FrozenHead):
    """scikit-learn's KNeighborsClassifier by cosine distance; scores are the share of the k nearest shots
    (all shots when fewer) of each class."""

    def __init__(self, k: int) -> None:
        self.k = k

    def fit(self, support: np.ndarray, labels: np.ndarray, n_classes: int) -> KnnHead:
        from sklearn.neighbors import KNeighborsClassifier  # scikit-learn: loaded only by the head that uses it

        self.model = KNeighborsClassifier(n_neighbors=min(self.k, len(support)), metric="cosine",
                                          algorithm="brute").fit(l2_normalise(support), labels)
        return self

    def scores(self, queries: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(l2_normalise(queries))


def build_frozen_head(name: str, neighbours: int, probe_c: float) -> FrozenHead:
    if name == "logistic":
        return LogisticHead(probe_c)
    if name == "knn":
        return KnnHead(neighbours)
    return PrototypeHead()
