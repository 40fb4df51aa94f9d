"""Matching latents to reference concepts: Pearson correlation, Hungarian assignment, MPC, coverage.

The metric of ConCA (App. G, Alg. 1) and I-Predict (App. H.2), as `evaluate_word_pairs.py` computes
it: for concept i with reference scores s_i over its own samples (probe log-odds, or true
log-posteriors), R[i, d] = Pearson(s_i, exp(z_d)) over those samples (0 when either side is
constant); a Hungarian assignment gives each concept a distinct latent; MPC is the mean matched
correlation and coverage@t the fraction of matched correlations above t.

exp(z) overflows for SAE latents of raw activations, so it is taken as exp(z - max z) per latent:
Pearson is invariant to scaling a column by a positive constant, so the value is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from conca.errors import InputError, ShapeError

TRANSFORMS = ("exp", "identity")


def _as_array(x: "np.ndarray | torch.Tensor") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def transform_latents(latents: "np.ndarray | torch.Tensor", transform: str = "exp") -> np.ndarray:
    """exp (stably: exp(z - max_over_samples z) per latent) or identity; (N, D) -> (N, D) float64."""
    z = _as_array(latents)
    if z.ndim != 2:
        raise ShapeError(f"latents must be (samples, latents), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise InputError("latents contain NaN or infinite values")
    if transform == "identity":
        return z
    if transform == "exp":
        return np.exp(z - z.max(axis=0, keepdims=True))
    raise InputError(f"unknown latent transform {transform!r}: choose one of {', '.join(TRANSFORMS)}")


def pearson_with_columns(scores: "np.ndarray | torch.Tensor", columns: "np.ndarray | torch.Tensor") -> np.ndarray:
    """Pearson correlation of a score vector (N,) with every column of (N, D); 0 where either is constant."""
    s, z = _as_array(scores), _as_array(columns)
    if s.ndim != 1 or z.ndim != 2 or z.shape[0] != s.shape[0]:
        raise ShapeError(f"scores (N,) and columns (N, D) must share N, got {s.shape} and {z.shape}")
    s = s - s.mean()
    z = z - z.mean(axis=0, keepdims=True)
    s_norm = np.sqrt((s * s).sum())
    z_norm = np.sqrt((z * z).sum(axis=0))
    # A column that is constant up to rounding (e.g. a dead latent after exp) is "zero std".
    scale = np.abs(_as_array(columns)).max(axis=0) * 1e-12 * np.sqrt(len(s)) + 1e-300
    ok = (z_norm > scale) & (s_norm > 0)
    out = np.zeros(z.shape[1])
    out[ok] = (s @ z[:, ok]) / (s_norm * z_norm[ok])
    return np.clip(out, -1.0, 1.0)


@dataclass
class MatchResult:
    correlations: np.ndarray  # (C, D): R[i, d]
    assignment: np.ndarray  # (C,): the latent matched to each concept (-1 if more concepts than latents)
    matched: np.ndarray  # (C,): R[i, assignment[i]] (0 where unmatched)
    threshold: float = 0.5
    names: list[str] = field(default_factory=list)

    @property
    def mpc(self) -> float:
        return float(self.matched.mean())

    @property
    def coverage(self) -> float:
        return float((self.matched > self.threshold).mean())

    def per_concept(self) -> list[dict]:
        names = self.names or [str(i) for i in range(len(self.matched))]
        return [{"concept": n, "latent": int(a), "correlation": float(c)}
                for n, a, c in zip(names, self.assignment, self.matched)]


def hungarian_match(correlations: np.ndarray, threshold: float = 0.5, names: list[str] | None = None) -> MatchResult:
    """Assign each concept (row) a distinct latent (column) maximising the summed correlation."""
    r = np.asarray(correlations, dtype=np.float64)
    if r.ndim != 2:
        raise ShapeError(f"correlation matrix must be 2-D, got shape {r.shape}")
    rows, cols = linear_sum_assignment(-r)
    assignment = np.full(r.shape[0], -1)
    assignment[rows] = cols
    matched = np.zeros(r.shape[0])
    matched[rows] = r[rows, cols]
    return MatchResult(r, assignment, matched, threshold, list(names or []))


def concept_correlations(references: "list[np.ndarray | torch.Tensor]", latents: "list[np.ndarray | torch.Tensor]",
                         transform: str = "exp") -> np.ndarray:
    """R (C, D): row i = Pearson(references[i], transform(latents[i])) over concept i's own samples."""
    if len(references) != len(latents) or not references:
        raise InputError(f"need one latent matrix per concept, got {len(references)} references and {len(latents)} latent sets")
    widths = {_as_array(z).shape[-1] for z in latents}
    if len(widths) != 1:
        raise ShapeError(f"every concept's latents must have the same width, got {sorted(widths)}")
    return np.stack([pearson_with_columns(s, transform_latents(z, transform)) for s, z in zip(references, latents)])


def mean_matched_correlation(references: "np.ndarray | torch.Tensor | list", latents: "np.ndarray | torch.Tensor | list",
                             transform: str = "exp", threshold: float = 0.5,
                             names: list[str] | None = None) -> MatchResult:
    """MPC with Hungarian matching.

    Either shared samples -- references (N, C) and latents (N, D) -- or per-concept samples --
    lists of (N_i,) references and (N_i, D) latents."""
    if isinstance(references, list):
        r = concept_correlations(references, latents, transform)
    else:
        ref, z = _as_array(references), transform_latents(latents, transform)
        if ref.ndim != 2 or ref.shape[0] != z.shape[0]:
            raise ShapeError(f"references (N, C) and latents (N, D) must share N, got {ref.shape} and {z.shape}")
        r = np.stack([pearson_with_columns(ref[:, i], z) for i in range(ref.shape[1])])
    return hungarian_match(r, threshold, names)
