"""The diverse world and objective, and the numerical checks of the theorem's diversity condition."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conca.errors import ConfigError, ShapeError
from conca.synthetic.diverse_trials import build_diverse_world
from conca.synthetic.diversity import (DiverseWorld, appm_diversity, best_features, concept_emission, diversity_checks,
                                       posterior_given_targets, predictive_spectrum, rank_and_condition)
from conca.synthetic.posterior import posterior
from conca.synthetic.predictors import TargetMLP, representations, train_target_mlp
from conca.synthetic.trials import TrialSpec, run_trial
from conca.synthetic.world import chain_dag, make_world, random_latent_model
from conca.report.simulate_diversity import failing_conditions


@pytest.fixture(autouse=True)
def _one_thread():
    from conca.runtime.threads import thread_limits

    with thread_limits(1):
        yield


def test_concept_emission_is_log_additive_over_concepts():
    latent = random_latent_model(chain_dag(3), 2, seed=0)
    emission = concept_emission(latent, vocab=7, scale=1.5, seed=1)
    assert emission.shape == (8, 7) and np.allclose(emission.sum(1), 1)
    ratio = np.log(emission[:, 1:]) - np.log(emission[:, :1])  # the normaliser cancels
    index = latent.state_index
    # No interaction between concepts 0 and 2: the mixed second difference vanishes for every y.
    r = {(a, b): ratio[index(np.array([[a, 1, b]]))[0]] for a in (0, 1) for b in (0, 1)}
    assert np.allclose(r[1, 1] - r[1, 0] - r[0, 1] + r[0, 0], 0)
    assert not np.allclose(r[1, 0], r[0, 0])  # but each concept moves the target distribution
    with pytest.raises(ConfigError):
        concept_emission(latent, vocab=1, scale=1.0)
    with pytest.raises(ConfigError):
        concept_emission(latent, vocab=4, scale=0.0)


def test_diverse_world_targets_follow_p_y_given_z():
    world = make_world(2, "chain", 0, n_observed=4, flip_prob=0.1, seed=0)
    dworld = DiverseWorld(world, concept_emission(world.latent, 5, 1.0, seed=2), n_targets=3)
    z, x, y = dworld.sample(30000, seed=3)
    assert x.shape == (30000, 4) and y.shape == (30000, 3) and y.max() < 5
    rows = world.latent.state_index(z) == 0
    counts = np.bincount(y[rows].ravel(), minlength=5) / y[rows].size
    assert np.abs(counts - dworld.emission[0]).max() < 0.02
    with pytest.raises(ConfigError):
        DiverseWorld(world, dworld.emission[:2], 3)


def test_rank_and_condition_of_full_and_deficient_matrices():
    full = rank_and_condition(np.diag([4.0, 2.0, 1.0]))
    assert full == {"rank": 3, "needed": 3, "condition": 4.0, "full_rank": True}
    deficient = rank_and_condition(np.outer([1.0, 2.0, 3.0], [1.0, 1.0, 0.0]))
    assert deficient["rank"] == 1 and not deficient["full_rank"] and deficient["condition"] is None


def test_diversity_checks_see_a_spanning_head_and_a_collapsed_one():
    world = make_world(3, "chain", 0, n_observed=8, flip_prob=0.05, seed=0)
    emission = concept_emission(world.latent, 12, 1.0, seed=1)
    _, x = world.sample(600, seed=2)
    post = posterior(world, x)
    rng = np.random.default_rng(0)
    spanning = diversity_checks(world.latent, emission, rng.standard_normal((12, 6)), post.joint, post.log_marginals())
    assert spanning["L_hat"]["full_rank"] and spanning["directions_per_context"] == 11
    assert spanning["L_marginal"]["rank"] == 3 and spanning["L_marginal"]["full_rank"]  # one free value per binary concept
    assert 0 <= spanning["tv_mean"] <= spanning["tv_max"] <= 1 and 0 <= spanning["epsilon"] < 1
    collapsed_head = np.outer(rng.standard_normal(12), rng.standard_normal(6))  # every g(y) on one line
    collapsed = diversity_checks(world.latent, emission, collapsed_head, post.joint, post.log_marginals())
    assert collapsed["L_hat"]["rank"] == 1 and not collapsed["L_hat"]["full_rank"]
    with pytest.raises(ShapeError):
        diversity_checks(world.latent, emission, rng.standard_normal((5, 6)), post.joint, post.log_marginals())


def test_posterior_given_targets_is_bayes_and_predictive_spectrum_fits_a_low_rank_world():
    world = make_world(2, "chain", 0, n_observed=6, flip_prob=0.1, seed=0)
    emission = concept_emission(world.latent, 6, 1.0, seed=1)
    pzy = posterior_given_targets(world.latent, emission)
    joint = emission * world.latent.joint_prior()[:, None]
    assert np.allclose(pzy.sum(0), 1) and np.allclose(pzy[:, 2], joint[:, 2] / joint[:, 2].sum())
    _, x = world.sample(800, seed=2)
    post = posterior(world, x)
    # 6 outcomes: the log-predictive ratios have 5 coordinates, so width 5 leaves nothing out and width 1
    # cannot hold them; the best width-5 f reads the log-posteriors far better than the best width-1 f
    # (not exactly: log p(y|x) is only approximately affine in them while ε > 0, Thm 3.1's h_y term).
    wide = predictive_spectrum(post.joint, emission, post.log_marginals(), width=5)
    narrow = predictive_spectrum(post.joint, emission, post.log_marginals(), width=1)
    assert wide["residual_variance_share"] < 1e-12 < 0.01 < narrow["residual_variance_share"]
    assert wide["oracle_r2_marginal_logposterior"] > 0.8 > narrow["oracle_r2_marginal_logposterior"] + 0.2


def test_app_m_objective_fails_diversity_and_regularity_by_construction():
    world = make_world(3, "chain", 0, n_observed=6, seed=0)
    _, x = world.sample(200, seed=1)
    post = posterior(world, x)
    head = np.random.default_rng(0).standard_normal((6 * 2, 10))
    checks = appm_diversity(world, head, post.joint)
    assert checks["directions_per_context"] == 1 and not checks["L_hat"]["full_rank"]
    assert checks["tv_max"] == pytest.approx(1.0) and checks["tv_mean"] == pytest.approx(1.0)  # a bit splits the states
    noisy = appm_diversity(make_world(3, "chain", 0, n_observed=6, flip_prob=0.2, seed=0), head, post.joint)
    assert noisy["tv_max"] < 1.0
    row = {"objective": "app_m", "representation_dim": 10, "diversity": checks}
    assert "diversity: each context constrains f along 1 direction" in failing_conditions("app_m_10", row)


def test_target_mlp_has_a_linear_last_layer_and_checks_shapes():
    model = TargetMLP(5, vocab=7, representation_dim=4, hidden=8)
    assert isinstance(model.body[-1], torch.nn.Linear)  # f is unconstrained: no BatchNorm/ReLU after the last layer
    assert model(torch.zeros(3, 5, dtype=torch.long)).shape == (3, 7)
    with pytest.raises(ShapeError):
        model.features(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ShapeError):
        train_target_mlp(model, np.zeros((10, 5)), np.zeros((9, 2)), steps=1)


def test_diverse_trial_learns_the_concepts_beyond_the_untrained_network():
    spec = TrialSpec(n_latents=3, graph="chain", observed=8, flip_prob=0.05, representation_dim=6, hidden=32,
                     samples=1500, steps=150, batch_size=128, lr=3e-3, eval_pairs=60, controls=True,
                     objective="diverse", target_vocab=12, target_scale=1.5, n_targets=4, seed=0)
    result = run_trial(spec)  # dispatches on the objective
    assert result["objective"] == "diverse"
    assert result["loss_last"] < result["loss_first"]
    # Measured at these sizes (seeds 0-2): probe 0.94-0.99 vs untrained 0.80-0.93; R² 0.85-0.87 vs 0.53-0.57.
    assert result["probe_accuracy"] > max(0.9, result["control_probe_accuracy"])
    assert result["r2_marginal_logposterior"] > result["control_r2_marginal_logposterior"] + 0.2
    assert result["diversity"]["L_hat"]["full_rank"]
    # The same seed draws App. M's world: the diverse objective only adds the targets.
    app_m_world = build_diverse_world(dataclasses.replace(spec, objective="app_m")).world
    assert np.array_equal(build_diverse_world(spec).world.mixing.table, app_m_world.mixing.table)
    with pytest.raises(ConfigError):
        run_trial(dataclasses.replace(spec, objective="nope"))


def test_representations_of_a_target_mlp_are_its_features():
    torch.manual_seed(0)
    model = TargetMLP(4, vocab=5, representation_dim=3, hidden=8).eval()
    x = np.array([[0, 1, 1, 0], [1, 1, 0, 0]])
    with torch.no_grad():
        expected = model.features(torch.as_tensor(x)).double().numpy()
    assert np.allclose(representations(model, x), expected)


def test_best_features_project_new_contexts_in_the_same_coordinates():
    world = make_world(3, "chain", 0, n_observed=8, flip_prob=0.1, seed=0)
    emission = concept_emission(world.latent, 10, 1.5, seed=1)
    _, x = world.sample(400, seed=2)
    post = posterior(world, x)
    f, basis = best_features(post.joint, emission, 4)
    again, _ = best_features(post.joint[:50], emission, 4, basis)
    assert f.shape == (400, 4) and np.allclose(again, f[:50])
    assert np.allclose(f.mean(0), 0) and np.all(np.diff(f.var(0)) <= 1e-12)  # principal coordinates, by variance
