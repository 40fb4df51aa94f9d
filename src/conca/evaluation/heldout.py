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
from conca.evaluation.matching import hungarian_match

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

    def probe(i: int, x: np.ndarray, y: np.ndarray, g: np.ndarray):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
        if len(x) != len(y) or len(y) != len(g):
            raise ShapeError(f"concept {names[i]!r}: {len(x)} rows, {len(y)} labels and {len(g)} groups")
        return lambda train: _probe_scores(x, y, train, C, max_iter)

    return _split_concepts(names, groups, folds, seed, [probe(i, *row) for i, row in enumerate(zip(features, labels, groups))],
                           hint=" (use --folds 0 to skip held-out recovery)")


def reference_splits(references: list[np.ndarray], groups: list[np.ndarray], names: list[str], folds: int = 5,
                     seed: int = 0) -> HeldoutSplits:
    """Folds for a fixed reference (e.g. true posteriors): only the matching is chosen on the training folds."""
    _check_folds(folds)
    fixed = [np.asarray(r, dtype=np.float64) for r in references]
    return _split_concepts(names, groups, folds, seed, [lambda train, r=r: r for r in fixed])


def _split_concepts(names: list[str], groups: list[np.ndarray], folds: int, seed: int, fold_scores: list,
                    hint: str = "") -> HeldoutSplits:
    """Each concept's rows in folds by group (one seeded generator, concepts in order) and, per fold, the
    reference scores `fold_scores[i](training rows)` of concept i."""
    rng = np.random.default_rng(seed)
    train, test, scores = [[] for _ in range(folds)], [[] for _ in range(folds)], [[] for _ in range(folds)]
    for name, g, score in zip(names, groups, fold_scores):
        try:
            splits = fold_rows(g, folds, rng)
        except InputError as exc:
            raise InputError(f"concept {name!r}: {exc}{hint}") from None
        for f, (tr, te) in enumerate(splits):
            train[f].append(tr)
            test[f].append(te)
            scores[f].append(score(tr))
    return HeldoutSplits(list(names), folds, seed, train, test, scores)


class PreparedLatents:
    """One concept's transformed latents (N, D), shifted by their column minima, with their squares
    and column sums: Pearson on any subset of rows, for any scores, then costs matrix products only
    (shifting a column does not change a correlation). The minimum, not the mean, keeps the bulk of a
    sparse column (exp(z - max z) of a TopK latent: one row at 1, the rest at or near e^-max) near 0,
    so the subset variance sum(x^2) - sum(x)^2 / n keeps its precision there (checked against
    `pearson_with_columns` to 1e-12 on TopK, ReLU and ConCA latents)."""

    def __init__(self, latents: np.ndarray):
        z = np.asarray(latents, dtype=np.float64)
        if z.ndim != 2:
            raise ShapeError(f"latents must be (samples, latents), got shape {z.shape}")
        self.z = z - z.min(axis=0, keepdims=True)
        self.sq = self.z * self.z
        self.total = self.z.sum(axis=0)
        self.total_sq = self.sq.sum(axis=0)
        self.max_abs = np.abs(z).max(axis=0)

    @property
    def n(self) -> int:
        return len(self.z)

    def correlation(self, dot: np.ndarray, w_sq: float, sub_sum: np.ndarray, sub_sq: np.ndarray, n_sub: int,
                    columns: "slice | np.ndarray" = slice(None)) -> np.ndarray:
        """Pearson over a subset of n_sub rows from its dot products with the centred scores (squared
        norm w_sq) and the columns' sums and sums of squares there; 0 where either side is constant,
        with `pearson_with_columns`'s test (norm below max|column| 1e-12 sqrt(n)) plus the rounding of
        the subtraction."""
        var = sub_sq - sub_sum ** 2 / n_sub
        ok = (var > 1e-12 * sub_sq) & (np.sqrt(np.maximum(var, 0)) > self.max_abs[columns] * 1e-12 * np.sqrt(n_sub) + 1e-300)
        ok &= w_sq > 0
        out = np.zeros_like(dot)
        out[ok] = dot[ok] / np.sqrt(w_sq * var[ok])
        return np.clip(out, -1.0, 1.0)


def _centred_on(scores: np.ndarray, rows: np.ndarray, where: np.ndarray, n: int) -> np.ndarray:
    """A length-n weight vector: the scores of `rows`, centred over them, at latent rows `where`."""
    w = np.zeros(n)
    w[where] = scores[rows] - scores[rows].mean()
    return w


def select_and_score(latents: "list[np.ndarray | PreparedLatents]", splits: HeldoutSplits, threshold: float = 0.5,
                     references: list[np.ndarray] | None = None,
                     permutations: list[np.ndarray] | None = None) -> tuple[dict, float | None]:
    """Held-out recovery (see `heldout_matching`) and, with `references`, the in-sample MPC against
    them, in one pass over each concept's latents. `permutations[i]` pairs row j of concept i with
    latent row permutations[i][j] (the permutation null); None: row j with row j."""
    if len(latents) != len(splits.names):
        raise InputError(f"need one latent matrix per concept: {len(latents)} for {len(splits.names)} concepts")
    prepared = [z if isinstance(z, PreparedLatents) else PreparedLatents(z) for z in latents]
    k, n_concepts = splits.folds, len(prepared)
    widths = {p.z.shape[1] for p in prepared}
    if len(widths) != 1:
        raise ShapeError(f"every concept's latents must have the same width, got {sorted(widths)}")
    r_train = np.zeros((k, n_concepts, widths.pop()))
    r_in = np.zeros_like(r_train[0]) if references is not None else None
    test_stats = []
    for i, p in enumerate(prepared):
        perm = permutations[i] if permutations is not None else np.arange(p.n)
        weights, indicators = [], []
        for f in range(k):
            train, test = splits.train[f][i], splits.test[f][i]
            weights.append(_centred_on(splits.scores[f][i], train, perm[train], p.n))
            u = np.zeros(p.n)
            u[perm[test]] = 1.0
            indicators.append(u)
        rows = np.arange(p.n)
        if references is not None:
            weights.append(_centred_on(np.asarray(references[i], dtype=np.float64), rows, perm, p.n))
        w, u = np.stack(weights), np.stack(indicators)
        dots, test_sum, test_sq = w @ p.z, u @ p.z, u @ p.sq  # every fold at once: one read of the latents each
        for f in range(k):
            n_train = p.n - len(splits.test[f][i])
            train_sum, train_sq = p.total - test_sum[f], p.total_sq - test_sq[f]
            r_train[f, i] = p.correlation(dots[f], float(w[f] @ w[f]), train_sum, train_sq, n_train)
        if references is not None:
            r_in[i] = p.correlation(dots[k], float(w[k] @ w[k]), p.total, p.total_sq, p.n)
        test_stats.append((perm, test_sum, test_sq))
    heldout = np.zeros((k, n_concepts))
    chosen = np.full((k, n_concepts), -1)
    train_mpc = []
    for f in range(k):
        match = hungarian_match(r_train[f], threshold)
        train_mpc.append(match.mpc)
        chosen[f] = match.assignment
        for i, (p, (perm, test_sum, test_sq)) in enumerate(zip(prepared, test_stats)):
            a, test = match.assignment[i], splits.test[f][i]
            if a < 0:
                continue
            w = _centred_on(splits.scores[f][i], test, perm[test], p.n)
            heldout[f, i] = p.correlation(np.array([w @ p.z[:, a]]), float(w @ w), test_sum[f, [a]], test_sq[f, [a]],
                                          len(test), [a])[0]
    per_concept = heldout.mean(axis=0)
    result = {"mpc_heldout": float(per_concept.mean()), "coverage_heldout": float((per_concept > threshold).mean()),
              "mpc_train_folds": float(np.mean(train_mpc)), "folds": k, "fold_seed": splits.seed,
              "per_concept_heldout": [{"concept": n, "correlation": float(c), "latents": [int(a) for a in chosen[:, i]]}
                                      for i, (n, c) in enumerate(zip(splits.names, per_concept))]}
    return result, (hungarian_match(r_in, threshold).mpc if r_in is not None else None)


def heldout_matching(latents: "list[np.ndarray | PreparedLatents]", splits: HeldoutSplits, threshold: float = 0.5) -> dict:
    """Held-out MPC of already transformed latents (list of (N_i, D), e.g. exp(z - max z))
    against `splits`: the matching is chosen on the training rows of each fold and scored on its
    held-out rows. Returns mpc_heldout, coverage_heldout, mpc_train_folds (the in-sample MPC of the
    same folds' selection, for comparison), folds and per-concept held-out correlations with the
    latent chosen in each fold."""
    return select_and_score(latents, splits, threshold)[0]


__all__ = ["HeldoutSplits", "MIN_PAIRS", "PreparedLatents", "fold_rows", "heldout_matching", "pair_groups", "probe_splits",
           "reference_splits", "select_and_score"]
