"""Structured SAE (I-Predict eqs. 87-92): randomised nuclear norm, the two branches, p-annealing,
the nuclear term's schedule and effect, resampling, save/load, fold and training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import conca.dictionaries.structured  # noqa: F401  (registers "structured")
from conca.activations.stream import TensorSource
from conca.dictionaries import create, load_dictionary
from conca.dictionaries.structured import randomized_nuclear_norm
from conca.errors import ConfigError, ShapeError
from conca.training.trainer import TrainConfig, train
from conftest import planted


def low_rank(rows, cols, rank, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    return m + noise * torch.randn(rows, cols, generator=g)


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def quick(**kw):
    base = dict(steps=150, batch_size=256, lr=3e-3, warmup_steps=10, eval_every=50, checkpoint_every=50,
                init_tokens=1024, eval_tokens=1024, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def make(**kw):
    base = dict(d_in=16, n_latents=48, sparsity_warmup_steps=0)
    base.update(kw)
    return create("structured", **base)


# --- randomised nuclear norm -----------------------------------------------------------
def test_randomized_nuclear_norm_matches_exact_when_rank_suffices():
    m = low_rank(200, 100, 5, noise=1e-3)
    exact = torch.linalg.matrix_norm(m, ord="nuc")
    for rank in (5, 8):
        approx = randomized_nuclear_norm(m, rank, generator=gen())
        assert abs(approx - exact) / exact < 0.01
    # The exact-reference path: rank=None, or a rank no smaller than the matrix.
    assert torch.equal(randomized_nuclear_norm(m, None), exact)
    assert torch.equal(randomized_nuclear_norm(m, 100), exact)
    with pytest.raises(ShapeError):
        randomized_nuclear_norm(torch.randn(3, 4, 5), 2)


def test_randomized_nuclear_norm_underestimates_when_rank_too_small():
    m = low_rank(200, 100, 5, noise=1e-3)
    sigma = torch.linalg.svdvals(m)
    exact = sigma.sum()
    for rank, seed in ((1, 1), (2, 2), (3, 3)):
        approx = randomized_nuclear_norm(m, rank, generator=gen(seed))
        # sigma_i(Q^T M) <= sigma_i(M): never above the exact top-k sum, hence below ||M||_*.
        assert approx <= sigma[:rank].sum() * (1 + 1e-5)
        assert approx < 0.9 * exact
        assert approx > 0.99 * sigma[:rank].sum()  # ... and with power iterations it is that top-k sum


def test_oversampling_and_power_iterations_sharpen_the_estimate():
    # Slowly decaying spectrum (pure noise): a bare k-column sketch misses much of the top-k sum.
    m = torch.randn(150, 100, generator=gen(0))
    top = torch.linalg.svdvals(m)[:10].sum()

    def mean_estimate(oversample, power_iters):
        return sum(randomized_nuclear_norm(m, 10, oversample, power_iters, gen(s)) for s in range(3)) / 3

    bare, oversampled, powered = mean_estimate(0, 0), mean_estimate(20, 0), mean_estimate(0, 3)
    assert bare < oversampled <= top * (1 + 1e-5)
    assert bare < powered <= top * (1 + 1e-5)
    assert top - mean_estimate(20, 3) < 0.5 * (top - bare)


def test_randomized_nuclear_norm_gradient_matches_exact_direction():
    m = low_rank(60, 40, 3).requires_grad_()
    grad = torch.autograd.grad(randomized_nuclear_norm(m, 3, generator=gen()), m)[0]
    # On an exactly rank-3 matrix, ||M||_* has the subdifferential U_3 V_3^T + W (||W|| <= 1, W
    # orthogonal to both spans); its minimum-norm element U_3 V_3^T is the reference. (The SVD
    # backward of the full matrix_norm adds U V^T over arbitrary null-space bases.)
    u, _, vh = torch.linalg.svd(m.detach(), full_matrices=False)
    assert F.cosine_similarity(grad.flatten(), (u[:, :3] @ vh[:3]).flatten(), dim=0) > 0.99
    # Low rank plus noise, rank >= true rank: the gradient of the exact top-k sum.
    noisy = low_rank(60, 40, 5, noise=1e-2, seed=3).requires_grad_()
    grad = torch.autograd.grad(randomized_nuclear_norm(noisy, 5, generator=gen()), noisy)[0]
    ref = torch.autograd.grad(torch.linalg.svdvals(noisy)[:5].sum(), noisy)[0]
    assert F.cosine_similarity(grad.flatten(), ref.flatten(), dim=0) > 0.99
    # Full rank, exact path: the gradient of torch's nuclear norm itself.
    full = torch.randn(8, 6, generator=gen(4), requires_grad=True)
    a = torch.autograd.grad(randomized_nuclear_norm(full, None), full)[0]
    b = torch.autograd.grad(torch.linalg.matrix_norm(full, ord="nuc"), full)[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_generator_makes_the_sketch_reproducible():
    m = torch.randn(100, 80, generator=gen(0))
    a = randomized_nuclear_norm(m, 5, oversample=0, power_iters=0, generator=gen(7))
    b = randomized_nuclear_norm(m, 5, oversample=0, power_iters=0, generator=gen(7))
    c = randomized_nuclear_norm(m, 5, oversample=0, power_iters=0, generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- architecture ----------------------------------------------------------------------
def test_encode_is_sum_of_two_nonnegative_branches():
    torch.manual_seed(0)
    sae = make()
    x = torch.randn(40, 16)
    s, r = sae.encode_branches(x)
    assert s.shape == r.shape == (40, 48)
    assert (s >= 0).all() and (r >= 0).all() and (s == 0).any() and (r == 0).any()
    assert torch.allclose(sae.encode(x), s + r)
    assert torch.allclose(sae(x), (s + r) @ sae.W_dec + sae.b_dec, atol=1e-5)
    assert sae.decoder_directions.shape == (48, 16)
    assert torch.allclose(sae.decoder_directions.norm(dim=1), torch.ones(48), atol=1e-5)
    with pytest.raises(ShapeError, match="width 16, got 12"):
        sae.encode(torch.randn(3, 12))


def test_config_validation():
    for bad in (dict(sparsity_function="L2"), dict(p_start=0.0), dict(p_end=1.5), dict(anneal_start=1.5),
                dict(nuclear_rank=0), dict(nuclear_interval=0), dict(oversample=-1), dict(power_iters=-1),
                dict(n_sparsity_updates=0), dict(sparsity_queue_length=0), dict(nuclear_coeff=-1.0),
                dict(resample_steps=1), dict(resample_steps=10, d_out=8)):
        with pytest.raises(ConfigError):
            make(**bad)


def test_loss_terms_weights_and_recon():
    torch.manual_seed(1)
    sae = make(nuclear_rank=None, sparsity_coeff=0.3, nuclear_coeff=0.5)
    x = torch.randn(32, 16)
    terms = sae.loss_terms(x)
    s, r = sae.encode_branches(x)
    assert torch.allclose(terms["recon"], (sae(x) - x).pow(2).sum(-1).mean(), atol=1e-5)
    assert torch.allclose(terms["sparsity"], 0.3 * s.sum(-1).mean(), rtol=1e-5)  # p = 1: L1 of S only
    assert torch.allclose(terms["nuclear"], 0.3 * 0.5 * torch.linalg.matrix_norm(r, ord="nuc"), rtol=1e-5)


def test_nuclear_options_reach_the_term():
    torch.manual_seed(2)
    sae = make(n_latents=64, nuclear_rank=4, oversample=0, power_iters=0)
    x = torch.randn(128, 16)
    values = {}
    for key, value in (("base", None), ("oversample", 20), ("power_iters", 3), ("nuclear_rank", 12)):
        if value is not None:
            setattr(sae.config, key, value)
        values[key] = sae.loss_terms(x)["nuclear"].item()
        if value is not None:
            setattr(sae.config, key, {"oversample": 0, "power_iters": 0, "nuclear_rank": 4}[key])
    assert values["oversample"] > values["base"] and values["power_iters"] > values["base"]
    assert values["nuclear_rank"] > values["oversample"]  # more singular values summed


def test_nuclear_interval_sets_how_often_the_term_is_present():
    x = torch.randn(32, 16)
    for interval, expected in ((1, 12), (3, 4), (10, 2)):
        sae = make(nuclear_interval=interval)
        present = 0
        for step in range(12):
            sae.set_progress(step, 100)
            present += "nuclear" in sae.loss_terms(x)
        assert present == expected
    sae = make(nuclear_coeff=0.0)
    assert "nuclear" not in sae.loss_terms(x)


def test_nuclear_gradient_reaches_only_the_structured_encoder():
    torch.manual_seed(3)
    sae = make()
    sae.loss_terms(torch.randn(64, 16))["nuclear"].backward()
    assert sae.W_enc_r.grad.abs().sum() > 0 and sae.b_enc_r.grad.abs().sum() > 0
    assert sae.W_enc.grad is None and sae.W_dec.grad is None


def test_sparsity_warmup_ramps_the_penalties():
    x = torch.randn(32, 16)
    torch.manual_seed(4)
    warm = make(sparsity_warmup_steps=400)
    torch.manual_seed(4)
    flat = make(sparsity_warmup_steps=0)
    a, b = warm.loss_terms(x), flat.loss_terms(x)
    assert torch.allclose(a["sparsity"] * 400, b["sparsity"], rtol=1e-5)
    assert torch.allclose(a["nuclear"] * 400, b["nuclear"], rtol=1e-5)


# --- p-annealing --------------------------------------------------------------------------
def test_p_anneals_after_anneal_start_and_rescales_lambda():
    torch.manual_seed(5)
    sae = make(anneal_start=0.5, n_sparsity_updates=5, p_end=0.0)  # p: 1, .75, .5, .25 at steps 20, 25, 30, 35
    x = torch.randn(64, 16) + 1
    seen = []
    for step in range(40):
        sae.set_progress(step, 40)
        before_p, before_lambda = sae.p, sae.lambda_t.item()
        sae.loss_terms(x)
        if sae.p != before_p:
            s, _ = sae.encode_branches(x)
            # Same batch every step: the rescaled term equals the old one exactly.
            term, old_term = sae.lambda_t * sae.lp_norm(s, sae.p), before_lambda * sae.lp_norm(s, before_p)
            assert term.item() == pytest.approx(old_term.item(), rel=1e-4)
            seen.append((step, sae.p))
    assert seen == [(25, 0.75), (30, 0.5), (35, 0.25)]  # p_end = 0 itself falls on the last step: never used
    never = make(anneal_start=1.0)
    for step in range(40):
        never.set_progress(step, 40)
        never.loss_terms(x)
    assert never.p == 1.0 and never.lambda_t.item() == pytest.approx(0.1)


def test_p_schedule_options_change_the_values():
    x = torch.randn(64, 16) + 1

    def final_p(**kw):
        sae = make(anneal_start=0.5, **kw)
        for step in range(40):
            sae.set_progress(step, 40)
            sae.loss_terms(x)
        return sae.p

    assert final_p(n_sparsity_updates=5) == pytest.approx(0.25)
    assert final_p(n_sparsity_updates=3) == pytest.approx(0.5)
    assert final_p(n_sparsity_updates=5, p_end=0.6) == pytest.approx(0.7)
    assert final_p(n_sparsity_updates=5, p_start=0.8, p_end=0.4) == pytest.approx(0.5)


def test_lambda_rescaling_averages_over_the_queue():
    torch.manual_seed(6)
    batches = [torch.randn(64, 16) * (1 + i) + 1 for i in range(8)]
    for length in (1, 4):
        torch.manual_seed(6)
        sae = make(anneal_start=0.5, n_sparsity_updates=3, sparsity_queue_length=length)
        # Updates at steps 5 (p stays 1), 7 (p -> 0.5) and 10 (never reached); steps 5, 6 are queued.
        for step in range(8):
            sae.set_progress(step, 10)
            sae.loss_terms(batches[step])
        assert sae.p == 0.5
        queued = [sae.encode_branches(batches[i])[0] for i in ((6,) if length == 1 else (5, 6))]
        old = torch.stack([sae.lp_norm(s, 1.0) for s in queued]).mean()
        new = torch.stack([sae.lp_norm(s, 0.5) for s in queued]).mean()
        assert sae.lambda_t.item() == pytest.approx(0.1 * (old / new).item(), rel=1e-5)


def test_sparsity_function_lp_vs_lp_to_the_p():
    torch.manual_seed(7)
    x = torch.randn(32, 16) + 1
    lp, lpp = make(), make(sparsity_function="Lp^p")
    lpp.load_state_dict(lp.state_dict())
    s, _ = lp.encode_branches(x)
    assert torch.allclose(lp.lp_norm(s, 1.0), lpp.lp_norm(s, 1.0))  # identical at p = 1
    assert torch.allclose(lpp.lp_norm(s, 0.5), s.pow(0.5).sum(-1).mean())
    assert torch.allclose(lp.lp_norm(s, 0.5), s.pow(0.5).sum(-1).pow(2).mean())
    assert not torch.allclose(lp.lp_norm(s, 0.5), lpp.lp_norm(s, 0.5))


def test_gradients_stay_finite_at_small_p():
    torch.manual_seed(8)
    sae = make(anneal_start=0.0, n_sparsity_updates=10)
    sae.set_progress(89, 100)
    x = torch.randn(64, 16)
    loss = sum(sae.loss_terms(x).values())
    assert sae.p < 0.2
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters() if p.grad is not None)


# --- constraints, resampling --------------------------------------------------------------
def test_decoder_rows_stay_unit_norm_and_gradient_is_tangent():
    sae = make()
    sum(sae.loss_terms(torch.randn(32, 16)).values()).backward()
    sae.before_optimizer_step()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(48), atol=1e-5)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.after_optimizer_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-6)


def test_resample_steps_revives_dead_latents_and_resets_adam():
    x = torch.randn(128, 16)
    outcome = {}
    for every in (None, 4):
        torch.manual_seed(9)
        sae = make(resample_steps=every)
        with torch.no_grad():
            sae.b_enc[:5] = -1e3  # latents 0..4 never fire in either branch
            sae.b_enc_r[:5] = -1e3
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        for step in range(4):
            sae.set_progress(step, 100)
            loss = sum(sae.loss_terms(x).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sae.after_optimizer_step(opt, x)
        outcome[every] = (sae, opt)
    off, _ = outcome[None]
    assert (off.encode(x)[:, :5] == 0).all() and (off.b_enc[:5] < -100).all()
    on, opt = outcome[4]
    assert (on.b_enc[:5] == 0).all() and (on.steps_since_active[:5] == 0).all()
    assert (on.encode(x)[:, :5] > 0).any()
    assert (opt.state[on.W_enc]["exp_avg"][:, :5] == 0).all() and (opt.state[on.W_dec]["exp_avg_sq"][:5] == 0).all()
    assert (opt.state[on.W_dec]["exp_avg_sq"][5:] != 0).any()
    assert torch.allclose(on.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)


# --- persistence -------------------------------------------------------------------------
def test_save_load_roundtrip_is_exact(tmp_path):
    torch.manual_seed(10)
    sae = make(nuclear_rank=8, nuclear_coeff=0.3)
    with torch.no_grad():
        for b in (sae.b_enc, sae.b_enc_r, sae.b_dec):
            b.normal_()
    sae.save(tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert loaded.name == "structured" and loaded.config.nuclear_rank == 8 and loaded.config.nuclear_coeff == 0.3
    x = torch.randn(20, 16)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode_branches(x), sae.encode_branches(x)))
    assert torch.equal(loaded(x), sae(x))


def test_fold_input_scale_preserves_function():
    torch.manual_seed(11)
    sae = make()
    with torch.no_grad():
        for b in (sae.b_enc, sae.b_enc_r, sae.b_dec):
            b.normal_()
    x = torch.randn(50, 16) * 7
    scale = 0.25
    s, r = sae.encode_branches(x * scale)
    expected_x = sae(x * scale) / scale
    sae.fold_input_scale(scale)
    s2, r2 = sae.encode_branches(x)
    assert torch.allclose(s2, s / scale, atol=1e-4) and torch.allclose(r2, r / scale, atol=1e-4)
    assert torch.allclose(sae(x), expected_x, atol=1e-4)


# --- training ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """Three short runs on the same planted data: defaults, no nuclear term, a strong nuclear term;
    p anneals in the last quarter of each."""
    x = planted(n=4096, d=16, n_features=24, active=3)
    runs = {}
    for name, kw in {"base": dict(), "no_nuc": dict(nuclear_coeff=0.0), "strong_nuc": dict(nuclear_coeff=2.0)}.items():
        torch.manual_seed(0)
        sae = make(n_latents=48, sparsity_warmup_steps=20, nuclear_rank=8, nuclear_interval=2, **kw)
        runs[name] = (sae, train({name: sae}, TensorSource(x), quick(steps=100, eval_every=20)).histories[name])
    return x, runs


def test_training_reduces_loss_and_fvu_while_p_anneals(trained):
    _, runs = trained
    sae, hist = runs["base"]
    assert hist[-1]["fvu"] < 0.5 * hist[0]["fvu"] and hist[-1]["fvu"] < 0.2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert sae.p < 1.0 and sae.lambda_t.item() != pytest.approx(0.1)  # annealed, lambda rescaled


def test_sparse_branch_is_sparse(trained):
    x, runs = trained
    s, r = runs["base"][0].encode_branches(x[:1024])
    assert (s >= 0).all()
    assert (s == 0).float().mean() > 0.7
    assert (s > 0).sum(-1).float().mean() < 0.3 * s.shape[1]


def test_nuclear_coeff_lowers_the_rank_of_the_structured_branch(trained):
    x, runs = trained

    def nuclear_and_rank(name):
        _, r = runs[name][0].encode_branches(x[:1024])
        sigma = torch.linalg.svdvals(r)
        return sigma.sum().item(), int((sigma > 1e-2 * sigma[0].clamp_min(1e-12)).sum()) if sigma[0] > 1e-6 else 0

    none_nuc, none_rank = nuclear_and_rank("no_nuc")
    strong_nuc, strong_rank = nuclear_and_rank("strong_nuc")
    assert strong_nuc < 0.5 * none_nuc
    assert strong_rank < none_rank
