"""Data-dependent initialisation shared by the dictionary methods."""

from __future__ import annotations

import torch


def geometric_median(x: torch.Tensor, iters: int = 100, eps: float = 1e-8, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x.

    Used as the decoder-bias init (Gao et al.): unlike the mean it is not dragged by the few
    high-norm outlier tokens that language-model activations have."""
    x = x.double()
    median = x.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        if (new - median).norm() <= tol * (median.norm() + eps):
            median = new
            break
        median = new
    return median.float()
