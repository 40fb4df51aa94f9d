"""Reconstruction and sparsity metrics for sparse autoencoders.

Every metric is accumulated as float64 sums so that streaming over batches gives
exactly the one-shot value, independent of batch size. Definitions (t = token,
N = tokens seen, d = activation width):

- ``mse_sum``     E_t ||x_t - x̂_t||²               (summed over dimensions, mean over tokens: the scale
                                                     of ConCA / I-Predict and of SAELens' ``mse``)
- ``mse_mean``    mse_sum / d                        (mean over dimensions too, i.e. torch's mse_loss)
- ``fvu``         Σ_t ||x_t - x̂_t||² / Σ_t ||x_t - x̄||², x̄ the per-dim mean over all tokens
- ``explained_variance``  1 - fvu
- ``cosine_similarity``   E_t cos(x_t, x̂_t), 0 where either norm is 0
- ``l2_ratio``    E_t ||x̂_t|| / ||x_t|| over tokens with ||x_t|| > 0
- ``relative_reconstruction_bias``  Σ_t ||x̂_t||² / Σ_t <x_t, x̂_t>  (Gated SAE, eq. 10)
- ``l0``          E_t #{i : z_ti != 0}
- ``l1``          E_t Σ_i |z_ti|
- ``dead_fraction``   fraction of latents never non-zero
- ``dense_fraction``  fraction of latents non-zero on > dense_threshold of tokens
- ``n_tokens``    N

Undefined ratios (zero denominator) are reported as NaN rather than guessed.

SAELens (sae_lens.evals.get_sparsity_and_variance_metrics, 6.54) reports as ``mse`` the mean over
tokens of ``(x - x_hat).pow(2).sum(dim=-1)``, which is conca's ``mse_sum``, not ``mse_mean``; its
``explained_variance`` (ExplainedVarianceCalculator: 1 - E||x - x̂||² / (E||x||² - ||E x||²)) is
conca's, and its ``cossim`` is conca's ``cosine_similarity`` wherever no norm is 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from conca.errors import CorruptDataError, InputError, ShapeError

__all__ = ["ReconstructionStats", "reconstruction_metrics"]


def _nan_div(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


class ReconstructionStats:
    """Streaming accumulator over batches; exact (float64 sums), batch-size independent."""

    def __init__(self, n_latents: int, dense_threshold: float = 0.1):
        if n_latents <= 0:
            raise InputError(f"n_latents must be positive, got {n_latents}")
        self.n_latents = int(n_latents)
        self.dense_threshold = float(dense_threshold)
        self.d: int | None = None
        self.n_tokens = 0
        self.sq_err = 0.0
        self.sum_cos = 0.0
        self.sum_l2_ratio = 0.0
        self.n_l2_ratio = 0
        self.sum_xhat_sq = 0.0
        self.sum_dot = 0.0
        self.sum_l0 = 0.0
        self.sum_l1 = 0.0
        self.fire_counts = torch.zeros(self.n_latents, dtype=torch.float64)
        self.sum_x: Tensor | None = None
        self.sum_x2: Tensor | None = None

    def update(self, x: Tensor, x_hat: Tensor, z: Tensor) -> None:
        """Add a batch: x, x_hat of shape (N, d); z of shape (N, n_latents)."""
        if x.ndim != 2 or x.shape != x_hat.shape:
            raise ShapeError(
                f"x and x_hat must both be (N, d); got x {tuple(x.shape)}, x_hat {tuple(x_hat.shape)}"
            )
        if z.ndim != 2 or z.shape[0] != x.shape[0]:
            raise ShapeError(
                f"z must be (N, n_latents) with N matching x; got z {tuple(z.shape)}, x {tuple(x.shape)}"
            )
        if z.shape[1] != self.n_latents:
            raise ShapeError(
                f"z width {z.shape[1]} != n_latents {self.n_latents} (z shape {tuple(z.shape)})"
            )
        if self.d is not None and x.shape[1] != self.d:
            raise ShapeError(f"x width {x.shape[1]} differs from earlier batches' width {self.d}")

        x = x.detach().to("cpu", torch.float64)
        x_hat = x_hat.detach().to("cpu", torch.float64)
        z = z.detach().to("cpu", torch.float64)
        if not torch.isfinite(x).all():
            raise CorruptDataError("non-finite activations (NaN or inf) in x")

        if self.d is None:
            self.d = x.shape[1]
            self.sum_x = torch.zeros(self.d, dtype=torch.float64)
            self.sum_x2 = torch.zeros(self.d, dtype=torch.float64)

        self.n_tokens += x.shape[0]
        self.sq_err += float(((x - x_hat) ** 2).sum())
        # Per-dimension moments rather than a running mean so FVU uses the mean
        # over ALL tokens, which a per-batch mean would not give.
        self.sum_x += x.sum(0)
        self.sum_x2 += (x**2).sum(0)

        x_norm = x.norm(dim=1)
        xh_norm = x_hat.norm(dim=1)
        dot = (x * x_hat).sum(1)
        both = (x_norm > 0) & (xh_norm > 0)
        self.sum_cos += float((dot[both] / (x_norm[both] * xh_norm[both])).sum())
        nz = x_norm > 0
        self.sum_l2_ratio += float((xh_norm[nz] / x_norm[nz]).sum())
        self.n_l2_ratio += int(nz.sum())
        self.sum_xhat_sq += float((xh_norm**2).sum())
        self.sum_dot += float(dot.sum())

        active = z != 0
        self.sum_l0 += float(active.sum())
        self.sum_l1 += float(z.abs().sum())
        self.fire_counts += active.sum(0, dtype=torch.float64)

    def firing_frequency(self) -> Tensor:
        """(n_latents,) float64: fraction of tokens seen on which each latent was non-zero."""
        if self.n_tokens == 0:
            raise InputError("no tokens seen: call update() before firing_frequency()")
        return self.fire_counts / self.n_tokens

    def compute(self) -> dict[str, float]:
        """All metrics over every token seen so far (see module docstring for definitions)."""
        if self.n_tokens == 0 or self.d is None:
            raise InputError("no tokens seen: call update() before compute()")
        n = self.n_tokens
        # Σ_t ||x_t - x̄||² = Σ_dims (Σx² - (Σx)²/N); clamp tiny negative rounding.
        total_var = float((self.sum_x2 - self.sum_x**2 / n).sum().clamp_min(0.0))
        fvu = _nan_div(self.sq_err, total_var)
        freq = self.firing_frequency()
        mse_sum = self.sq_err / n
        return {
            "mse_sum": mse_sum,
            "mse_mean": mse_sum / self.d,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cosine_similarity": self.sum_cos / n,
            "l2_ratio": _nan_div(self.sum_l2_ratio, self.n_l2_ratio),
            "relative_reconstruction_bias": _nan_div(self.sum_xhat_sq, self.sum_dot),
            "l0": self.sum_l0 / n,
            "l1": self.sum_l1 / n,
            "dead_fraction": float((self.fire_counts == 0).double().mean()),
            "dense_fraction": float((freq > self.dense_threshold).double().mean()),
            "n_tokens": float(n),
        }


def reconstruction_metrics(
    x: Tensor, x_hat: Tensor, z: Tensor, dense_threshold: float = 0.1
) -> dict[str, float]:
    """One-shot convenience wrapper around ReconstructionStats."""
    if z.ndim != 2:
        raise ShapeError(f"z must be (N, n_latents); got z {tuple(z.shape)}")
    stats = ReconstructionStats(z.shape[1], dense_threshold)
    stats.update(x, x_hat, z)
    return stats.compute()
