"""Dictionary protocol, registry, save/load and the TopK SAE's defining behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from conca.dictionaries import create, load_dictionary, methods
from conca.dictionaries.init import geometric_median
from conca.errors import ConfigError, InputError, ShapeError


def test_registry_lists_topk_and_rejects_unknown():
    names = methods()
    assert "topk" in names and names == sorted(set(names))  # sorted, each name once
    assert create("topk", d_in=4, n_latents=8, k=2).name == "topk"  # the name resolves to its own class
    with pytest.raises(ConfigError, match="unknown method 'nope'.*topk"):
        create("nope", d_in=4, n_latents=8)
    with pytest.raises(ConfigError, match="unknown options for topk: kk"):
        create("topk", d_in=4, n_latents=8, kk=3)
    with pytest.raises(ConfigError, match="k must be"):
        create("topk", d_in=4, n_latents=8, k=9)


def test_topk_has_exactly_k_active_and_nonnegative():
    torch.manual_seed(0)
    sae = create("topk", d_in=16, n_latents=64, k=5)
    z = sae.encode(torch.randn(100, 16) + 3)
    assert ((z != 0).sum(-1) <= 5).all() and ((z != 0).sum(-1) == 5).float().mean() > 0.9
    assert (z >= 0).all()
    assert sae.decoder_directions.shape == (64, 16)


def test_wrong_input_width_is_named():
    sae = create("topk", d_in=16, n_latents=32, k=4)
    with pytest.raises(ShapeError, match="width 16, got 12"):
        sae.encode(torch.randn(3, 12))


def test_save_load_roundtrip_is_exact(tmp_path):
    torch.manual_seed(1)
    sae = create("topk", d_in=8, n_latents=32, k=3)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    sae.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "config.json").read_text())
    assert meta["method"] == "topk" and meta["config"]["k"] == 3
    loaded = load_dictionary(tmp_path / "d")
    x = torch.randn(20, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))
    with pytest.raises(InputError, match="not a saved dictionary"):
        load_dictionary(tmp_path)


def test_fold_input_scale_preserves_function():
    torch.manual_seed(2)
    sae = create("topk", d_in=8, n_latents=32, k=4)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(50, 8) * 7
    scale = 0.25
    expected_z = sae.encode(x * scale) / scale
    expected_x = sae(x * scale) / scale
    sae.fold_input_scale(scale)
    assert torch.allclose(sae.encode(x), expected_z, atol=1e-4)
    assert torch.allclose(sae(x), expected_x, atol=1e-4)


def test_auxk_only_when_latents_are_dead_and_it_trains_them():
    torch.manual_seed(3)
    sae = create("topk", d_in=8, n_latents=32, k=2, dead_after_tokens=10)
    x = torch.randn(1, 8).repeat(64, 1) + 0.01 * torch.randn(64, 8)  # one point: only ~2 latents ever fire
    assert "auxk" not in sae.loss_terms(x[:5])  # nothing dead yet (5 tokens < 10)
    terms = sae.loss_terms(x)  # now every latent silent for 69 tokens is dead
    assert "auxk" in terms and terms["auxk"] > 0
    sae.zero_grad()
    terms["auxk"].backward()
    dead = sae.tokens_since_fired >= 10
    assert dead.any()
    grad_rows = sae.W_dec.grad.abs().sum(1) > 0
    assert grad_rows[dead].any() and not grad_rows[~dead].any()  # AuxK reaches dead latents only
    off = create("topk", d_in=8, n_latents=32, k=2, dead_after_tokens=10, aux_coeff=0.0)
    off.loss_terms(x)
    assert "auxk" not in off.loss_terms(x)


def test_decoder_rows_stay_unit_norm_and_gradient_is_tangent():
    sae = create("topk", d_in=8, n_latents=16, k=2)
    loss = sum(sae.loss_terms(torch.randn(32, 8)).values())
    loss.backward()
    sae.before_optimizer_step()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(16), atol=1e-5)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.after_optimizer_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-6)


def test_geometric_median_closed_form():
    # Four corners of a square plus a far outlier: the median stays near the centre, the mean does not.
    pts = torch.tensor([[0.0, 0], [0, 2], [2, 0], [2, 2], [100, 100]])
    median = geometric_median(pts)
    assert (median > 1.0).all() and (median < 2.0).all()  # pulled a little towards the outlier, stays in the square
    assert pts.mean(0)[0] > 20
    square = torch.tensor([[0.0, 0], [0, 2], [2, 0], [2, 2]])
    assert torch.allclose(geometric_median(square), torch.tensor([1.0, 1.0]), atol=1e-4)


def test_sparse_decode_matches_dense_reference_values_and_gradients():
    from conca.dictionaries.kernels import sparse_decode, sparse_decode_reference

    torch.manual_seed(4)
    weight = torch.randn(40, 6, requires_grad=True)
    values = torch.rand(9, 5, requires_grad=True)
    indices = torch.stack([torch.randperm(40)[:5] for _ in range(9)])
    fast = sparse_decode(indices, values, weight)
    slow = sparse_decode_reference(indices, values, weight)
    assert torch.allclose(fast, slow, atol=1e-6)
    g_fast = torch.autograd.grad(fast.pow(2).sum(), (weight, values))
    g_slow = torch.autograd.grad(slow.pow(2).sum(), (weight, values))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_fast, g_slow))


def test_training_loss_uses_the_same_reconstruction_as_encode_decode():
    torch.manual_seed(5)
    sae = create("topk", d_in=8, n_latents=32, k=3, aux_coeff=0.0)
    x = torch.randn(16, 8)
    expected = (sae(x) - x).pow(2).sum(-1).mean()
    assert torch.allclose(sae.loss_terms(x)["recon"], expected, atol=1e-5)
