"""Chance floors (permutation null, untrained dictionaries) and the lift over them: closed-form
summaries, planted latents clear both floors, pure noise does not, and the permutation null's
in-sample MPC is the expected maximum of D chance correlations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conca.errors import ConfigError
from conca.evaluation.floors import in_sample_mpc, lift, lifts, permutation_floor, summarize, untrained_floor
from conca.evaluation.heldout import heldout_matching, pair_groups, probe_splits, reference_splits
from test_heldout import expected_max_correlation, full_probe_scores, linear_concepts


def test_summary_and_lift_closed_forms():
    s = summarize(list(range(101)))  # 0..100: the p-th percentile is p
    assert (s["mean"], s["low"], s["high"]) == (50.0, 2.5, 97.5)
    assert s["interval"] == "percentile 2.5-97.5 over 101 draws" and len(s["draws"]) == 101
    # trained 0.5 against draws 0.1, 0.2, 0.3: differences 0.4, 0.3, 0.2.
    out = lift(0.5, [0.1, 0.2, 0.3])
    assert out["mean"] == pytest.approx(0.3)
    assert out["low"] == pytest.approx(0.205) and out["high"] == pytest.approx(0.395)  # numpy's linear percentiles
    assert out["excludes_zero"]
    # One value per seed: every (seed, draw) difference counts.
    two = lift([0.5, 0.1], [0.1, 0.2, 0.3])
    assert two["mean"] == pytest.approx(0.1) and two["low"] < 0 < two["high"] and not two["excludes_zero"]
    assert lifts({"mpc": 0.5}, {"perm": {"mpc": {"draws": [0.1, 0.2, 0.3]}}})["perm"]["mpc"]["mean"] == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="at least 2 draws"):
        permutation_floor([np.zeros(4)], [np.zeros((4, 2))], draws=1)


def _planted(references, extra=200, noise=0.3, seed=1):
    rng = np.random.default_rng(seed)
    latents = []
    for i, s in enumerate(references):
        z = rng.normal(size=(len(s), len(references) + extra)) * s.std()
        z[:, i] = s + rng.normal(scale=noise * s.std(), size=len(s))
        latents.append(z)
    return latents


def test_planted_latents_clear_the_permutation_floor_in_and_out_of_sample():
    features, labels, groups, names = linear_concepts()
    references = full_probe_scores(features, labels)
    latents = _planted(references)
    splits = probe_splits(features, labels, groups, names, folds=5, seed=0)
    floor = permutation_floor(references, latents, splits, draws=20, seed=0)
    trained = {"mpc": in_sample_mpc(references, latents), **heldout_matching(latents, splits)}
    assert len(floor["mpc"]["draws"]) == 20 and floor["mpc"]["low"] <= floor["mpc"]["mean"] <= floor["mpc"]["high"]
    assert abs(floor["mpc_heldout"]["mean"]) < 0.1  # shuffled: nothing to find on held-out words
    out = lifts(trained, {"permutation": floor})["permutation"]
    for key in ("mpc", "mpc_heldout"):
        assert out[key]["mean"] > 0.5 and out[key]["low"] > 0 and out[key]["excludes_zero"]


def test_pure_noise_does_not_clear_the_permutation_floor_whose_in_sample_mpc_is_the_expected_maximum():
    n_concepts, n, d = 27, 100, 1000
    rng = np.random.default_rng(2)
    references = [rng.normal(size=n) for _ in range(n_concepts)]
    latents = [rng.normal(size=(n, d)) for _ in range(n_concepts)]
    splits = reference_splits(references, [pair_groups(n // 2, n // 2)] * n_concepts, [str(i) for i in range(n_concepts)])
    floor = permutation_floor(references, latents, splits, draws=20, seed=0)
    expected = expected_max_correlation(n, d)
    assert floor["mpc"]["mean"] == pytest.approx(expected, abs=0.03)
    assert abs(floor["mpc_heldout"]["mean"]) < 0.05
    assert floor["mpc_heldout"]["low"] < 0 < floor["mpc_heldout"]["high"]
    trained = {"mpc": in_sample_mpc(references, latents), **heldout_matching(latents, splits)}
    out = lifts(trained, {"permutation": floor})["permutation"]
    for key in ("mpc", "mpc_heldout"):
        assert abs(out[key]["mean"]) < 0.05 and out[key]["low"] < 0 < out[key]["high"] and not out[key]["excludes_zero"]
    # Draws follow the seed.
    assert permutation_floor(references, latents, None, draws=3, seed=7) == permutation_floor(references, latents, None,
                                                                                              draws=3, seed=7)


def test_untrained_floor_builds_one_dictionary_per_seed_through_the_factory():
    from conca.dictionaries import create

    features, labels, groups, names = linear_concepts(n_concepts=3, n_pairs=20)
    references = full_probe_scores(features, labels)
    splits = probe_splits(features, labels, groups, names, folds=4)
    inputs = [torch.as_tensor(x, dtype=torch.float32) for x in features]
    seen = []

    def factory(seed):
        seen.append(seed)
        torch.manual_seed(seed)
        return create("topk", d_in=12, n_latents=64, k=8)

    floor = untrained_floor(factory, inputs, references, splits, draws=5, seed=10, transform="identity")
    assert seen == [10, 11, 12, 13, 14] and floor["seeds"] == seen
    assert len(set(floor["mpc"]["draws"])) > 1  # different seeds, different dictionaries
    fixed = create("topk", d_in=12, n_latents=64, k=8)
    same = untrained_floor(lambda seed: fixed, inputs, references, splits, draws=3, transform="identity")
    assert same["mpc"]["std"] == 0 and same["mpc_heldout"]["std"] == 0  # one dictionary: no spread
    assert set(same) == {"mpc", "mpc_heldout", "kind", "seeds"}


def test_score_dictionary_reports_held_out_recovery_floors_and_lift():
    from conca.dictionaries import create
    from conca.evaluation.concept_bench import bench_from_data, score_dictionary
    from conca.evaluation.concepts import ConceptData

    features, labels, groups, names = linear_concepts(n_concepts=3, n_pairs=20)
    data = [ConceptData(n, torch.as_tensor(x[:20], dtype=torch.float32), torch.as_tensor(x[20:], dtype=torch.float32))
            for n, x in zip(names, features)]
    torch.manual_seed(0)
    d = create("topk", d_in=12, n_latents=48, k=6)
    fast = score_dictionary(d, bench_from_data(data, folds=4))
    assert {"mpc", "coverage", "mpc_heldout", "coverage_heldout", "per_concept_heldout"} <= set(fast)
    assert fast["folds"] == 4 and "floors" not in fast and "lift" not in fast
    assert "mpc_heldout" not in score_dictionary(d, bench_from_data(data, folds=0))  # folds 0: in-sample only
    full = score_dictionary(d, bench_from_data(data, folds=4), floor_draws=4)
    assert full["mpc"] == fast["mpc"] and full["mpc_heldout"] == fast["mpc_heldout"]
    for kind in ("permutation", "untrained"):
        assert len(full["floors"][kind]["mpc_heldout"]["draws"]) == 4
        # Direction recovery has an untrained floor only: shuffling words moves no decoder direction.
        expected = {"mpc", "mpc_heldout"} | ({"direction_recovery"} if kind == "untrained" else set())
        assert set(full["lift"][kind]) == expected
        assert full["lift"][kind]["mpc"]["mean"] == pytest.approx(full["mpc"] - full["floors"][kind]["mpc"]["mean"])
    # The default untrained factory builds the same method and width.
    from conca.evaluation.concept_bench import same_shape_factory

    fresh = same_shape_factory(d)(3)
    assert type(fresh) is type(d) and fresh.config == d.config and not torch.equal(fresh.W_dec, d.W_dec)


def test_untrained_floor_scores_direction_recovery_of_each_draw_when_given_the_directions():
    from conca.dictionaries import create
    from conca.evaluation.concept_directions import direction_recovery

    features, labels, groups, names = linear_concepts(n_concepts=3, n_pairs=20)
    references = full_probe_scores(features, labels)
    inputs = [torch.as_tensor(x, dtype=torch.float32) for x in features]
    directions = torch.nn.functional.normalize(torch.randn(3, 12, dtype=torch.float64), dim=1)

    def factory(seed):
        torch.manual_seed(seed)
        return create("topk", d_in=12, n_latents=64, k=8)

    floor = untrained_floor(factory, inputs, references, None, draws=4, seed=3, transform="identity",
                            directions=directions)
    expected = [direction_recovery(factory(s), directions)["direction_recovery"] for s in range(3, 7)]
    assert floor["direction_recovery"]["draws"] == pytest.approx(expected)
    trained = {"mpc": 0.5, "direction_recovery": floor["direction_recovery"]["mean"] + 0.3}
    up = lifts(trained, {"untrained": floor})["untrained"]["direction_recovery"]
    assert up["mean"] == pytest.approx(0.3) and up["excludes_zero"]
