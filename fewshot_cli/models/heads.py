"""Few-shot classification heads: cosine, euclidean and Simple-CNAPS Mahalanobis (dense or low-rank exact)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


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
    def forward(self, query: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(query, self.centres).pow(2)


class MahalanobisHead(FewShotHead):
    """Simple CNAPS: Q_k = l_k S_k + (1 - l_k) S_task + beta I with l_k = n_k / (n_k + 1); logits -d_k(x).

    With one shot the class covariance is undefined and its term vanishes (Q_k = S_task / 2 + beta I).
    `dense` builds the d x d matrices and solves with a batched Cholesky factor; `lowrank` never forms them:
    Q_k = beta I + U_k U_k^T with rank r = n_k + n, and Woodbury gives the same distance in O(d r) memory.
    """

    def __init__(self, beta: float = 1.0, covariance: str = "auto",
                 on_fallback: Callable[..., None] | None = None) -> None:
        super().__init__()
        self.beta, self.covariance = float(beta), covariance
        self.on_fallback = on_fallback or (lambda **fields: None)

    def process_support_set(self, support: torch.Tensor, labels: torch.Tensor, n_way: int,
                            centres: torch.Tensor | None = None) -> None:
        super().process_support_set(support, labels, n_way, centres)
        n, d = support.shape
        counts = F.one_hot(labels, n_way).sum(0)
        self.lam = counts / (counts + 1.0)  # (N,)
        task_centred = support - support.mean(0, keepdim=True)
        task_scale = (1.0 / (n - 1)) if n > 1 else 0.0
        class_centred = support - prototypes(support, labels, n_way)[labels]
        # (N, n, d): class k keeps its own centred rows and zeros elsewhere; a zero row adds nothing to a covariance
        member = F.one_hot(labels, n_way).T.to(support.dtype)
        rows = member[:, :, None] * class_centred[None]
        class_scale = torch.where(counts > 1, 1.0 / (counts - 1).clamp(min=1), torch.zeros_like(self.lam))
        mode = self.covariance
        if mode == "auto":
            mode = "lowrank" if d > n else "dense"
        self.mode = mode
        w_class = (self.lam * class_scale).sqrt()[:, None, None]  # (N,1,1)
        w_task = ((1 - self.lam) * task_scale).sqrt()[:, None, None]
        # U_k^T as rows: (N, 2n, d)
        factors = torch.cat([w_class * rows, w_task * task_centred.expand(n_way, n, d)], dim=1)
        if mode == "lowrank":
            self._prepare_lowrank(factors)
        else:
            self._prepare_dense(factors)

    def _prepare_lowrank(self, factors: torch.Tensor) -> None:
        r = factors.shape[1]
        small = factors @ factors.transpose(1, 2)  # (N, r, r) = U^T U
        small = small + self.beta * torch.eye(r, dtype=factors.dtype, device=factors.device)
        self.factors, self.small_chol = factors, torch.linalg.cholesky(small)

    def _prepare_dense(self, factors: torch.Tensor) -> None:
        cov = factors.transpose(1, 2) @ factors  # (N, d, d)
        cov.diagonal(dim1=-2, dim2=-1).add_(self.beta)  # in place: no d x d identity allocated
        chol, info = torch.linalg.cholesky_ex(cov)
        jitter = self.beta * 1e-6
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
        diff = query[None] - self.centres[:, None]  # (N, m, d)
        if self.mode == "lowrank":
            w = diff @ self.factors.transpose(1, 2)  # (N, m, r)
            z = torch.linalg.solve_triangular(self.small_chol, w.transpose(1, 2), upper=False)  # (N, r, m)
            dist = (diff.pow(2).sum(-1) - z.pow(2).sum(1)) / self.beta
        elif self.precision is not None:
            dist = torch.einsum("kmd,kde,kme->km", diff, self.precision, diff)
        else:
            z = torch.linalg.solve_triangular(self.chol, diff.transpose(1, 2), upper=False)  # (N, d, m)
            dist = z.pow(2).sum(1)
        return -dist.T


def build_head(name: str, beta: float = 1.0, covariance: str = "auto",
               on_fallback: Callable[..., None] | None = None) -> FewShotHead:
    if name == "cosine":
        return CosineHead()
    if name == "euclidean":
        return EuclideanHead()
    return MahalanobisHead(beta, covariance, on_fallback)


def covariance_bytes(n_way: int, dim: int, support: int, mode: str, element: int = 4) -> int:
    """What the covariance term of one episode holds at once: N d x d matrices and their Cholesky factors (dense),
    or N d x r factors and r x r systems (low-rank)."""
    if mode == "dense":
        return 2 * n_way * dim * dim * element
    r = 2 * support  # class rows (zero outside the class) and task rows
    return n_way * (dim * r + 2 * r * r) * element
