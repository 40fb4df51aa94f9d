"""Does a latent come back in another run? Its best decoder-direction match in another dictionary.

For each latent j of `dictionary`, the other dictionary's latent whose decoder direction has the
largest |cosine| with j's (the sign is ignored: a latent and its negation describe one axis), and
that |cosine|. As a one-number summary, the mean |cosine| of a one-to-one (Hungarian) matching, which
no latent can share; it needs the full L x L' matrix, so above `HUNGARIAN_MAX` latents it is left out
(None, with a note) rather than run for minutes. The computation is conca.evaluation's (the
across-seed stability of `conca reproduce`: conca.evaluation.stability), run pairwise here.
"""

from __future__ import annotations

from conca.dictionaries.base import Dictionary
from conca.errors import ShapeError
from conca.evaluation.latent_matching import HUNGARIAN_MAX, match_directions

# Rows of `dictionary` per chunk of the cosine matrix: chunk x L' float32 stays near 64 MiB.
_CHUNK_BYTES = 64 * 2**20


def seed_stability(dictionary: Dictionary, other: Dictionary, hungarian_max: int = HUNGARIAN_MAX) -> dict:
    """{"cosine": (L,) best |cos| per latent, "partner": (L,) the other's latent that gives it,
    "hungarian_mean": mean |cos| of the one-to-one matching (None above `hungarian_max` latents),
    "note": why it is missing, or ""}."""
    mine, theirs = dictionary.decoder_directions, other.decoder_directions
    if mine.shape[1] != theirs.shape[1]:
        raise ShapeError(f"cannot compare decoder directions of width {mine.shape[1]} ({dictionary.name}) and "
                         f"{theirs.shape[1]} ({other.name}): the dictionaries write different sites or models")
    match = match_directions(mine, theirs, block_bytes=_CHUNK_BYTES, hungarian_max=hungarian_max, approximate=False)
    return {"cosine": match.row_best, "partner": match.row_partner, "hungarian_mean": match.matched_mean,
            "note": match.note}
