"""Scoring dictionaries against supervised concepts: the model-side bench (representations and
reference probes, computed once) and each dictionary's MPC, coverage, MSE and stability on it.
What `conca concepts` and `conca reproduce concepts` share."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from conca.dictionaries.base import Dictionary
from conca.evaluation.concepts import (
    ConceptData,
    ProbeResult,
    concept_representations,
    direction_alignment,
    encode_all,
    fit_probes,
    rank_significance,
    reconstruction_mse,
    sufficiency,
)
from conca.evaluation.concept_directions import direction_recovery, mean_difference_directions
from conca.evaluation.floors import lifts, permutation_floor, untrained_floor
from conca.evaluation.heldout import HeldoutSplits, heldout_matching, pair_groups, probe_splits
from conca.evaluation.matching import hungarian_match, pearson_with_columns, transform_latents
from conca.models.load import LoadedModel


@dataclass
class ConceptBench:
    """Everything model-side that scoring a dictionary needs, computed once."""

    data: list[ConceptData]
    probes: list[ProbeResult]
    splits: HeldoutSplits | None = None  # per-fold probes of held-out recovery (None: folds = 0)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.data]


def bench_from_data(data: list[ConceptData], probe_c: float = 1.0, folds: int = 5, fold_seed: int = 0) -> ConceptBench:
    """In-sample probes (the papers') and, with folds >= 2, the per-fold probes of held-out recovery."""
    splits = None
    if folds:
        splits = probe_splits([c.x.double().numpy() for c in data], [c.labels for c in data],
                              [pair_groups(len(c.x_a), len(c.x_b)) for c in data], [c.name for c in data],
                              folds=folds, seed=fold_seed, C=probe_c)
    return ConceptBench(data, fit_probes(data, C=probe_c), splits)


def build_bench(loaded: LoadedModel, concepts: list, site: str, prepend_bos: bool = True, probe_c: float = 1.0,
                batch_size: int = 64, progress: bool = False, folds: int = 5, fold_seed: int = 0) -> ConceptBench:
    data = concept_representations(loaded, concepts, site, batch_size=batch_size, prepend_bos=prepend_bos, progress=progress)
    return bench_from_data(data, probe_c, folds, fold_seed)


def same_shape_factory(dictionary: Dictionary) -> Callable[[int], Dictionary]:
    """Fresh, untrained dictionaries of the same method and config, one per seed (the untrained floor)."""
    import torch

    from conca.dictionaries.base import create

    config = asdict(dictionary.config)

    def factory(seed: int) -> Dictionary:
        torch.manual_seed(seed)
        return create(dictionary.name, **config)

    return factory


def score_dictionary(dictionary: Dictionary, bench: ConceptBench, transform: str = "exp", threshold: float = 0.5,
                     rank_k: int = 32, floor_draws: int = 0, factory: Callable[[int], Dictionary] | None = None,
                     floor_seed: int = 0, floor_kinds: tuple[str, ...] = ("permutation", "untrained")) -> dict:
    """MPC, coverage, per-concept matches (in-sample, the papers'), held-out MPC and coverage (when the
    bench has folds), MSE on the concept words and Alg. 2 stability. With `floor_draws`, the
    permutation floor and (with `factory`, default: the same method and config) the untrained floor,
    each over that many draws (`floor_kinds` picks them), and the lift of this dictionary over them."""
    import torch

    dictionary.check_input(bench.data[0].x_a)
    # Each word is encoded once; in-sample, held-out and the permutation floor all index into these.
    latents = [transform_latents(encode_all(dictionary, c.x), transform) for c in bench.data]
    references = [p.scores for p in bench.probes]
    match = hungarian_match(np.stack([pearson_with_columns(s, z) for s, z in zip(references, latents)]), threshold,
                            bench.names)
    words = torch.cat([c.x for c in bench.data])
    out = {"mpc": match.mpc, "coverage": match.coverage, "per_concept": match.per_concept(),
           "mse_concept_words": reconstruction_mse(dictionary, words),
           "rank_significance": rank_significance(dictionary, bench.data, k=rank_k)}
    directions = mean_difference_directions(bench.data)
    out.update(direction_recovery(dictionary, directions))
    if bench.splits is not None:
        out.update(heldout_matching(latents, bench.splits, threshold))
    if floor_draws and floor_kinds:
        floors = {}
        if "permutation" in floor_kinds:
            floors["permutation"] = permutation_floor(references, latents, bench.splits, floor_draws, floor_seed, threshold)
        if "untrained" in floor_kinds:
            floors["untrained"] = bench_untrained_floor(bench, factory or same_shape_factory(dictionary), floor_draws,
                                                        floor_seed, transform, threshold)
        out["floors"] = floors
        out["lift"] = lifts(out, floors)
    return out


def bench_untrained_floor(bench: ConceptBench, factory: Callable[[int], Dictionary], draws: int = 20, floor_seed: int = 0,
                          transform: str = "exp", threshold: float = 0.5) -> dict:
    """In-sample and held-out MPC of `draws` untrained dictionaries factory(1000 + floor_seed + j)
    (seeds apart from the trained ones' 0, 1, ...)."""
    return untrained_floor(factory, [c.x for c in bench.data], [p.scores for p in bench.probes], bench.splits, draws,
                           seed=1000 + floor_seed, transform=transform, threshold=threshold,
                           directions=mean_difference_directions(bench.data))


def model_side(bench: ConceptBench, align_c: float, seeds: int) -> dict:
    """Dictionary-free diagnostics: probe accuracy, A_s W_s, informational sufficiency."""
    alignment = direction_alignment(bench.data, C=align_c, seeds=seeds)
    return {"probe_accuracy": {p.name: p.accuracy for p in bench.probes},
            "alignment": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in alignment.items()},
            "sufficiency": sufficiency(bench.data, seeds=seeds)}
