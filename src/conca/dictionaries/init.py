"""Data-dependent initialisation shared by the dictionary methods."""

from __future__ import annotations

import torch
from torch import nn


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


def tied_linear_init(d_in: int, n_latents: int, d_out: int, transcoder: bool, decoder_norm: float = 1.0) -> tuple[nn.Parameter, nn.Parameter]:
    """(W_enc (d_in, n), W_dec (n, d_out)): decoder rows random with norm `decoder_norm`, encoder
    tied to W_dec^T (Conerly et al.; Gao et al.), or a random scaled matrix for transcoders, whose
    input and output spaces differ."""
    w_dec = torch.randn(n_latents, d_out)
    w_dec *= decoder_norm / w_dec.norm(dim=1, keepdim=True)
    w_enc = torch.randn(d_in, n_latents) / d_in**0.5 if transcoder else w_dec.T
    # Stored latent-major (W_enc.T contiguous): the sparse encoder backward gathers whole latent
    # columns of W_enc, and the dense forward matmul is as fast in either layout.
    return nn.Parameter(w_enc.T.clone(memory_format=torch.contiguous_format).T), nn.Parameter(w_dec)


def remove_radial_grad_(weight: nn.Parameter) -> None:
    """Drop the gradient component along each (unit) row: it would only change norms that the
    renormalisation after the step undoes, and it would bias Adam's moment estimates."""
    if weight.grad is not None:
        w = weight.data
        weight.grad -= (weight.grad * w).sum(1, keepdim=True) * w


@torch.no_grad()
def renormalise_rows_(weight: nn.Parameter) -> None:
    weight /= weight.norm(dim=1, keepdim=True).clamp_min(1e-8)
