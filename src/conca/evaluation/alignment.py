"""How well concepts are bound to latents (SPEC §4.4): slot binding accuracy, the confusion matrix
and its diagonal accuracy, and concept fragmentation.

  slot accuracy      mean[argmax_c score[n, c] == concept[n]]
  confusion          C[p, t] = #(predicted p, true t), columns normalised; diagonal accuracy =
                     trace / n_concepts (the released `05_evaluate_sae.py`)
  fragmentation      A[c, k] = mean activation of feature k on samples of concept c;
                     B_c = max(A_c, 0) / sum_k max(A_c, 0); effective features exp(H(B_c)),
                     top-1 concentration max_k B_c,k (`compute_concept_fragmentation.py`)

For an unsupervised dictionary, `matched_features` picks one feature per concept (Hungarian on
the concepts' mean activations, each feature used once) so that the same binding metrics apply.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from conca.errors import ShapeError


def _check(scores: torch.Tensor, concepts: torch.Tensor) -> None:
    if scores.ndim != 2 or concepts.ndim != 1 or len(scores) != len(concepts):
        raise ShapeError(f"scores (N, C) and concepts (N,) must share N, got {tuple(scores.shape)} and "
                         f"{tuple(concepts.shape)}")


def slot_accuracy(scores: torch.Tensor, concepts: torch.Tensor) -> float:
    """Share of samples whose highest-scoring slot is their concept (nan when empty)."""
    _check(scores, concepts)
    if len(concepts) == 0:
        return float("nan")
    return float((scores.argmax(-1) == concepts).float().mean())


def confusion_matrix(scores: torch.Tensor, concepts: torch.Tensor, n_concepts: int) -> np.ndarray:
    """(predicted, true) counts, each true-concept column normalised to sum 1 (0 where empty)."""
    _check(scores, concepts)
    counts = np.zeros((n_concepts, n_concepts))
    np.add.at(counts, (scores.argmax(-1).numpy(), concepts.numpy()), 1)
    totals = counts.sum(0, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def diagonal_accuracy(scores: torch.Tensor, concepts: torch.Tensor, n_concepts: int) -> float:
    return float(np.trace(confusion_matrix(scores, concepts, n_concepts)) / n_concepts)


def concept_means(latents: torch.Tensor, concepts: torch.Tensor, n_concepts: int) -> torch.Tensor:
    """(n_concepts, K): A[c, k] = mean of feature k over the samples of concept c."""
    _check(latents, concepts)
    means = torch.zeros(n_concepts, latents.shape[1], dtype=torch.float64)
    for c in range(n_concepts):
        rows = concepts == c
        if rows.any():
            means[c] = latents[rows].double().mean(0)
    return means


def fragmentation(latents: torch.Tensor, concepts: torch.Tensor, n_concepts: int) -> dict[str, list[float]]:
    """Per concept: effective number of features and top-1 concentration of its mean positive
    activation (1 feature carrying everything: 1.0 and 1.0)."""
    positive = concept_means(latents, concepts, n_concepts).clamp_min(0.0)
    totals = positive.sum(1, keepdim=True)
    share = torch.where(totals > 0, positive / totals.clamp_min(1e-300), torch.zeros_like(positive))
    entropy = -(share * torch.where(share > 0, share.log(), torch.zeros_like(share))).sum(1)
    dead = totals.squeeze(1) == 0
    effective = torch.where(dead, torch.full_like(entropy, float("nan")), entropy.exp())
    top1 = torch.where(dead, torch.full_like(entropy, float("nan")), share.max(1).values)
    return {"effective_features": effective.tolist(), "top1_concentration": top1.tolist()}


def matched_features(latents: torch.Tensor, concepts: torch.Tensor, n_concepts: int) -> list[int]:
    """One distinct feature per concept: the assignment maximising the summed selectivity
    (a concept's mean activation minus the mean over the other concepts)."""
    means = concept_means(latents, concepts, n_concepts).numpy()
    if means.shape[1] < n_concepts:
        raise ShapeError(f"{means.shape[1]} features cannot be matched to {n_concepts} concepts")
    others = (means.sum(0, keepdims=True) - means) / max(n_concepts - 1, 1)
    selectivity = means - others
    rows, cols = linear_sum_assignment(-selectivity)
    order = np.argsort(rows)
    return [int(c) for c in cols[order]]
