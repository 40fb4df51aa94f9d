"""Does a latent come back in another run? Its best decoder-direction match in another dictionary.

For each latent j of `dictionary`, the other dictionary's latent whose decoder direction has the
largest |cosine| with j's (the sign is ignored: a latent and its negation describe one axis), and
that |cosine|. As a one-number summary, the mean |cosine| of a one-to-one (Hungarian) matching, which
no latent can share; it needs the full L x L' matrix, so above `HUNGARIAN_MAX` latents it is left out
(None, with a note) rather than run for minutes.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from conca.dictionaries.base import Dictionary
from conca.errors import ShapeError

HUNGARIAN_MAX = 4096
# Rows of `dictionary` per chunk of the cosine matrix: chunk x L' float32 stays near 64 MiB.
_CHUNK_BYTES = 64 * 2**20


def _unit_rows(directions: torch.Tensor) -> torch.Tensor:
    directions = directions.detach().float().cpu()
    return directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero row has cosine 0


def seed_stability(dictionary: Dictionary, other: Dictionary, hungarian_max: int = HUNGARIAN_MAX) -> dict:
    """{"cosine": (L,) best |cos| per latent, "partner": (L,) the other's latent that gives it,
    "hungarian_mean": mean |cos| of the one-to-one matching (None above `hungarian_max` latents),
    "note": why it is missing, or ""}."""
    mine, theirs = _unit_rows(dictionary.decoder_directions), _unit_rows(other.decoder_directions)
    if mine.shape[1] != theirs.shape[1]:
        raise ShapeError(f"cannot compare decoder directions of width {mine.shape[1]} ({dictionary.name}) and "
                         f"{theirs.shape[1]} ({other.name}): the dictionaries write different sites or models")
    chunk = max(1, _CHUNK_BYTES // (4 * len(theirs)))
    cosine = np.empty(len(mine), dtype=np.float32)
    partner = np.empty(len(mine), dtype=np.int64)
    for start in range(0, len(mine), chunk):
        best = (mine[start:start + chunk] @ theirs.T).abs().max(dim=1)
        cosine[start:start + chunk] = best.values.numpy()
        partner[start:start + chunk] = best.indices.numpy()
    hungarian, note = None, ""
    if max(len(mine), len(theirs)) <= hungarian_max:
        similarity = (mine.double() @ theirs.double().T).abs().numpy()
        rows, cols = linear_sum_assignment(-similarity)
        hungarian = float(similarity[rows, cols].mean())
    else:
        note = (f"one-to-one (Hungarian) mean left out: {max(len(mine), len(theirs))} latents, more than "
                f"{hungarian_max} (its L x L matrix and cubic time)")
    return {"cosine": np.clip(cosine, 0.0, 1.0), "partner": partner, "hungarian_mean": hungarian, "note": note}
