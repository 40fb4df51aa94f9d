"""Concept direction recovery: does some latent *write* along a concept's direction?

The theory (SPEC §1) has f(x) ≈ A·[log p(z_i|x)] + b: contexts that differ in one concept differ, on
average, along that concept's column of A, so a concept's mean-difference direction
Δμ_c = mean(x | side B) − mean(x | side A) (the A_s row of the A_s W_s diagnostic) is what a
dictionary's decoder should contain. `direction_recovery` is, per concept, the largest |cos| between
Δμ_c and any decoder direction, averaged over concepts.

It complements MPC, which asks whether one latent's *activation* tracks the concept's probe across
the concept's words: a sparse latent can write exactly along Δμ_c yet fire on few of those words,
which MPC scores low. Random directions already reach some |cos| by chance (about 0.14 for 1,152
latents at d = 576), so it is read against the untrained floor like MPC.
"""

from __future__ import annotations

import torch

from conca.dictionaries.base import Dictionary


def mean_difference_directions(data: list) -> torch.Tensor:
    """(n_concepts, d): each concept's unit Δμ = mean(x_b) − mean(x_a) (ConceptData)."""
    rows = [c.x_b.double().mean(0) - c.x_a.double().mean(0) for c in data]
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def direction_recovery(dictionary: Dictionary, directions: torch.Tensor) -> dict:
    """{"direction_recovery": mean over concepts of max_j |cos(decoder_j, Δμ_c)|, "per_concept_direction":
    [{"latent", "cosine"} per concept]}; empty when the decoder writes elsewhere (a transcoder's output)."""
    with torch.no_grad():
        decoder = dictionary.decoder_directions.detach().double().cpu()
    if decoder.shape[1] != directions.shape[1]:
        return {}
    cos = torch.nn.functional.normalize(decoder, dim=1) @ directions.T  # (n_latents, n_concepts)
    best, latent = cos.abs().max(dim=0)
    per_concept = [{"latent": int(j), "cosine": float(cos[j, c])} for c, j in enumerate(latent.tolist())]
    return {"direction_recovery": float(best.mean()), "per_concept_direction": per_concept}


__all__ = ["mean_difference_directions", "direction_recovery"]
