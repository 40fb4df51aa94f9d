"""MPC / Hungarian matching / coverage against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conca.errors import InputError, ShapeError
from conca.evaluation.matching import (
    concept_correlations,
    hungarian_match,
    mean_matched_correlation,
    pearson_with_columns,
    transform_latents,
)


def test_pearson_with_exp_matches_a_hand_computed_value():
    # s = (-1, 0, 1); exp(z) = (1, 2, 4): centred (-4/3, -1/3, 5/3), dot = 3, |s| = sqrt 2,
    # |v| = sqrt(42)/3, so r = 3 / (sqrt 2 * sqrt 42 / 3) = 9 / sqrt 84.
    s = np.array([-1.0, 0.0, 1.0])
    z = np.log(np.array([[1.0], [2.0], [4.0]]))
    r = concept_correlations([s], [z], transform="exp")
    assert r[0, 0] == pytest.approx(9 / math.sqrt(84), abs=1e-12)
    # Without the exp, z = (0, ln 2, 2 ln 2) is an exact affine function of s.
    assert concept_correlations([s], [z], transform="identity")[0, 0] == pytest.approx(1.0, abs=1e-12)


def test_constant_columns_correlate_zero_and_exp_does_not_overflow():
    s = np.array([0.0, 1.0, 2.0, 3.0])
    z = np.array([[5.0, 1000.0, 0.0], [5.0, 1001.0, 1.0], [5.0, 1002.0, 2.0], [5.0, 1003.0, 3.0]])
    r = pearson_with_columns(s, transform_latents(z, "exp"))
    assert r[0] == 0.0  # constant latent
    # exp(1000 + t) overflows float64; the shift by the column max leaves Pearson unchanged.
    assert np.isfinite(r).all() and r[1] == pytest.approx(r[2], abs=1e-12)
    assert pearson_with_columns(np.zeros(4), z)[2] == 0.0  # constant reference


def test_hungarian_beats_greedy_on_a_hand_made_matrix():
    r = np.array([[0.9, 0.8], [0.85, 0.1]])
    # Greedy (concept 0 takes its best latent 0) would leave concept 1 with 0.1: mean 0.5.
    m = hungarian_match(r, threshold=0.5, names=["a", "b"])
    assert list(m.assignment) == [1, 0]
    assert m.mpc == pytest.approx((0.8 + 0.85) / 2)
    assert m.coverage == 1.0
    assert m.per_concept() == [{"concept": "a", "latent": 1, "correlation": 0.8},
                               {"concept": "b", "latent": 0, "correlation": 0.85}]
    assert hungarian_match(r, threshold=0.82).coverage == 0.5


def test_more_concepts_than_latents_leaves_some_unmatched_at_zero():
    m = hungarian_match(np.array([[0.9], [0.7], [0.2]]))
    assert sorted(m.assignment.tolist()) == [-1, -1, 0]
    assert m.mpc == pytest.approx(0.9 / 3)


def test_shared_samples_form_recovers_a_permuted_planted_code():
    rng = np.random.default_rng(0)
    log_post = rng.normal(size=(500, 4))
    noise = rng.normal(size=(500, 3))
    latents = np.concatenate([noise[:, :1], log_post[:, [2, 0, 3, 1]], noise[:, 1:]], axis=1)
    m = mean_matched_correlation(log_post, latents, transform="identity")
    assert m.mpc == pytest.approx(1.0) and list(m.assignment) == [2, 4, 1, 3]
    # Per-concept (list) form gives the same matrix when every concept shares the samples.
    r = concept_correlations([log_post[:, i] for i in range(4)], [latents] * 4, transform="identity")
    assert np.allclose(r, m.correlations)


def test_torch_inputs_and_errors():
    s, z = torch.randn(10), torch.randn(10, 3)
    assert mean_matched_correlation([s], [z]).correlations.shape == (1, 3)
    with pytest.raises(ShapeError):
        pearson_with_columns(np.zeros(3), np.zeros((4, 2)))
    with pytest.raises(ShapeError, match="same width"):
        concept_correlations([np.zeros(3), np.zeros(3)], [np.zeros((3, 2)), np.zeros((3, 4))])
    with pytest.raises(InputError, match="NaN"):
        transform_latents(np.array([[np.nan]]))
    with pytest.raises(InputError, match="unknown latent transform"):
        transform_latents(np.zeros((2, 2)), "log")
    with pytest.raises(InputError, match="one latent matrix per concept"):
        concept_correlations([np.zeros(3)], [])
