"""Set-to-set adaptation (FEAT-style): one transformer layer over the class prototypes and, optionally, the support."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("cosine", "euclidean")


class SetToSetAttention(nn.Module):
    """Self-attention over a set of embeddings with a residual and LayerNorm; `cosine` attends by scaled cosine
    similarity of queries and keys, `euclidean` by negative squared distance."""

    def __init__(self, dim: int, variant: str = "cosine", dropout: float = 0.1) -> None:
        super().__init__()
        self.variant = variant
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.temperature = nn.Parameter(torch.tensor(10.0 if variant == "cosine" else dim**-0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.variant == "cosine":
            scores = self.temperature * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T
        else:
            scores = -self.temperature * torch.cdist(q, k).pow(2)
        attended = self.dropout(scores.softmax(-1)) @ v
        return self.norm(x + self.out(attended))
