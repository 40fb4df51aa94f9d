"""Held-out concept recovery: folds by pair, the selection on training folds, the score on held-out
ones; on planted latents it agrees with the in-sample MPC, on pure noise it is ~0 where the in-sample
MPC is the expected maximum of D chance correlations."""

from __future__ import annotations

import numpy as np
import pytest

from conca.errors import ConfigError, InputError
from conca.evaluation.floors import in_sample_mpc
from conca.evaluation.heldout import fold_rows, heldout_matching, pair_groups, probe_splits, reference_splits


def linear_concepts(n_concepts=6, n_pairs=40, d=12, shift=2.0, seed=0):
    """Concept i moves representations along e_i (side b = side a + shift e_i + noise)."""
    rng = np.random.default_rng(seed)
    features, labels, groups = [], [], []
    for i in range(n_concepts):
        a = rng.normal(size=(n_pairs, d))
        b = a + rng.normal(scale=0.5, size=(n_pairs, d))
        b[:, i] += shift
        features.append(np.vstack([a, b]))
        labels.append(np.r_[np.zeros(n_pairs), np.ones(n_pairs)])
        groups.append(pair_groups(n_pairs, n_pairs))
    return features, labels, groups, [f"c{i}" for i in range(n_concepts)]


def full_probe_scores(features, labels):
    from sklearn.linear_model import LogisticRegression

    return [LogisticRegression(max_iter=1000).fit(x, y).decision_function(x) for x, y in zip(features, labels)]


def expected_max_correlation(n: int, d: int, draws: int = 300, seed: int = 5) -> float:
    """E[max over d of Pearson(s, z_j)] for independent Gaussian s, z_j of n samples, by simulation."""
    rng = np.random.default_rng(seed)
    maxima = []
    for _ in range(draws):
        s = rng.normal(size=n)
        z = rng.normal(size=(n, d))
        s, z = s - s.mean(), z - z.mean(0)
        maxima.append(((s @ z) / (np.linalg.norm(s) * np.linalg.norm(z, axis=0))).max())
    return float(np.mean(maxima))


def test_folds_keep_pairs_together_partition_the_rows_and_follow_the_seed():
    groups = pair_groups(10, 10)
    splits = fold_rows(groups, 5, np.random.default_rng(0))
    tests = np.concatenate([te for _, te in splits])
    assert sorted(tests.tolist()) == list(range(20))  # every row is held out exactly once
    for train, test in splits:
        assert set(groups[train]).isdisjoint(groups[test])  # a pair's two words stay on one side
        assert len(test) == 4 and len(train) == 16
    again = fold_rows(groups, 5, np.random.default_rng(0))
    other = fold_rows(groups, 5, np.random.default_rng(1))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(splits, other))


def test_small_concepts_reuse_their_folds_and_too_small_ones_are_refused():
    # 7 pairs and k = 5: 3 folds of their own (>= 2 pairs each), folds 3 and 4 repeat folds 0 and 1.
    splits = fold_rows(pair_groups(7, 7), 5, np.random.default_rng(0))
    assert np.array_equal(splits[3][1], splits[0][1]) and np.array_equal(splits[4][1], splits[1][1])
    assert all(len(te) >= 4 for _, te in splits)
    with pytest.raises(InputError, match="at least 4 pairs"):
        fold_rows(pair_groups(3, 3), 5, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="at least 2 folds"):
        probe_splits(*linear_concepts(n_concepts=1), folds=1)


def test_unequal_sides_keep_extra_rows_as_their_own_groups():
    groups = pair_groups(5, 3)
    assert groups.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]


def test_planted_latents_score_the_same_held_out_as_in_sample():
    features, labels, groups, names = linear_concepts()
    references = full_probe_scores(features, labels)
    rng = np.random.default_rng(1)
    # Latent i is a noisy copy of concept i's probe log-odds; 200 more are noise.
    latents = []
    for i, s in enumerate(references):
        z = rng.normal(size=(len(s), len(names) + 200)) * s.std()
        z[:, i] = s + rng.normal(scale=0.3 * s.std(), size=len(s))
        latents.append(z)
    splits = probe_splits(features, labels, groups, names, folds=5, seed=0)
    held = heldout_matching(latents, splits)
    in_sample = in_sample_mpc(references, latents)
    assert in_sample > 0.85
    assert held["mpc_heldout"] == pytest.approx(in_sample, abs=0.06)
    assert held["coverage_heldout"] == 1.0
    # The planted latent is chosen in every fold.
    assert [p["latents"] for p in held["per_concept_heldout"]] == [[i] * 5 for i in range(len(names))]
    assert held["folds"] == 5 and held["mpc_train_folds"] == pytest.approx(in_sample, abs=0.06)


def test_pure_noise_scores_zero_held_out_but_the_expected_maximum_in_sample():
    n_concepts, n, d = 27, 100, 1000
    rng = np.random.default_rng(2)
    references = [rng.normal(size=n) for _ in range(n_concepts)]
    latents = [rng.normal(size=(n, d)) for _ in range(n_concepts)]
    names = [str(i) for i in range(n_concepts)]
    splits = reference_splits(references, [pair_groups(n // 2, n // 2)] * n_concepts, names, folds=5, seed=0)
    held = heldout_matching(latents, splits)
    # 27 concepts x 5 folds of 20 samples: each held-out correlation has sd ~ 1/sqrt(19) ~ 0.23,
    # their mean ~ 0.02: 0.07 is over 3 sd.
    assert abs(held["mpc_heldout"]) < 0.07
    expected = expected_max_correlation(n, d)
    # With 27 concepts and 1000 latents Hungarian rarely has to deny a concept its best latent.
    assert in_sample_mpc(references, latents) == pytest.approx(expected, abs=0.03)
    assert expected > 0.3  # the selection effect the held-out score removes
    # The training folds' own (in-sample) selection is inflated in the same way.
    assert held["mpc_train_folds"] > 0.3


def test_held_out_recovery_is_deterministic_with_a_seed_and_the_seed_matters():
    features, labels, groups, names = linear_concepts(n_concepts=3, n_pairs=12)
    rng = np.random.default_rng(3)
    latents = [rng.normal(size=(len(x), 50)) for x in features]
    a = heldout_matching(latents, probe_splits(features, labels, groups, names, folds=3, seed=4))
    b = heldout_matching(latents, probe_splits(features, labels, groups, names, folds=3, seed=4))
    c = heldout_matching(latents, probe_splits(features, labels, groups, names, folds=3, seed=5))
    assert a == b and a["mpc_heldout"] != c["mpc_heldout"]


def test_fast_subset_correlations_equal_pearson_on_the_rows_for_sparse_exp_latents():
    """The held-out path's matrix-product Pearson must agree with `pearson_with_columns` on the same
    rows, including columns that are constant on a fold (dead latents) and TopK-like sparse columns
    whose exp(z - max) differs from the bulk by ~1e-10 on a fold."""
    from conca.evaluation.matching import hungarian_match, pearson_with_columns, transform_latents

    features, labels, groups, names = linear_concepts(n_concepts=4, n_pairs=15)
    splits = probe_splits(features, labels, groups, names, folds=3, seed=0)
    rng = np.random.default_rng(6)
    latents = []
    for x in features:
        z = np.where(rng.random((len(x), 40)) < 0.1, rng.exponential(3.0, (len(x), 40)), 0.0)
        z[:, 0] = 0.0  # dead
        z[0, 1] = 25.0  # one huge value: exp(z - max) of the other rows ~ e^-25
        latents.append(transform_latents(z, "exp"))
    held = heldout_matching(latents, splits)
    for f in range(3):
        r = np.stack([pearson_with_columns(s[tr], z[tr]) for s, z, tr in zip(splits.scores[f], latents, splits.train[f])])
        match = hungarian_match(r)
        # Sparse columns tie exactly (one non-zero row on the fold: the same correlation whatever its
        # value), so compare the matched correlations, not which of the tied latents was taken.
        chosen = [p["latents"][f] for p in held["per_concept_heldout"]]
        assert r[np.arange(len(chosen)), chosen] == pytest.approx(match.matched, abs=1e-9)
    expected = np.mean([[pearson_with_columns(splits.scores[f][i][te], latents[i][te][:, [a]])[0]
                         for i, (te, a) in enumerate(zip(splits.test[f], [p["latents"][f] for p in held["per_concept_heldout"]]))]
                        for f in range(3)], axis=0)
    assert np.allclose([p["correlation"] for p in held["per_concept_heldout"]], expected, atol=1e-9)
