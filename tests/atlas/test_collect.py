"""The atlas pass: exact top/bottom-k, counts and sums, and a uniform chunk-invariant sample,
checked against brute force over all tokens on tiny dictionaries and random data."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conca.atlas.collect import _Pass, collect_latent_stats, sparse_encoder
from conca.dictionaries import create
from conca.errors import ConfigError


class LinearCodes(torch.nn.Module):
    """z = x @ W: dense codes of both signs (a stand-in for ConCA's signed latents)."""

    signed_latents = True

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.config = SimpleNamespace(d_in=weight.shape[0], n_latents=weight.shape[1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Identity(LinearCodes):
    """z = x, unsigned: every token fires wherever x > 0."""

    signed_latents = False

    def __init__(self, width: int) -> None:
        super().__init__(torch.eye(width))


def topk_dictionary(d=12, n=40, k=3, seed=0):
    torch.manual_seed(seed)
    return create("topk", d_in=d, n_latents=n, k=k)


def brute_top(z: np.ndarray, k: int, sign: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per latent, the k tokens of largest sign*z among those with sign*z > 0 (earlier token on ties), NaN/-1 padded."""
    n_latents = z.shape[1]
    values = np.full((n_latents, k), np.nan, np.float32)
    tokens = np.full((n_latents, k), -1, np.int64)
    for j in range(n_latents):
        col = sign * z[:, j]
        idx = np.nonzero(col > 0)[0]
        idx = idx[np.argsort(-col[idx], kind="stable")][:k]
        values[j, :len(idx)], tokens[j, :len(idx)] = z[idx, j], idx
    return values, tokens


def test_top_k_equals_a_brute_force_sort_over_all_tokens():
    dictionary = topk_dictionary()
    x = torch.randn(3000, 12)
    stats = collect_latent_stats(dictionary, x.split(700), top=7, sample=5)
    z = dictionary.encode(x).detach().numpy()
    values, tokens = brute_top(z, 7)
    assert np.array_equal(stats.top_tokens, tokens)
    assert np.array_equal(stats.top_values, values, equal_nan=True)
    assert stats.bottom_values.shape == (40, 0)  # a TopK SAE is unsigned


class Wrapped(torch.nn.Module):
    """Another dictionary's encode behind a class of its own: the generic dense-codes path."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.encode(x)


def test_topk_fast_path_equals_the_generic_path():
    dictionary = topk_dictionary()
    assert sparse_encoder(dictionary) is not None and sparse_encoder(Wrapped(dictionary)) is None
    assert sparse_encoder(create("batchtopk", d_in=4, n_latents=8, k=2)) is None
    x = torch.randn(2000, 12)
    fast = collect_latent_stats(dictionary, x.split(500), top=5, sample=30)
    generic = collect_latent_stats(Wrapped(dictionary), x.split(500), top=5, sample=30)
    for name in ("fire_count", "top_values", "top_tokens", "sample_values", "sample_tokens", "firing_sum"):
        assert np.array_equal(getattr(fast, name), getattr(generic, name), equal_nan=True), name


def test_ties_go_to_the_earlier_token():
    x = torch.tensor([[1.0], [2.0], [2.0], [1.0], [2.0]])
    for chunk in (1, 2, 5):
        stats = collect_latent_stats(Identity(1), x.split(chunk), top=2, sample=0)
        assert stats.top_tokens[0].tolist() == [1, 2]


def sparse_codes(n_tokens=2500, width=40, density=0.1, seed=0) -> torch.Tensor:
    """Nonnegative codes with about `density` nonzeros: encoded exactly by Identity at any batch size."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_tokens, width, generator=g) * (torch.rand(n_tokens, width, generator=g) < density)


@pytest.mark.parametrize("signed", [False, True])  # the sparse (nonzero) and the dense path
def test_results_do_not_depend_on_chunk_or_encode_batch_size(signed):
    x = sparse_codes()
    runs = [collect_latent_stats(Identity(40), x.split(size), top=5, sample=30, seed=3, batch_tokens=batch, signed=signed)
            for size, batch in ((2500, None), (1, None), (333, 50), (1000, 7))]
    for other in runs[1:]:
        for name in ("fire_count", "top_values", "top_tokens", "sample_values", "sample_tokens", "bottom_tokens"):
            assert np.array_equal(getattr(runs[0], name), getattr(other, name), equal_nan=True), name
        np.testing.assert_allclose(runs[0].value_sum, other.value_sum, rtol=1e-9)


def test_topk_sae_pass_is_chunk_invariant_up_to_the_encoder_rounding():
    # The encoder GEMM itself may round differently at another batch size (last bit of z).
    dictionary = topk_dictionary()
    x = torch.randn(2500, 12)
    a = collect_latent_stats(dictionary, [x], top=5, sample=30)
    b = collect_latent_stats(dictionary, x.split(333), top=5, sample=30, batch_tokens=50)
    assert np.array_equal(a.top_tokens, b.top_tokens) and np.array_equal(a.sample_tokens, b.sample_tokens)
    np.testing.assert_allclose(a.top_values, b.top_values, rtol=1e-5)


def test_fire_counts_density_and_sums_are_exact():
    dictionary = topk_dictionary()
    x = torch.randn(2000, 12)
    stats = collect_latent_stats(dictionary, x.split(300), top=3, sample=3)
    z = dictionary.encode(x).detach().double().numpy()
    assert np.array_equal(stats.fire_count, (z > 0).sum(0))
    np.testing.assert_allclose(stats.density, (z > 0).mean(0))
    np.testing.assert_allclose(stats.value_sum, z.sum(0), rtol=1e-6)
    np.testing.assert_allclose(stats.firing_sum, np.where(z > 0, z, 0).sum(0), rtol=1e-6)
    assert stats.n_tokens == 2000


def test_signed_dictionary_gets_exact_bottom_k_and_samples_only_positive_values():
    torch.manual_seed(1)
    dictionary = LinearCodes(torch.randn(6, 9))
    x = torch.randn(1500, 6)
    stats = collect_latent_stats(dictionary, x.split(400), top=4, sample=50)
    z = dictionary.encode(x).detach().numpy()
    assert stats.signed
    for sign, values, tokens in ((1, stats.top_values, stats.top_tokens), (-1, stats.bottom_values, stats.bottom_tokens)):
        want_values, want_tokens = brute_top(z, 4, sign)
        assert np.array_equal(tokens, want_tokens)
        assert np.array_equal(values, want_values, equal_nan=True)
    assert (stats.sample_values > 0).all()
    assert np.array_equal(stats.fire_count, (z > 0).sum(0))
    np.testing.assert_allclose(stats.value_sum, z.astype(np.float64).sum(0), rtol=1e-4, atol=1e-3)


def test_signed_flag_can_be_forced_and_defaults_to_the_dictionary_declaration():
    dictionary = topk_dictionary()
    x = torch.randn(100, 12)
    assert not collect_latent_stats(dictionary, [x], top=2, sample=2).signed
    forced = collect_latent_stats(dictionary, [x], top=2, sample=2, signed=True)
    assert forced.signed and forced.bottom_values.shape == (40, 2)
    assert np.isnan(forced.bottom_values).all()  # TopK codes are never negative


@pytest.mark.parametrize("signed", [False, True])
def test_sample_holds_min_r_distinct_firing_tokens(signed):
    dictionary = topk_dictionary()
    x = torch.randn(3000, 12)
    stats = collect_latent_stats(dictionary, x.split(512), top=2, sample=40, signed=signed)
    z = dictionary.encode(x).detach().numpy()
    for j in range(40):
        tokens = stats.sample_tokens[j][stats.sample_tokens[j] >= 0]
        assert len(tokens) == min(40, stats.fire_count[j])
        assert len(set(tokens.tolist())) == len(tokens)
        assert (z[tokens, j] > 0).all()
        np.testing.assert_array_equal(stats.sample_values[j][:len(tokens)], z[tokens, j])
        assert np.isnan(stats.sample_values[j][len(tokens):]).all()


@pytest.mark.parametrize("signed", [False, True])  # the sparse (nonzero) and the dense path
def test_sample_is_roughly_uniform_over_the_firing_tokens(signed):
    n_tokens, n_latents, size = 1000, 200, 100
    x = torch.rand(n_tokens, n_latents) + 0.1  # every latent fires on every token
    stats = collect_latent_stats(Identity(n_latents), x.split(128), top=1, sample=size, seed=7, signed=signed)
    picks = np.bincount(stats.sample_tokens.reshape(-1), minlength=n_tokens)
    expected = n_latents * size / n_tokens
    chi2 = ((picks - expected) ** 2 / expected).sum()
    # Without replacement within a latent the variance shrinks by (1 - R/N): E[chi2] ~ 0.9 * 999.
    assert 700 < chi2 < 1150
    blocks = picks.reshape(10, -1).sum(1) / picks.sum()
    assert np.abs(blocks - 0.1).max() < 0.01  # no drift between early and late tokens


def test_sample_depends_on_the_seed_only():
    dictionary = topk_dictionary()
    x = torch.randn(2000, 12)
    a = collect_latent_stats(dictionary, [x], top=1, sample=10, seed=1)
    b = collect_latent_stats(dictionary, [x], top=1, sample=10, seed=1)
    c = collect_latent_stats(dictionary, [x], top=1, sample=10, seed=2)
    assert np.array_equal(a.sample_tokens, b.sample_tokens)
    assert not np.array_equal(a.sample_tokens, c.sample_tokens)


def test_state_size_does_not_grow_with_tokens():
    dictionary = topk_dictionary()
    state = _Pass(40, top=5, sample=20, seed=0, signed=True, device=torch.device("cpu"))
    sizes = []
    for _ in range(3):
        for chunk in torch.randn(5000, 12).split(1000):
            state.update(dictionary.encode(chunk).detach())
            assert all(keep.n_pending < keep.flush_at for keep in (state.top, state.bottom, state.sample))
        sizes.append(state.state_bytes())
    assert sizes[0] == sizes[1] == sizes[2]
    # lists of latents x (k + k + R) entries, per-latent sums, and three candidate buffers of a fixed bound
    assert sizes[0] <= 40 * (5 + 5 + 20) * 24 + 40 * 64 + 3 * 32 * 2**16
    assert state.n_tokens == 15000


def test_dead_latents_are_padded():
    x = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    stats = collect_latent_stats(Identity(2), [x], top=3, sample=3)
    assert stats.fire_count.tolist() == [2, 0]
    assert stats.top_tokens[1].tolist() == [-1, -1, -1] and np.isnan(stats.top_values[1]).all()
    assert np.isnan(stats.mean_firing[1]) and stats.mean_firing[0] == 1.5
    assert stats.top_tokens[0].tolist() == [1, 0, -1]


def test_transcoder_encodes_the_input_site_only():
    torch.manual_seed(0)
    transcoder = create("topk", d_in=8, n_latents=16, k=2, d_out=5)
    x = torch.randn(300, 8)
    stats = collect_latent_stats(transcoder, [x], top=2, sample=2)
    assert np.array_equal(stats.fire_count, (transcoder.encode(x).detach().numpy() > 0).sum(0))


def test_a_training_mode_dictionary_is_encoded_in_eval_mode_and_restored():
    dictionary = create("batchtopk", d_in=8, n_latents=16, k=2)
    dictionary.train()
    collect_latent_stats(dictionary, [torch.randn(50, 8)], top=1, sample=1)
    assert dictionary.training


@pytest.mark.parametrize("option", [{"top": -1}, {"sample": 1.5}])
def test_bad_sizes_are_refused(option):
    with pytest.raises(ConfigError):
        collect_latent_stats(topk_dictionary(), [torch.randn(5, 12)], **option)
