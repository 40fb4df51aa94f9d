"""Sparse fast paths agree with plain dense autograd: values and every gradient, fp32 and bf16."""

from __future__ import annotations

import copy

import pytest
import torch

from conca.dictionaries import create
from conca.dictionaries import kernels
from conca.dictionaries.kernels import (Entries, pre_activations, selected_linear, selected_linear_reference,
                                        sparse_decode, sparse_decode_reference)


def _problem(n_rows=64, d=24, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d, generator=g, requires_grad=True)
    weight = (torch.randn(n, d, generator=g) / d**0.5).T.requires_grad_()  # (d, n), latent-major as init.py
    bias = torch.randn(n, generator=g).requires_grad_()
    return x, weight, bias


def _grads(out, upstream, *tensors):
    return torch.autograd.grad(out, tensors, upstream)


def _topk_entries(x, weight, bias, k=5):
    pre = pre_activations(x, weight, bias)
    top, idx = pre.topk(k, dim=-1, sorted=False)
    return top, Entries.topk(idx, weight.shape[1])


def _ragged_entries(x, weight, bias, total=300):
    pre = pre_activations(x, weight, bias)
    top, flat = pre.flatten().topk(total, sorted=False)
    entries, order = Entries.from_flat(flat, *pre.shape)
    return top[order], entries


@pytest.mark.parametrize("select", [_topk_entries, _ragged_entries])
def test_selected_linear_matches_dense_autograd(select):
    x, weight, bias = _problem()
    values, entries = select(x, weight, bias)
    fast = selected_linear(x, weight, bias, values, entries)
    ref = selected_linear_reference(x, weight, bias, entries).view_as(fast)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(fast)
    for a, b in zip(_grads(fast, upstream, x, weight, bias), _grads(ref, upstream, x, weight, bias)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ragged", [False, True])
def test_sparse_decode_matches_dense_autograd(ragged):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 24, generator=g, requires_grad=True)
    if ragged:
        flat = torch.randperm(64 * 96, generator=g)[:250]
        entries, _ = Entries.from_flat(flat, 64, 96)
        values = torch.randn(250, generator=g, requires_grad=True)
    else:
        entries = Entries.topk(torch.rand(64, 96, generator=g).argsort(1)[:, :5], 96)
        values = torch.randn(64, 5, generator=g, requires_grad=True)
    fast, ref = sparse_decode(entries, values, weight), sparse_decode_reference(entries, values, weight)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(fast)
    for a, b in zip(_grads(fast, upstream, values, weight), _grads(ref, upstream, values, weight)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_row_dots_fallback_agrees(monkeypatch):
    g = torch.Generator().manual_seed(2)
    entries = Entries.topk(torch.rand(40, 30, generator=g).argsort(1)[:, :4], 30)
    a, b = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    expected = (a[entries.rows] * b[entries.cols]).sum(-1)
    torch.testing.assert_close(entries.row_dots(a, b), expected)

    def unavailable(*args):
        raise RuntimeError("no such op")
    monkeypatch.setattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", unavailable)
    torch.testing.assert_close(entries.row_dots(a, b), expected)


def _dense_topk_loss(sae, x, dead):
    """TopK + AuxK written with plain dense ops, the way autograd would see them."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, idx = pre.topk(sae.config.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, values.relu())
    x_hat = z @ sae.W_dec + sae.b_dec
    loss = (x_hat - x).pow(2).sum(-1).mean()
    aux_k = min(sae.config.aux_k or sae.config.d_in // 2, int(dead.sum()))
    aux_values, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, aux_idx, aux_values.relu())
    residual = (x - x_hat).detach()
    scale = (residual - residual.mean(0)).pow(2).sum()
    return loss + sae.config.aux_coeff * (z_aux @ sae.W_dec - residual).pow(2).sum() / scale


@pytest.mark.parametrize("autocast", [False, True])
def test_topk_loss_with_auxk_matches_dense_reference(autocast):
    torch.manual_seed(0)
    sae = create("topk", d_in=16, n_latents=256, k=4, aux_k=6, dead_after_tokens=1000)
    sae.tokens_since_fired[::3] = 10**6  # a third of the latents start dead; 32 tokens cannot revive them all
    x = torch.randn(32, 16) * 2
    fast_sae, ref_sae = sae, copy.deepcopy(sae)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        terms = fast_sae.loss_terms(x)
        dead = fast_sae.tokens_since_fired >= sae.config.dead_after_tokens
        assert "auxk" in terms and dead.any()
        ref = _dense_topk_loss(ref_sae, x, dead)
    fast = sum(terms.values())
    params = ["W_enc", "b_enc", "W_dec", "b_dec"]
    fast_grads = torch.autograd.grad(fast, [getattr(fast_sae, p) for p in params])
    ref_grads = torch.autograd.grad(ref, [getattr(ref_sae, p) for p in params])
    # bf16 keeps 8 mantissa bits: the two paths round the product at different points.
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.float(), ref.float(), **tol)
    for name, a, b in zip(params, fast_grads, ref_grads):
        torch.testing.assert_close(a, b.to(a.dtype), **tol, msg=lambda m: f"{name}: {m}")


def test_batchtopk_loss_matches_dense_reference():
    torch.manual_seed(0)
    sae = create("batchtopk", d_in=16, n_latents=64, k=4)
    x = torch.randn(128, 16) * 2
    ref_sae = copy.deepcopy(sae)
    fast = sum(sae.loss_terms(x).values())
    acts = ((x - ref_sae.b_dec) @ ref_sae.W_enc + ref_sae.b_enc).relu()
    values, flat = acts.flatten().topk(4 * 128)
    z = torch.zeros_like(acts.flatten()).scatter(0, flat, values).view_as(acts)
    ref = (z @ ref_sae.W_dec + ref_sae.b_dec - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    params = ["W_enc", "b_enc", "W_dec", "b_dec"]
    for a, b in zip(torch.autograd.grad(fast, [getattr(sae, p) for p in params]),
                    torch.autograd.grad(ref, [getattr(ref_sae, p) for p in params])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("skewed", [False, True])
def test_batch_topk_selects_the_largest_entries_of_the_whole_matrix(skewed):
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(64, 200, generator=g)
    if skewed:  # two rows hold most of the largest entries: the candidate shortcut must fall back
        pre[:2] += 10
    values, flat = kernels.batch_topk(pre, 5 * 64)
    expected, expected_flat = pre.flatten().topk(5 * 64)
    assert torch.equal(values.sort().values, expected.sort().values)
    assert torch.equal(flat.sort().values, expected_flat.sort().values)
    assert torch.equal(pre.flatten()[flat], values)


def test_backend_falls_back_to_torch_without_cuda_or_when_disabled(monkeypatch):
    monkeypatch.setenv("CONCA_DISABLE_TRITON", "1")
    assert kernels.backend() == "torch"
    monkeypatch.delenv("CONCA_DISABLE_TRITON")
    if not torch.cuda.is_available():
        assert kernels.backend() == "torch"
