"""Set-to-set adaptation (FEAT-style): one transformer layer over the class prototypes and, optionally, the support."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SetToSetAttention(nn.Module):
    """Self-attention over a set of embeddings with a residual and LayerNorm; `cosine` attends by scaled cosine
    similarity of queries and keys, `euclidean` by negative squared distance. Queries, keys and values live in an
    inner space of at most `inner_dim` (as in FS-CT's heads x dim_head), so a 25,088-dim input costs d x 512
    weights, not d x d."""

    def __init__(self, dim: int, variant: str = "cosine", dropout: float = 0.1, inner_dim: int = 512) -> None:
        super().__init__()
        self.variant = variant
        inner = min(dim, inner_dim)
        self.q, self.k, self.v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.out = nn.Linear(inner, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.temperature = nn.Parameter(torch.tensor(10.0 if variant == "cosine" else inner**-0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.variant == "cosine":
            scores = self.temperature * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T
        else:
            scores = -self.temperature * torch.cdist(q, k).pow(2)
        attended = self.dropout(scores.softmax(-1)) @ v
        return self.norm(x + self.out(attended))
