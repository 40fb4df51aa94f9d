"""Synthetic worlds, exact posteriors and the checks, against brute force and hand computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conca.errors import ConfigError, InputError
from conca.synthetic import checks
from conca.synthetic.posterior import (clamped_log, masked_visibility, posterior, posterior_from_loglik,
                                       token_posteriors)
from conca.synthetic.world import (LatentModel, PermutationMixing, SyntheticWorld, chain_dag, dag_from_edges, er_dag,
                                   make_dag, make_world, parse_edges, permutation_mixing, random_latent_model,
                                   token_world)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a small shared machine run far faster single-threaded (see thread_limits)."""
    from conca.runtime.threads import thread_limits

    with thread_limits(1):
        yield


# ------------------------------------------------------------------------------------ DAGs
def test_chain_shape():
    dag = chain_dag(4)
    assert dag.edges == [(0, 1), (1, 2), (2, 3)]
    assert dag.parents == ((), (0,), (1,), (2,))
    assert dag.order == (0, 1, 2, 3)


def test_er_dags_are_acyclic_with_about_the_expected_edges():
    counts = []
    orders_seen = set()
    for seed in range(300):
        dag = er_dag(10, 15, seed)
        assert dag.is_acyclic()
        counts.append(dag.n_edges)
        orders_seen.add(dag.order)
    assert abs(np.mean(counts) - 15) < 1.0  # Binomial(45, 1/3): mean 15, sd of the mean ~0.18
    assert len(orders_seen) > 100  # a random topological order, not always 0..n-1
    assert any(a > b for a, b in er_dag(10, 15, 3).edges)


def test_er_caps_at_the_complete_dag_and_erk_means_k_times_n():
    assert er_dag(5, 10, 0).n_edges == 10  # ConCA App. M: 10 expected edges on 5 nodes = complete
    assert er_dag(4, 12, 0).n_edges == 6  # ER3 on 4 nodes asks for more than exist
    counts = [make_dag("er2", 8, seed=s).n_edges for s in range(200)]
    assert abs(np.mean(counts) - 16) < 1.0
    assert make_dag("0->1, 1->2", 3).edges == [(0, 1), (1, 2)]


def test_bad_graphs_are_config_errors():
    with pytest.raises(ConfigError, match="cycle"):
        dag_from_edges(3, [(0, 1), (1, 2), (2, 0)])
    with pytest.raises(ConfigError, match="outside"):
        dag_from_edges(2, [(0, 5)])
    with pytest.raises(ConfigError, match="self-loop"):
        dag_from_edges(2, [(1, 1)])
    with pytest.raises(ConfigError, match="unknown graph"):
        make_dag("star", 3)
    with pytest.raises(ConfigError, match="bad edge"):
        parse_edges("0=>x")


# --------------------------------------------------------------------------------- latents
def test_conditionals_in_range_prior_normalised_and_sampling_matches_it():
    latent = random_latent_model(er_dag(4, 4, 1), 2, 0.2, 0.8, seed=1)
    for table in latent.cpts:
        assert ((table[:, 1] >= 0.2) & (table[:, 1] <= 0.8)).all()
    prior = latent.joint_prior()
    assert prior.sum() == pytest.approx(1.0)
    z = latent.sample(200_000, seed=2)
    freq = np.bincount(latent.state_index(z), minlength=latent.n_states) / len(z)
    assert np.abs(freq - prior).max() < 0.005


def test_k_valued_latents_and_counterfactuals():
    latent = random_latent_model(chain_dag(3), [3, 2, 4], 0.2, 0.8, seed=0)
    assert latent.n_states == 24 and latent.n_marginals == 9
    assert latent.cpts[2].shape == (2, 4)  # parent z_1 has 2 values
    z = latent.sample(5000, seed=1)
    assert z[:, 0].max() == 2 and z[:, 2].max() == 3
    freq = np.bincount(latent.state_index(z), minlength=24) / len(z)
    assert np.abs(freq - latent.joint_prior()).max() < 0.02
    zc = latent.counterfactual(z, 2, seed=3)
    assert (zc[:, 2] != z[:, 2]).all()
    assert (np.delete(zc, 2, axis=1) == np.delete(z, 2, axis=1)).all()
    assert np.array_equal(latent.states()[latent.state_index(z)], z)
    with pytest.raises(ConfigError):
        random_latent_model(chain_dag(2), 2, 0.9, 0.1)


# ----------------------------------------------------------------------------------- mixing
def test_mixing_matches_the_papers_pool_and_nests():
    mix = permutation_mixing(8, 24, seed=0, order="sequential")
    assert mix.pool_size == 24  # 2^3 permutations x 3 bits (SPEC §2.3)
    # All 3 bits of one permutation of the 8 states: a bijection, so x identifies the state.
    assert len({tuple(r) for r in mix.table[:, :3]}) == 8
    small, large = permutation_mixing(32, 5, seed=4), permutation_mixing(32, 12, seed=4)
    assert np.array_equal(small.table, large.table[:, :5])  # more observed = more variables, same first ones
    with pytest.raises(ConfigError, match="n_observed"):
        permutation_mixing(8, 25)


def test_more_observed_variables_lower_posterior_entropy():
    entropies = []
    for n in (1, 2, 4, 8, 16):
        world = make_world(4, "er", 4, n_observed=n, seed=3)
        z, x = world.sample(3000, seed=5)
        entropies.append(posterior(world, x).entropy().mean())
    assert all(a >= b - 1e-9 for a, b in zip(entropies, entropies[1:]))
    assert entropies[0] > 1.0 and entropies[-1] < 0.05


# ------------------------------------------------------------------------------- posteriors
def _mc_posterior(world: SyntheticWorld, n: int, seed: int):
    """Empirical p(z | x) by counting samples with each observation pattern."""
    z, x = world.sample(n, seed)
    states = world.latent.state_index(z)
    table = {}
    for key in {tuple(r) for r in x}:
        rows = (x == key).all(1)
        table[key] = (np.bincount(states[rows], minlength=world.latent.n_states) / rows.sum(), rows.sum())
    return table


@pytest.mark.parametrize("flip", [0.0, 0.15])
def test_exact_posterior_matches_monte_carlo_counts(flip):
    world = make_world(3, "chain", 0, n_observed=2, flip_prob=flip, seed=7)
    counts = _mc_posterior(world, 200_000, seed=8)
    for key, (freq, n) in counts.items():
        exact = posterior(world, np.array([key])).joint[0]
        assert np.abs(exact - freq).max() < 4 / np.sqrt(n) + 1e-9, key


def test_masked_posterior_ignores_the_masked_variable_and_matches_counts():
    world = make_world(3, "chain", 0, n_observed=3, flip_prob=0.1, seed=2)
    z, x = world.sample(200_000, seed=3)
    vis = masked_visibility(3, np.full(len(x), 1))
    post = posterior(world, x[:5], vis[:5])
    x_changed = x[:5].copy()
    x_changed[:, 1] ^= 1
    assert np.allclose(post.joint, posterior(world, x_changed, vis[:5]).joint)
    # p(z | x_0, x_2) by counting over the two visible variables only.
    key = (x[0, 0], x[0, 2])
    rows = (x[:, 0] == key[0]) & (x[:, 2] == key[1])
    freq = np.bincount(world.latent.state_index(z[rows]), minlength=8) / rows.sum()
    assert np.abs(post.joint[0] - freq).max() < 0.02


def test_hand_computed_two_node_posterior():
    # z0 -> z1, p(z0=1) = a, p(z1=1 | z0) = b0, b1; one observable x = z1 flipped with prob rho.
    a, b0, b1, rho = 0.3, 0.25, 0.7, 0.1
    latent = LatentModel(chain_dag(2), (2, 2), [np.array([[1 - a, a]]), np.array([[1 - b0, b0], [1 - b1, b1]])])
    # States m = 2 z0 + z1; the identity permutation's bit 0 is z1.
    mixing = PermutationMixing(4, np.array([0]), np.array([0]), {0: np.arange(4)}, flip_prob=rho)
    world = SyntheticWorld(latent, mixing)
    like1 = {0: rho, 1: 1 - rho}  # p(x = 1 | z1)
    joint = {(z0, z1): (a if z0 else 1 - a) * ((b1 if z0 else b0) if z1 else 1 - (b1 if z0 else b0)) * like1[z1]
             for z0 in (0, 1) for z1 in (0, 1)}
    evidence = sum(joint.values())
    post = posterior(world, np.array([[1]]))
    assert post.joint[0] == pytest.approx([joint[(0, 0)] / evidence, joint[(0, 1)] / evidence,
                                           joint[(1, 0)] / evidence, joint[(1, 1)] / evidence])
    p_z0 = (joint[(1, 0)] + joint[(1, 1)]) / evidence
    assert post.marginals[0][0, 1] == pytest.approx(p_z0)
    assert p_z0 == pytest.approx(0.3 * (0.7 * 0.9 + 0.3 * 0.1) / (0.3 * 0.66 + 0.7 * (0.25 * 0.9 + 0.75 * 0.1)))
    assert post.log_marginals()[0, 1] == pytest.approx(np.log(p_z0))


def test_deterministic_mixing_posteriors_clamp_and_errors():
    world = make_world(3, "chain", 0, n_observed=3, order="sequential", seed=1)
    z, x = world.sample(100, seed=1)
    post = posterior(world, x)
    assert np.array_equal(post.joint.argmax(1), world.latent.state_index(z))  # invertible: x pins the state
    assert post.entropy().max() < 1e-12
    assert post.log_joint(1e-6).min() == pytest.approx(np.log(1e-6))
    assert np.isfinite(post.log_marginals()).all()
    with pytest.raises(ConfigError, match="max_states"):
        posterior_from_loglik(random_latent_model(chain_dag(13), 2, seed=0), np.zeros((1, 2 ** 13)))
    with pytest.raises(InputError, match="probability 0"):
        posterior_from_loglik(world.latent, np.full((1, 8), -np.inf))
    with pytest.raises(ConfigError):
        clamped_log(np.ones(2), eps=0)


def test_token_world_prefix_posteriors_match_counts():
    latent = random_latent_model(chain_dag(2), 2, seed=0)
    world = token_world(latent, vocab=3, length=2, concentration=1.5, seed=1)
    z, tokens = world.sample(200_000, seed=2)
    posts = token_posteriors(world, tokens[:50])
    assert np.allclose(posts[0].joint, latent.joint_prior())  # empty prefix: the prior
    states = latent.state_index(z)
    for n in range(3):
        for s in (1, 2):
            rows = (tokens[:, :s] == tokens[n, :s]).all(1)
            freq = np.bincount(states[rows], minlength=4) / rows.sum()
            assert np.abs(posts[s].joint[n] - freq).max() < 4 / np.sqrt(rows.sum())


# ------------------------------------------------------------------------------------ checks
def _planted(seed=0, n=3000):
    world = make_world(4, "er", 4, n_observed=5, flip_prob=0.1, seed=seed)
    z, x = world.sample(n, seed + 1)
    return world, z, posterior(world, x)


def test_r2_is_one_for_an_exact_linear_map_and_not_for_a_random_representation():
    world, z, post = _planted()
    rng = np.random.default_rng(0)
    logm = post.log_marginals()
    rep = logm @ rng.standard_normal((logm.shape[1], 12)) + rng.standard_normal(12)
    assert checks.linear_r2(rep, logm) == pytest.approx(1.0, abs=1e-6)
    logj = post.log_joint()
    rep_joint = logj @ rng.standard_normal((logj.shape[1], 20))
    assert checks.linear_r2(rep_joint, logj) == pytest.approx(1.0, abs=1e-6)
    assert checks.linear_r2(rng.standard_normal((len(logm), 12)), logm) < 0.1
    # A nonlinear, lossy code of the posteriors: clearly below 1.
    assert checks.linear_r2(np.tanh(3 * rep[:, :3]), logm) < 0.9


def test_probe_accuracy_tracks_information_and_groups_stay_together():
    world, z, post = _planted()
    feats = post.log_joint()
    acc = checks.probe_accuracy(feats, z[:, 0])
    bayes = (post.map_marginals()[:, 0] == z[:, 0]).mean()
    assert acc > bayes - 0.05
    noise = np.random.default_rng(1).standard_normal((len(z), 5))
    assert checks.probe_accuracy(noise, z[:, 0]) < max(z[:, 0].mean(), 1 - z[:, 0].mean()) + 0.05
    train, test = checks.split_indices(10, 0.5, 0, groups=np.repeat(np.arange(5), 2))
    assert not set(np.arange(10)[train] // 2) & set(np.arange(10)[test] // 2)


def test_planted_latents_score_pcc_one_and_random_ones_do_not():
    world, z, post = _planted()
    logm = post.log_marginals()
    probs = post.stacked_marginals()[:, 1::2]  # p(z_i = 1 | x) per concept
    perm = np.random.default_rng(0).permutation(logm.shape[1])
    score = checks.score_latents(probs, logm[:, perm])
    assert score.pcc == pytest.approx(1.0, abs=1e-4) and score.mcc == pytest.approx(1.0, abs=1e-4)
    assert [perm[a] for a in score.assignment] == [1, 3, 5, 7]  # each concept found its own latent
    assert score.pcc_heldout == pytest.approx(1.0, abs=1e-4)  # the truth's own latents: chosen on any fold
    rnd = checks.score_latents(probs, np.random.default_rng(1).standard_normal(logm.shape))
    assert rnd.pcc < 0.2 and rnd.mcc < 0.2 and abs(rnd.pcc_heldout) < rnd.pcc + 0.05
    # Per-concept lists (the counterfactual-pair form) score the same way.
    lists = checks.score_latents([probs[:, i] for i in range(4)], [logm] * 4, probe_logits=[logm[:, 2 * i + 1] for i in range(4)])
    assert lists.pcc == pytest.approx(1.0, abs=1e-4)
    assert lists.pcc_probe is not None and lists.pcc_probe > 0.5


def test_adapted_method_options_fit_small_dictionaries():
    from conca.dictionaries import methods

    assert checks.adapted_method_options("topk", 10, 1000)["k"] == 5
    assert checks.adapted_method_options("topk", 10, 1000, {"k": 2})["k"] == 2
    assert checks.adapted_method_options("p_anneal", 10, 100)["sparsity_warmup_steps"] == 20
    assert "conca_groupnorm_softplus" in methods()  # a built-in method: the check below must run
    groups = checks.adapted_method_options("conca_groupnorm_softplus", 10, 100)["num_groups"]
    assert 1 < groups < 10 and 10 % groups == 0  # a real grouping that divides the 10 latents


def test_trained_dictionaries_are_scored_against_the_truth():
    from conca.dictionaries import methods

    chosen = ["topk", "relu_l1"] + [m for m in ("conca_layernorm_softplus",) if m in methods()]
    world, z, post = _planted(n=2000)
    logm = post.log_marginals()
    rep = logm @ np.random.default_rng(2).standard_normal((8, 16))
    dictionaries = checks.train_dictionaries(chosen, rep, n_latents=8, steps=60, batch_size=128, seed=0)
    assert set(dictionaries) == set(chosen)
    scores = checks.score_dictionaries(dictionaries, rep, post.stacked_marginals()[:, 1::2])
    for s in scores.values():
        assert -1.0 <= s.pcc <= 1.0 and 0.0 <= s.mcc <= 1.0 and len(s.per_concept) == 4
    with pytest.raises(ConfigError, match="fewer than one dictionary batch"):
        checks.train_dictionaries(["topk"], rep[:10], 8, batch_size=64)


def test_every_permutation_of_a_tiny_world_enumerates():
    latent = random_latent_model(chain_dag(2), [2, 3], seed=0)
    states = latent.states()
    assert {tuple(s) for s in states} == set(itertools.product(range(2), range(3)))
    assert latent.marginal_selector().sum(1).tolist() == [2.0] * 6
