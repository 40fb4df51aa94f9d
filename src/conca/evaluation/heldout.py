"""Held-out concept recovery: the papers' MPC with the selection and the score on different pairs.

The published MPC fits a probe per concept on all its words and then picks, per concept, the best
of D latents (Hungarian) by Pearson(probe log-odds, exp(latent)) on the same words. With D in the
thousands the maximum of D chance correlations is large (0.31 on pure noise at 1,152 latents), so it
cannot tell a trained dictionary from a random one. Here each concept's pairs are split BY PAIR into
k folds (both words of a pair on the same side, seeded); for every fold:

  1. the probe is fitted on the training folds (its log-odds on every word of the concept kept);
  2. R_train[i, d] = Pearson(s_i, exp(z_d)) over the training words; Hungarian -> latent a_i;
  3. the held-out score of concept i is Pearson(s_i, exp(z_{a_i})) over the held-out fold's words
     (s_i from the probe of step 1, which never saw them).

Per concept the held-out correlation is the mean over folds; `mpc_heldout` is the mean over
concepts, `coverage_heldout` the share of concepts whose held-out correlation exceeds the threshold.
On latents unrelated to the concepts it is ~0 whatever D is; on latents that track the probe it
is close to the in-sample MPC.

Folds and probe fits do not depend on the dictionary: `probe_splits` computes them once per bench,
and `heldout_matching` only indexes into each dictionary's (transformed) latents.
A concept with k_i = min(k, pairs // 2) < k folds reuses its folds cyclically (fold f is f mod k_i),
so every held-out fold has at least 2 pairs; a concept needs at least 4 pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conca.errors import ConfigError, InputError, ShapeError
from conca.evaluation.matching import hungarian_match, pearson_with_columns

MIN_PAIRS = 4  # 2 folds of 2 pairs: Pearson on a held-out fold of 1 pair (2 words) is always +-1


@dataclass
class HeldoutSplits:
    """Per fold f and concept i: training and held-out rows, and the reference scores of all the
    concept's rows (the probe fitted on that fold's training rows, or a fixed reference)."""

    names: list[str]
    folds: int
    seed: int
    train: list[list[np.ndarray]]  # [fold][concept] row indices
    test: list[list[np.ndarray]]
    scores: list[list[np.ndarray]]  # [fold][concept] (N_i,) reference over every row of concept i


def pair_groups(n_a: int, n_b: int) -> np.ndarray:
    """Group ids of the stacked rows [side a; side b]: row j of each side belongs to pair j, so a
    pair's two words always land in the same fold (rows past the shorter side are their own group)."""
    return np.r_[np.arange(n_a), np.arange(n_b)]


def fold_rows(groups: np.ndarray, folds: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, test) row splits of one concept, by group: groups are shuffled and dealt round-robin
    to min(folds, n_groups // 2) folds; fold f >= that number reuses fold f mod it."""
    groups = np.asarray(groups)
    unique = rng.permutation(np.unique(groups))
    k_own = min(folds, len(unique) // 2)
    if k_own < 2:
        raise InputError(f"held-out recovery needs at least {MIN_PAIRS} pairs per concept, got {len(unique)}")
    fold_of_group = {g: i % k_own for i, g in enumerate(unique)}
    fold = np.array([fold_of_group[g] for g in groups])
    own = [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k_own)]
    return [own[f % k_own] for f in range(folds)]


def _check_folds(folds: int) -> None:
    if folds < 2:
        raise ConfigError(f"held-out recovery needs at least 2 folds, got {folds}")


def _probe_scores(x: np.ndarray, y: np.ndarray, train: np.ndarray, C: float, max_iter: int) -> np.ndarray:
    """Log-odds of label 1 on every row, from a LogisticRegression fitted on `train` rows only
    (the papers' probe; zeros when the training rows hold one label: no direction to score)."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y[train])) < 2:
        return np.zeros(len(y))
    return LogisticRegression(C=C, max_iter=max_iter).fit(x[train], y[train]).decision_function(x)


def probe_splits(features: list[np.ndarray], labels: list[np.ndarray], groups: list[np.ndarray], names: list[str],
                 folds: int = 5, seed: int = 0, C: float = 1.0, max_iter: int = 1000) -> HeldoutSplits:
    """Folds by group and a probe per (fold, concept) fitted on the training folds (dictionary-free)."""
    _check_folds(folds)
    if not (len(features) == len(labels) == len(groups) == len(names)) or not names:
        raise InputError("need features, labels, groups and a name for every concept")
    rng = np.random.default_rng(seed)
    train, test, scores = [[] for _ in range(folds)], [[] for _ in range(folds)], [[] for _ in range(folds)]
    for name, x, y, g in zip(names, features, labels, groups):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
        if len(x) != len(y) or len(y) != len(g):
            raise ShapeError(f"concept {name!r}: {len(x)} rows, {len(y)} labels and {len(g)} groups")
        try:
            splits = fold_rows(g, folds, rng)
        except InputError as exc:
            raise InputError(f"concept {name!r}: {exc} (use --folds 0 to skip held-out recovery)") from None
        for f, (tr, te) in enumerate(splits):
            train[f].append(tr)
            test[f].append(te)
            scores[f].append(_probe_scores(x, y, tr, C, max_iter))
    return HeldoutSplits(list(names), folds, seed, train, test, scores)


def reference_splits(references: list[np.ndarray], groups: list[np.ndarray], names: list[str], folds: int = 5,
                     seed: int = 0) -> HeldoutSplits:
    """Folds for a fixed reference (e.g. true posteriors): only the matching is chosen on the training folds."""
    _check_folds(folds)
    rng = np.random.default_rng(seed)
    train, test, scores = [[] for _ in range(folds)], [[] for _ in range(folds)], [[] for _ in range(folds)]
    for name, s, g in zip(names, references, groups):
        s = np.asarray(s, dtype=np.float64)
        try:
            splits = fold_rows(g, folds, rng)
        except InputError as exc:
            raise InputError(f"concept {name!r}: {exc}") from None
        for f, (tr, te) in enumerate(splits):
            train[f].append(tr)
            test[f].append(te)
            scores[f].append(s)
    return HeldoutSplits(list(names), folds, seed, train, test, scores)


def heldout_matching(latents: list[np.ndarray], splits: HeldoutSplits, threshold: float = 0.5) -> dict:
    """Held-out MPC of already transformed latents (list of (N_i, D), e.g. exp(z - max z))
    against `splits`: the matching is chosen on the training rows of each fold and scored on its
    held-out rows. Returns mpc_heldout, coverage_heldout, mpc_train_folds (the in-sample MPC of the
    same folds' selection, for comparison), folds and per-concept held-out correlations with the
    latent chosen in each fold."""
    if len(latents) != len(splits.names):
        raise InputError(f"need one latent matrix per concept: {len(latents)} for {len(splits.names)} concepts")
    n_concepts = len(latents)
    heldout = np.zeros((splits.folds, n_concepts))
    chosen = np.full((splits.folds, n_concepts), -1)
    train_mpc = []
    for f in range(splits.folds):
        r_train = np.stack([pearson_with_columns(s[tr], z[tr]) for s, z, tr in
                            zip(splits.scores[f], latents, splits.train[f])])
        match = hungarian_match(r_train, threshold)
        train_mpc.append(match.mpc)
        chosen[f] = match.assignment
        for i, (s, z, te) in enumerate(zip(splits.scores[f], latents, splits.test[f])):
            a = match.assignment[i]
            if a >= 0:
                heldout[f, i] = pearson_with_columns(s[te], z[te][:, [a]])[0]
    per_concept = heldout.mean(axis=0)
    return {"mpc_heldout": float(per_concept.mean()), "coverage_heldout": float((per_concept > threshold).mean()),
            "mpc_train_folds": float(np.mean(train_mpc)), "folds": splits.folds, "fold_seed": splits.seed,
            "per_concept_heldout": [{"concept": n, "correlation": float(c), "latents": [int(a) for a in chosen[:, i]]}
                                    for i, (n, c) in enumerate(zip(splits.names, per_concept))]}


__all__ = ["HeldoutSplits", "MIN_PAIRS", "fold_rows", "heldout_matching", "pair_groups", "probe_splits",
           "reference_splits"]
