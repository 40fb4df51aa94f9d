"""Next-token predictors of the synthetic lab: they learn, and their representations are what the theory is about."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conca.errors import ConfigError, ShapeError
from conca.synthetic import checks
from conca.synthetic.posterior import masked_visibility, posterior
from conca.synthetic.predictors import (CausalTransformer, MaskedMLP, representations, train_causal_transformer,
                                        train_masked_mlp)
from conca.synthetic.world import make_world, random_latent_model, token_world, chain_dag

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a small shared machine run far faster single-threaded (see thread_limits)."""
    from conca.runtime.threads import thread_limits

    with thread_limits(1):
        yield



def test_masked_mlp_learns_and_its_representation_decodes_concepts_on_an_invertible_world():
    torch.manual_seed(0)
    world = make_world(3, "chain", 0, n_observed=12, seed=0)  # 12 of 24 bits: the state is pinned down
    _, x = world.sample(4000, seed=1)
    model = MaskedMLP(12, representation_dim=64, hidden=64)
    assert len(model.body) == 9  # 3 x (Linear, BatchNorm, ReLU)
    losses = train_masked_mlp(model, x, steps=300, batch_size=128, lr=3e-3, seed=0)
    assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:30])
    assert not model.training
    z, xe = world.sample(1000, seed=2)
    masked = np.random.default_rng(3).integers(12, size=1000)
    f = representations(model, xe, masked)
    assert f.shape == (1000, 64)
    post = posterior(world, xe, masked_visibility(12, masked))
    bayes = (post.map_marginals() == z).mean()
    acc = np.mean([checks.probe_accuracy(f, z[:, i]) for i in range(3)])
    assert bayes > 0.97 and acc > 0.9


def test_masked_mlp_hides_the_masked_value_and_checks_shapes():
    torch.manual_seed(0)
    model = MaskedMLP(5, representation_dim=4, hidden=8).eval()
    x = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, 0, 1]])  # differ only in variable 1
    masked = torch.tensor([1, 1])
    f = model.features(x, masked)
    assert torch.allclose(f[0], f[1])  # the masked value cannot leak into f(x)
    assert model(x, masked).shape == (2, 2)
    with pytest.raises(ShapeError):
        model.features(x[:, :3], masked)
    with pytest.raises(ConfigError):
        representations(model, x.numpy())  # the MLP needs the masked indices
    with pytest.raises(ConfigError):
        train_masked_mlp(model, x.numpy(), steps=0)


def test_causal_transformer_learns_and_is_causal():
    latent = random_latent_model(chain_dag(2), 2, seed=0)
    world = token_world(latent, vocab=6, length=6, concentration=2.0, seed=1)
    _, tokens = world.sample(2000, seed=2)
    torch.manual_seed(0)
    model = CausalTransformer(vocab=6, max_len=6, d_model=32, n_layers=1, n_heads=2)
    losses = train_causal_transformer(model, tokens, steps=80, batch_size=64, lr=3e-3, seed=0)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05
    f = representations(model, tokens[:4])
    assert f.shape == (4, 6, 32)
    changed = tokens[:4].copy()
    changed[:, 3:] = (changed[:, 3:] + 1) % 6
    g = representations(model, changed)
    # Position s has seen tokens 1..s only: changing tokens 4.. leaves positions 0..3 alone.
    assert np.allclose(f[:, :4], g[:, :4], atol=1e-5)
    assert not np.allclose(f[:, 4:], g[:, 4:])
    with pytest.raises(ConfigError):
        CausalTransformer(vocab=4, max_len=4, d_model=30, n_heads=4)
