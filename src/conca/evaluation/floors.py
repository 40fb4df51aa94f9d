"""Chance floors of concept recovery, with spread, and the lift of a trained dictionary over them.

Two floors, each run through the SAME selection procedure as the trained dictionary (in-sample MPC
and held-out MPC, `conca.evaluation.heldout`):

* permutation: each concept's rows of latents are shuffled (a fresh permutation per concept and
  draw). Pearson is invariant to permuting both sides together, so this is exactly "the probe scores
  shuffled within each concept" for the in-sample MPC; for the held-out MPC the probes and folds stay
  as they are and only the word <-> latent correspondence is broken. It keeps the dictionary's
  latent distributions (sparsity, dead latents, scale) and removes any link to the words.
* untrained: fresh dictionaries of the same method and width, built by a factory from different
  seeds, never trained: what the architecture gives by chance.

Each floor reports the mean over draws and a 95 % interval (percentiles 2.5 and 97.5 of the draws:
where a single chance dictionary is expected to land). `lift = trained - floor`: its mean is
mean(trained) - mean(floor draws) and its 95 % interval the percentiles 2.5 and 97.5 of
trained_s - floor_j over every trained value s (one per seed) and floor draw j.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from conca.errors import ConfigError
from conca.evaluation.heldout import HeldoutSplits, PreparedLatents, select_and_score
from conca.evaluation.matching import hungarian_match, pearson_with_columns, transform_latents

MIN_DRAWS = 2  # a percentile interval needs a spread; the issue asks for >= 20 (the default)


def interval_label(n: int) -> str:
    return f"percentile 2.5-97.5 over {n} draws"


def summarize(draws: Sequence[float]) -> dict:
    """Mean, standard deviation and the percentile 95 % interval of a floor's draws."""
    values = np.asarray(draws, dtype=np.float64)
    low, high = np.percentile(values, [2.5, 97.5])
    return {"mean": float(values.mean()), "std": float(values.std()), "low": float(low), "high": float(high),
            "interval": interval_label(len(values)), "draws": [float(v) for v in values]}


def lift(trained: "float | Sequence[float]", floor_draws: Sequence[float]) -> dict:
    """trained - floor: mean difference and the percentile 95 % interval of every (trained, draw) difference."""
    t = np.atleast_1d(np.asarray(trained, dtype=np.float64))
    f = np.asarray(floor_draws, dtype=np.float64)
    diffs = (t[:, None] - f[None, :]).ravel()
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"mean": float(t.mean() - f.mean()), "low": float(low), "high": float(high),
            "interval": f"percentile 2.5-97.5 of trained - floor over {len(t)} trained x {len(f)} floor draws",
            "excludes_zero": bool(low > 0 or high < 0)}


def lift_by_seed(runs: Sequence[tuple[float, Sequence[float]]]) -> dict:
    """Lift when each trained seed has its own floor draws (the permutation floor of that seed's
    dictionary): mean of the per-seed mean differences, percentile interval of every difference."""
    diffs = np.concatenate([t - np.asarray(d, dtype=np.float64) for t, d in runs])
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"mean": float(np.mean([t - np.mean(d) for t, d in runs])), "low": float(low), "high": float(high),
            "interval": f"percentile 2.5-97.5 of trained - floor over {len(runs)} seeds x {len(runs[0][1])} own floor draws",
            "excludes_zero": bool(low > 0 or high < 0)}


def check_counts(folds: int, draws: int) -> None:
    """The values --folds and --floor-draws accept: 0 (off) or >= 2; checked before any model loads."""
    if folds == 1:
        raise ConfigError("--folds must be 0 (no held-out recovery) or at least 2, got 1")
    if draws == 1:
        raise ConfigError("--floor-draws must be 0 (no chance floors) or at least 2, got 1")


def in_sample_mpc(references: list[np.ndarray], latents: list[np.ndarray], threshold: float = 0.5) -> float:
    """The papers' MPC of already transformed latents: selection and score on the same rows."""
    r = np.stack([pearson_with_columns(s, z) for s, z in zip(references, latents)])
    return hungarian_match(r, threshold).mpc


def _score(references: list[np.ndarray], latents: list, splits: HeldoutSplits | None, threshold: float,
           permutations: list[np.ndarray] | None = None) -> tuple[float, float | None]:
    """(in-sample MPC, held-out MPC or None) of latents whose row j is paired with row permutations[i][j]."""
    if splits is None:
        shuffled = latents if permutations is None else [z[p] for z, p in zip(latents, permutations)]
        return in_sample_mpc(references, shuffled, threshold), None
    held, in_sample = select_and_score(latents, splits, threshold, references, permutations)
    return in_sample, held["mpc_heldout"]


def _check_draws(draws: int) -> None:
    if draws < MIN_DRAWS:
        raise ConfigError(f"chance floors need at least {MIN_DRAWS} draws, got {draws}")


def _collect(pairs: list[tuple[float, float | None]], directions: list[float] | None = None) -> dict:
    out = {"mpc": summarize([p[0] for p in pairs])}
    if pairs[0][1] is not None:
        out["mpc_heldout"] = summarize([p[1] for p in pairs])
    if directions:
        out["direction_recovery"] = summarize(directions)
    return out


def permutation_floor(references: list[np.ndarray], latents: list[np.ndarray], splits: HeldoutSplits | None = None,
                      draws: int = 20, seed: int = 0, threshold: float = 0.5) -> dict:
    """In-sample (and, with `splits`, held-out) MPC of the same transformed latents with each concept's
    rows shuffled; {"mpc": summary, "mpc_heldout": summary}."""
    _check_draws(draws)
    rng = np.random.default_rng([seed, 17])
    prepared = latents if splits is None else [PreparedLatents(z) for z in latents]  # centred once, shuffled by index
    pairs = []
    for _ in range(draws):
        permutations = [rng.permutation(len(z)) for z in latents]
        pairs.append(_score(references, prepared, splits, threshold, permutations))
    return {**_collect(pairs), "kind": "permutation"}


def untrained_floor(factory: Callable[[int], torch.nn.Module], inputs: list[torch.Tensor], references: list[np.ndarray],
                    splits: HeldoutSplits | None = None, draws: int = 20, seed: int = 1, transform: str = "exp",
                    threshold: float = 0.5, directions: torch.Tensor | None = None) -> dict:
    """MPC of `draws` untrained dictionaries, `factory(seed + j)` for j < draws, on each concept's
    inputs (list of (N_i, d)); {"mpc": summary, "mpc_heldout": summary}; with the concepts'
    mean-difference `directions`, also {"direction_recovery": summary}."""
    from conca.evaluation.concept_directions import direction_recovery
    from conca.evaluation.concepts import encode_all

    _check_draws(draws)
    pairs, recovered = [], []
    for j in range(draws):
        dictionary = factory(seed + j)
        latents = [transform_latents(encode_all(dictionary, x), transform) for x in inputs]
        pairs.append(_score(references, latents, splits, threshold))
        if directions is not None:
            recovered += [direction_recovery(dictionary, directions).get("direction_recovery")]
    recovered = [r for r in recovered if r is not None]
    return {**_collect(pairs, recovered), "kind": "untrained", "seeds": [seed + j for j in range(draws)]}


# The scores a floor is drawn for (direction_recovery: the untrained floor only; shuffling words moves no direction).
FLOOR_METRICS = ("mpc", "mpc_heldout", "direction_recovery")


def lifts(trained: dict, floors: dict) -> dict:
    """{floor kind: {metric: lift}} for every metric both the trained scores and a floor have;
    `trained[metric]` may be one value or one per seed."""
    return {kind: {key: lift(trained[key], floor[key]["draws"]) for key in FLOOR_METRICS
                   if key in floor and key in trained}
            for kind, floor in floors.items()}


__all__ = ["FLOOR_METRICS", "check_counts", "interval_label", "in_sample_mpc", "lift", "lift_by_seed", "lifts", "permutation_floor", "summarize", "untrained_floor"]
