"""Few-shot classification heads: cosine, euclidean and Simple-CNAPS Mahalanobis (dense or low-rank exact)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_cli.models.shrinkage import shrinkage


def prototypes(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means of the support embeddings, (n_way, d)."""
    one_hot = F.one_hot(labels, n_way).to(support.dtype)
    return (one_hot.T @ support) / one_hot.sum(0, keepdim=True).T


class FewShotHead(nn.Module):
    """Two verbs: `process_support_set(support, labels, n_way)`, then `forward(query)` gives (m, n_way) logits."""

    def process_support_set(self, support: torch.Tensor, labels: torch.Tensor, n_way: int,
                            centres: torch.Tensor | None = None) -> None:
        self.centres = prototypes(support, labels, n_way) if centres is None else centres


class CosineHead(FewShotHead):
    def __init__(self, scale: float = 10.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(query, dim=-1) @ F.normalize(self.centres, dim=-1).T


class EuclideanHead(FewShotHead):
    """Logits -||q - c_k|| (`squared=False`, easyfsl's) or -||q - c_k||^2 (the ProtoNet paper's), (m, n_way)."""

    def __init__(self, squared: bool = True) -> None:
        super().__init__()
        self.squared = squared

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        distance = torch.cdist(query, self.centres)
        return -distance.pow(2) if self.squared else -distance


class MahalanobisHead(FewShotHead):
    """Logits -d_k(x), d_k(x) = (x - c_k)^T Q_k^{-1} (x - c_k), with Q_k = a_k I + w_k C_k^T C_k + v_k S^T S.

    `ledoit-wolf` / `oas` (LDA with shrinkage): one Q for every class, the pooled within-class covariance (support
    rows minus their class mean, S) shrunk towards mu I with the closed-form intensity, plus `ridge` times the
    features' mean variance; the distance is divided by d and multiplied by a learnt temperature. With one shot the
    within-class scatter is empty and the head is euclidean over the features' variance. `simple-cnaps`: Q_k = l_k S_k
    + (1 - l_k) S_task + beta I, l_k = n_k / (n_k + 1), C_k class k's centred rows, S about the task mean (with one
    shot the class term vanishes and S_task, mostly between-class scatter, is what is left).
    `dense` builds the d x d matrices and solves with a batched Cholesky factor; `lowrank` never forms them: Woodbury
    gives the same distance from Gram matrices of the support and queries.
    """

    def __init__(self, beta: float = 1.0, covariance: str = "auto", on_fallback: Callable[..., None] | None = None,
                 estimator: str = "ledoit-wolf", ridge: float = 10.0) -> None:
        super().__init__()
        self.beta, self.covariance, self.estimator, self.ridge = float(beta), covariance, estimator, float(ridge)
        self.on_fallback = on_fallback or (lambda **fields: None)
        # the shrinkage estimators' distances do not change with the features' scale, so the network cannot set the
        # softmax temperature through them as it can with euclidean: a learnt one does, starting where cosine's does
        self.temperature = nn.Parameter(torch.tensor(10.0)) if estimator != "simple-cnaps" else None

    def process_support_set(self, support: torch.Tensor, labels: torch.Tensor, n_way: int,
                            centres: torch.Tensor | None = None) -> None:
        super().process_support_set(support, labels, n_way, centres)
        n, d = support.shape
        one_hot = F.one_hot(labels, n_way)
        counts = one_hot.sum(0).to(support.dtype)
        within = support - prototypes(support, labels, n_way)[labels]
        self.origin = support.mean(0)
        if self.estimator == "simple-cnaps":
            self.class_rows = by_class(within, labels, one_hot)  # (N, kmax, d)
            self.shared_rows, class_w, shared_w, scale = self._simple_cnaps(support, counts)
        else:
            self.class_rows = within.new_zeros(n_way, 0, d)  # no class term: one pooled covariance
            self.shared_rows, class_w, shared_w, scale = self._shrunk(support, within, n_way)
        self.class_w, self.shared_w, self.scale = class_w, shared_w, scale
        mode = self.covariance
        if mode == "auto":
            mode = "lowrank" if d > n else "dense"
        self.mode = mode
        if mode == "lowrank":
            self._prepare_lowrank()
        else:
            self._prepare_dense()

    def _simple_cnaps(self, support: torch.Tensor, counts: torch.Tensor):
        n = support.shape[0]
        lam = counts / (counts + 1.0)
        class_w = torch.where(counts > 1, lam / (counts - 1).clamp(min=1), torch.zeros_like(lam))
        shared_w = (1 - lam) * ((1.0 / (n - 1)) if n > 1 else 0.0)
        return support - self.origin, class_w, shared_w, torch.full_like(lam, self.beta)

    def _shrunk(self, support: torch.Tensor, within: torch.Tensor, n_way: int):
        """Pooled within-class covariance shrunk towards mu I (Ledoit-Wolf or OAS), plus the ridge; one Q for all."""
        n = support.shape[0]
        s, mu = shrinkage(within, self.estimator)
        # the features' scale: their mean variance about the task mean (about zero when there is one support point)
        spread = (support - self.origin) if n > 1 else support
        variance = spread.pow(2).mean()
        self.variance = torch.where(variance > 0, variance, torch.ones_like(variance))
        scale = (s * mu + self.ridge * self.variance).expand(n_way)
        return within, torch.zeros_like(scale), ((1 - s) / n).expand(n_way), scale

    def _prepare_lowrank(self) -> None:
        c, s = self.class_rows, self.shared_rows
        cw, sw = _root(self.class_w)[:, None, None], _root(self.shared_w)[:, None, None]
        k, n_way = c.shape[1], c.shape[0]
        cross = cw * sw * (c @ s.T)  # (N, k, n)
        small = torch.cat([torch.cat([cw**2 * (c @ c.transpose(1, 2)), cross], 2),
                           torch.cat([cross.transpose(1, 2), sw**2 * (s @ s.T).expand(n_way, -1, -1)], 2)], 1)
        eye = torch.eye(k + s.shape[0], dtype=c.dtype, device=c.device)
        self.small_chol = torch.linalg.cholesky(small + self.scale[:, None, None] * eye)

    def _prepare_dense(self) -> None:
        c, s = self.class_rows, self.shared_rows
        factors = torch.cat([_root(self.class_w)[:, None, None] * c,
                             _root(self.shared_w)[:, None, None] * s.expand(c.shape[0], -1, -1)], 1)  # U_k^T
        cov = factors.transpose(1, 2) @ factors  # (N, d, d): the only d x d matrices besides their factors
        cov.diagonal(dim1=-2, dim2=-1).add_(self.scale[:, None])  # in place: no d x d identity allocated
        chol, info = torch.linalg.cholesky_ex(cov)
        jitter = float(self.scale.min()) * 1e-6 or 1e-6
        tries = 0
        while bool((info > 0).any()) and tries < 3:
            tries += 1
            cov = cov.clone()
            cov.diagonal(dim1=-2, dim2=-1).add_(jitter)
            self.on_fallback(kind="jitter", jitter=jitter, classes=int((info > 0).sum()))
            chol, info = torch.linalg.cholesky_ex(cov)
            jitter *= 100
        self.chol, self.precision = chol, None
        if bool((info > 0).any()):
            self.on_fallback(kind="pinv", classes=int((info > 0).sum()))
            self.precision = torch.linalg.pinv(cov, hermitian=True)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        dist = self.distances(query)
        if self.temperature is not None:
            # a d_k is |x - c_k|^2 / a where the covariance is isotropic: in units of the features' variance per
            # dimension, the logits' scale is the temperature's whatever the ridge
            dist = dist * (self.temperature / query.shape[1] * self.scale / self.variance)[:, None]
        return -dist.T

    def distances(self, query: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of every query to every class, (N, m)."""
        if self.mode == "lowrank":
            return self._lowrank_distances(query)
        diff = query[None] - self.centres[:, None]  # (N, m, d)
        if self.precision is not None:
            dist = torch.einsum("kmd,kde,kme->km", diff, self.precision, diff)
        else:
            z = torch.linalg.solve_triangular(self.chol, diff.transpose(1, 2), upper=False)  # (N, d, m)
            dist = z.pow(2).sum(1)
        return dist

    def _lowrank_distances(self, query: torch.Tensor) -> torch.Tensor:
        """(N, m) by Woodbury, matrix-free: nothing larger than the queries and support is formed. Centring on the
        support mean first keeps |x - c|^2 = |x|^2 - 2 x.c + |c|^2 free of cancellation from a common offset."""
        q, c = query - self.origin, self.centres - self.origin
        rows_c, rows_s = self.class_rows, self.shared_rows
        sq = q.pow(2).sum(1)[None] - 2 * c @ q.T + c.pow(2).sum(1)[:, None]  # (N, m)
        proj_c = rows_c @ q.T - (rows_c @ c[:, :, None])  # (N, k, m)
        proj_s = (rows_s @ q.T)[None] - (rows_s @ c.T).T[:, :, None]  # (N, n, m)
        w = torch.cat([_root(self.class_w)[:, None, None] * proj_c, _root(self.shared_w)[:, None, None] * proj_s], 1)
        z = torch.linalg.solve_triangular(self.small_chol, w, upper=False)
        return (sq - z.pow(2).sum(1)) / self.scale[:, None]


def _root(weights: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) gradient where the weight is zero."""
    positive = weights > 0
    return torch.where(positive, torch.where(positive, weights, torch.ones_like(weights)).sqrt(),
                       torch.zeros_like(weights))


def by_class(rows: torch.Tensor, labels: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """(N, kmax, d): class k's rows first, zero rows after them where a class has fewer than kmax."""
    position = (one_hot.cumsum(0) - 1).gather(1, labels[:, None]).squeeze(1)
    out = rows.new_zeros(one_hot.shape[1], int(one_hot.sum(0).max()), rows.shape[1])
    return out.index_put((labels, position), rows)


def build_head(name: str, beta: float = 1.0, covariance: str = "auto",
               on_fallback: Callable[..., None] | None = None, estimator: str = "ledoit-wolf",
               ridge: float = 10.0, squared: bool = True) -> FewShotHead:
    if name == "cosine":
        return CosineHead()
    if name == "euclidean":
        return EuclideanHead(squared)
    return MahalanobisHead(beta, covariance, on_fallback, estimator, ridge)


def covariance_bytes(n_way: int, dim: int, support: int, mode: str, element: int = 4) -> int:
    """What the covariance term of one episode holds at once: N d x d matrices and their Cholesky factors (dense),
    or the class rows (N x k x d), the shared rows (n x d) and N r x r systems, r = k + n (low-rank)."""
    if mode == "dense":
        return 2 * n_way * dim * dim * element
    k = -(-support // n_way)
    r = k + support
    return (n_way * k * dim + support * dim + 2 * n_way * r * r) * element
