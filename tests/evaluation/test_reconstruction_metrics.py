"""Closed-form tests for conca.evaluation.reconstruction.

Expected values are worked out by hand in the comments, never recomputed with
the formula under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from conca.errors import CorruptDataError, InputError, ShapeError
from conca.evaluation.reconstruction import ReconstructionStats, reconstruction_metrics

KEYS = {
    "mse_sum", "mse_mean", "fvu", "explained_variance", "cosine_similarity", "l2_ratio",
    "relative_reconstruction_bias", "l0", "l1", "dead_fraction", "dense_fraction", "n_tokens",
}


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def ones_z(n, k=3):
    return torch.ones(n, k)


def test_keys_and_types():
    m = reconstruction_metrics(t([[1, 0], [3, 0]]), t([[1, 0], [1, 0]]), ones_z(2))
    assert set(m) == KEYS
    assert all(type(v) is float for v in m.values())


def test_basic_closed_form():
    # errors: token0 0, token1 (3-1)^2 = 4 -> Σ = 4; mse_sum = 4/2 = 2; mse_mean = 2/2 = 1
    # x̄ = [2, 0]; Σ||x - x̄||² = 1 + 1 = 2 -> fvu = 4/2 = 2, EV = -1
    # cos: both tokens parallel -> 1; l2_ratio = (1/1 + 1/3)/2 = 2/3
    # bias: Σ||x̂||² = 1 + 1 = 2; Σ<x,x̂> = 1 + 3 = 4 -> 0.5
    m = reconstruction_metrics(t([[1, 0], [3, 0]]), t([[1, 0], [1, 0]]), ones_z(2))
    assert m["mse_sum"] == pytest.approx(2.0)
    assert m["mse_mean"] == pytest.approx(1.0)
    assert m["fvu"] == pytest.approx(2.0)
    assert m["explained_variance"] == pytest.approx(-1.0)
    assert m["cosine_similarity"] == pytest.approx(1.0)
    assert m["l2_ratio"] == pytest.approx(2.0 / 3.0)
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert m["n_tokens"] == 2.0


def test_fvu_uses_variance_about_mean_not_zero():
    # x̂ predicts the mean [3, 0]: Σ err = 1 + 1 = 2; Σ||x - x̄||² = 2 -> fvu = 1, EV = 0.
    # About zero it would be Σ||x||² = 4 + 16 = 20 -> fvu 0.1 (the SAELens bug).
    m = reconstruction_metrics(t([[2, 0], [4, 0]]), t([[3, 0], [3, 0]]), ones_z(2))
    assert m["fvu"] == pytest.approx(1.0)
    assert m["explained_variance"] == pytest.approx(0.0)
    assert m["fvu"] != pytest.approx(0.1)


def test_perfect_reconstruction():
    x = t([[1, 2], [3, -1]])
    m = reconstruction_metrics(x, x.clone(), ones_z(2))
    assert m["mse_sum"] == 0.0
    assert m["fvu"] == 0.0
    assert m["explained_variance"] == 1.0
    assert m["cosine_similarity"] == pytest.approx(1.0)
    assert m["l2_ratio"] == pytest.approx(1.0)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0)


def test_double_scale_reconstruction():
    # x̂ = 2x: error = ||x||²; ||x||² = 5, 10 -> mse_sum = 7.5, mse_mean = 3.75
    # l2_ratio = 2, bias = Σ4||x||² / Σ2||x||² = 2, cos = 1
    x = t([[1, 2], [3, -1]])
    m = reconstruction_metrics(x, 2 * x, ones_z(2))
    assert m["mse_sum"] == pytest.approx(7.5)
    assert m["mse_mean"] == pytest.approx(3.75)
    assert m["l2_ratio"] == pytest.approx(2.0)
    assert m["relative_reconstruction_bias"] == pytest.approx(2.0)
    assert m["cosine_similarity"] == pytest.approx(1.0)


def test_cosine_and_l2_ratio_zero_norm_tokens():
    # token0: ||x|| = 0 -> cos 0 and skipped by l2_ratio; token1: x̂ = 2x -> cos 1, ratio 2
    # token2: x̂ = 0 -> cos 0, ratio 0.  cos = (0+1+0)/3 = 1/3; l2_ratio = (2+0)/2 = 1
    x = t([[0, 0], [1, 0], [0, 5]])
    x_hat = t([[1, 0], [2, 0], [0, 0]])
    m = reconstruction_metrics(x, x_hat, ones_z(3))
    assert m["cosine_similarity"] == pytest.approx(1.0 / 3.0)
    assert m["l2_ratio"] == pytest.approx(1.0)


def test_opposite_reconstruction_cosine_minus_one():
    x = t([[1, 2]])
    m = reconstruction_metrics(x, -x, ones_z(1))
    assert m["cosine_similarity"] == pytest.approx(-1.0)
    assert m["relative_reconstruction_bias"] == pytest.approx(-1.0)


def test_constant_x_gives_nan_fvu():
    # Zero total variance: fvu is undefined, reported as NaN rather than inf/0.
    x = t([[1, 1], [1, 1]])
    m = reconstruction_metrics(x, x.clone(), ones_z(2))
    assert math.isnan(m["fvu"])


Z = [
    [1.0, 0, 0, -2, 0],
    [0, 0, 0, 3, 0],
    [0.5, 0, 0, 0, 0],
    [0, 0, 0, 1, -4],
]
# l0 per token: 2, 1, 1, 2 -> 6/4 = 1.5
# l1 per token: 3, 3, 0.5, 5 -> 11.5/4 = 2.875
# firing: [2/4, 0, 0, 3/4, 1/4]; dead = latents 1, 2 -> 2/5
# threshold 0.25: strictly > -> latents 0, 3 dense (latent 4 at exactly 0.25 is not) -> 2/5
# threshold 0.2: latents 0, 3, 4 -> 3/5


def _z_metrics(thr):
    x = t([[1, 0], [2, 0], [3, 0], [4, 0]])
    return reconstruction_metrics(x, x.clone(), t(Z), dense_threshold=thr)


def test_sparsity_closed_form():
    m = _z_metrics(0.25)
    assert m["l0"] == pytest.approx(1.5)
    assert m["l1"] == pytest.approx(2.875)
    assert m["dead_fraction"] == pytest.approx(0.4)
    assert m["dense_fraction"] == pytest.approx(0.4)


def test_dense_threshold_is_strict():
    assert _z_metrics(0.25)["dense_fraction"] == pytest.approx(0.4)
    assert _z_metrics(0.2)["dense_fraction"] == pytest.approx(0.6)


def test_firing_frequency():
    s = ReconstructionStats(5)
    x = t([[1, 0], [2, 0], [3, 0], [4, 0]])
    s.update(x, x, t(Z))
    f = s.firing_frequency()
    assert f.dtype == torch.float64
    assert f.tolist() == [0.5, 0.0, 0.0, 0.75, 0.25]


def test_streaming_uneven_batches_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    # Non-zero mean so a per-batch mean or variance-about-zero would disagree.
    x = torch.randn(12, 6, generator=g) * 2 + 5
    x_hat = x + 0.3 * torch.randn(12, 6, generator=g)
    z = torch.relu(torch.randn(12, 8, generator=g) - 0.5)
    z[:, 2] = 0  # a dead latent
    one = reconstruction_metrics(x, x_hat, z)

    s = ReconstructionStats(8)
    for a, b in [(0, 1), (1, 5), (5, 12)]:
        s.update(x[a:b], x_hat[a:b], z[a:b])
    streamed = s.compute()
    assert one["dead_fraction"] == pytest.approx(1 / 8)
    for k in KEYS:
        assert streamed[k] == pytest.approx(one[k], rel=1e-12, abs=1e-12), k

    # A per-batch-mean FVU would differ: check against a mean-of-batch-FVUs to prove the test bites.
    batch_fvus = [reconstruction_metrics(x[a:b], x_hat[a:b], z[a:b])["fvu"] for a, b in [(1, 5), (5, 12)]]
    assert all(abs(f - one["fvu"]) > 1e-3 for f in batch_fvus)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_accepted(dtype):
    # Values exactly representable -> same closed form as test_basic_closed_form.
    m = reconstruction_metrics(
        t([[1, 0], [3, 0]], dtype), t([[1, 0], [1, 0]], dtype), ones_z(2).to(dtype)
    )
    assert m["mse_sum"] == pytest.approx(2.0)
    assert m["fvu"] == pytest.approx(2.0)
    assert m["l0"] == pytest.approx(3.0)


def test_x_xhat_shape_mismatch():
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(2, 4\)"):
        reconstruction_metrics(torch.zeros(2, 3), torch.zeros(2, 4), ones_z(2))


def test_z_token_count_mismatch():
    with pytest.raises(ShapeError, match=r"\(3, 3\)"):
        reconstruction_metrics(torch.zeros(2, 3), torch.zeros(2, 3), ones_z(3))


def test_z_width_mismatch():
    s = ReconstructionStats(4)
    with pytest.raises(ShapeError, match=r"z width 3 != n_latents 4"):
        s.update(torch.zeros(2, 3), torch.zeros(2, 3), ones_z(2, 3))


def test_width_change_between_batches():
    s = ReconstructionStats(3)
    s.update(torch.ones(2, 3), torch.ones(2, 3), ones_z(2))
    with pytest.raises(ShapeError, match="width 4"):
        s.update(torch.ones(2, 4), torch.ones(2, 4), ones_z(2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_x(bad):
    x = torch.ones(2, 3)
    x[1, 2] = bad
    with pytest.raises(CorruptDataError, match="non-finite activations"):
        reconstruction_metrics(x, torch.ones(2, 3), ones_z(2))


def test_compute_without_tokens():
    s = ReconstructionStats(3)
    with pytest.raises(InputError, match="no tokens") as exc:
        s.compute()
    assert type(exc.value) is InputError
