"""Ledoit-Wolf and OAS shrinkage intensities in closed form, in torch, from the n x n Gram matrix (no d x d matrix)."""

from __future__ import annotations

import torch

SHRINKAGES = ("ledoit-wolf", "oas")


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, if_zero: float) -> torch.Tensor:
    """num / den where den > 0, else `if_zero`, with finite gradients on both branches."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.full_like(den, if_zero))


def shrinkage(rows: torch.Tensor, method: str, count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(intensity s, target mu) of S = X^T X / n shrunk to (1 - s) S + s mu I, X = rows (..., n, d) taken as centred.

    Equals `sklearn.covariance.LedoitWolf` / `OAS` with `assume_centered=True` on the same rows. Every trace the
    formulas need comes from the Gram matrix G = X X^T: tr S = tr G / n, tr S^2 = |G|_F^2 / n^2, and LW's
    sum_ij sum_s x_si^2 x_sj^2 = sum_s |x_s|^4. `count` (...,) overrides n where some rows are zero padding.
    """
    n_rows, d = rows.shape[-2:]
    n = torch.full(rows.shape[:-2], float(n_rows), dtype=rows.dtype, device=rows.device) if count is None \
        else count.to(rows.dtype)
    gram = rows @ rows.transpose(-1, -2)
    norms = gram.diagonal(dim1=-2, dim2=-1)  # |x_s|^2
    trace = norms.sum(-1) / n
    trace_sq = gram.pow(2).sum((-2, -1)) / n**2
    mu = trace / d
    if method == "ledoit-wolf":
        beta = (norms.pow(2).sum(-1) / n - trace_sq) / (d * n)
        delta = (trace_sq - trace**2 / d) / d
        s = _safe_ratio(torch.minimum(beta, delta), delta, 0.0)
    elif method == "oas":
        alpha = trace_sq / d**2
        num, den = alpha + mu**2, (n + 1) * (alpha - mu**2 / d)
        s = _safe_ratio(num, den, 1.0).clamp(max=1.0)
    else:
        raise ValueError(f"unknown shrinkage {method!r}; choose from {', '.join(SHRINKAGES)}")
    return s, mu
