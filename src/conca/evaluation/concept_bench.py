"""Scoring dictionaries against supervised concepts: the model-side bench (representations and
reference probes, computed once) and each dictionary's MPC, coverage, MSE and stability on it.
What `conca concepts` and `conca reproduce concepts` share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conca.dictionaries.base import Dictionary
from conca.evaluation.concepts import (
    ConceptData,
    ProbeResult,
    concept_matching,
    concept_representations,
    direction_alignment,
    fit_probes,
    rank_significance,
    reconstruction_mse,
    sufficiency,
)
from conca.models.load import LoadedModel


@dataclass
class ConceptBench:
    """Everything model-side that scoring a dictionary needs, computed once."""

    data: list[ConceptData]
    probes: list[ProbeResult]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.data]


def build_bench(loaded: LoadedModel, concepts: list, site: str, prepend_bos: bool = True, probe_c: float = 1.0,
                batch_size: int = 64, progress: bool = False) -> ConceptBench:
    data = concept_representations(loaded, concepts, site, batch_size=batch_size, prepend_bos=prepend_bos, progress=progress)
    return ConceptBench(data, fit_probes(data, C=probe_c))


def score_dictionary(dictionary: Dictionary, bench: ConceptBench, transform: str = "exp", threshold: float = 0.5,
                     rank_k: int = 32) -> dict:
    """MPC, coverage, per-concept matches, MSE on the concept words, and Alg. 2 stability."""
    import torch

    dictionary.check_input(bench.data[0].x_a)
    match = concept_matching(dictionary, bench.data, bench.probes, transform, threshold)
    words = torch.cat([c.x for c in bench.data])
    return {"mpc": match.mpc, "coverage": match.coverage, "per_concept": match.per_concept(),
            "mse_concept_words": reconstruction_mse(dictionary, words),
            "rank_significance": rank_significance(dictionary, bench.data, k=rank_k)}


def model_side(bench: ConceptBench, align_c: float, seeds: int) -> dict:
    """Dictionary-free diagnostics: probe accuracy, A_s W_s, informational sufficiency."""
    alignment = direction_alignment(bench.data, C=align_c, seeds=seeds)
    return {"probe_accuracy": {p.name: p.accuracy for p in bench.probes},
            "alignment": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in alignment.items()},
            "sufficiency": sufficiency(bench.data, seeds=seeds)}
