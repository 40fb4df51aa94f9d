"""ReLU-family SAEs: L1 (classic and April-update forms), Gated, and p-annealing."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

import conca.dictionaries.relu  # noqa: F401  (registers relu_l1, gated, p_anneal)
from conca.activations.stream import TensorSource
from conca.dictionaries.base import create, load_dictionary
from conca.dictionaries.init import geometric_median
from conca.dictionaries.relu import lp_p
from conca.errors import ConfigError
from conca.training.trainer import TrainConfig, train
from conftest import planted

METHODS = ["relu_l1", "gated", "p_anneal"]


def quick(**kw) -> TrainConfig:
    base = dict(steps=120, batch_size=256, lr=3e-3, warmup_steps=10, eval_every=20, checkpoint_every=1000,
                init_tokens=1024, eval_tokens=1024, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def randomise_biases(d) -> None:
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                p.normal_()


# --- shared protocol -------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_save_load_roundtrip_is_exact(method, tmp_path):
    torch.manual_seed(0)
    d = create(method, d_in=8, n_latents=24)
    randomise_biases(d)
    d.save(tmp_path / method)
    loaded = load_dictionary(tmp_path / method)
    assert loaded.name == method and loaded.config == d.config
    x = torch.randn(30, 8)
    assert torch.equal(loaded.encode(x), d.encode(x)) and (d.encode(x) > 0).any()
    assert torch.equal(loaded(x), d(x))


@pytest.mark.parametrize("method", METHODS)
def test_fold_input_scale_preserves_function(method):
    torch.manual_seed(1)
    d = create(method, d_in=8, n_latents=32)
    randomise_biases(d)
    x = torch.randn(50, 8) * 7
    scale = 0.25
    expected_z, expected_x = d.encode(x * scale) / scale, d(x * scale) / scale
    d.fold_input_scale(scale)
    assert (expected_z > 0).any()
    assert torch.allclose(d.encode(x), expected_z, atol=1e-4)
    assert torch.allclose(d(x), expected_x, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_init_geometric_median_bias_and_tied_encoder(method):
    torch.manual_seed(2)
    d = create(method, d_in=6, n_latents=12)
    enc = d.W_gate if method == "gated" else d.W_enc
    assert torch.equal(enc, d.W_dec.T)
    x = torch.randn(200, 6) + 3
    x[:5] += 100  # outliers: the median ignores them, the mean would not
    d.init_from_data(x)
    assert torch.allclose(d.b_dec, geometric_median(x))
    assert d.decoder_directions.shape == (12, 6)


def test_config_validation():
    with pytest.raises(ConfigError, match="penalty must be"):
        create("relu_l1", d_in=4, n_latents=8, penalty="l2")
    with pytest.raises(ConfigError, match="l1_coeff"):
        create("gated", d_in=4, n_latents=8, l1_coeff=-1)
    with pytest.raises(ConfigError, match="p_end"):
        create("p_anneal", d_in=4, n_latents=8, p_end=0.0)
    with pytest.raises(ConfigError, match="anneal_start"):
        create("p_anneal", d_in=4, n_latents=8, anneal_start=1.5)
    with pytest.raises(ConfigError, match="resample_every"):
        create("relu_l1", d_in=4, n_latents=8, resample_every=-1)


def _train(method: str, data: torch.Tensor, out_dir, n_latents: int = 48, **kw):
    torch.manual_seed(0)
    d = create(method, d_in=data.shape[1], n_latents=n_latents, **kw)
    return d, train({"a": d}, TensorSource(data), quick(), out_dir=out_dir)


@pytest.mark.parametrize("method,kw", [
    ("relu_l1", dict(l1_coeff=0.1)),
    ("relu_l1", dict(l1_coeff=0.2, penalty="decoder_norm")),  # starts from 0.1-norm rows: slower
    ("gated", dict(l1_coeff=0.1)),
    ("p_anneal", dict(l1_coeff=0.1, sparsity_warmup_steps=0, anneal_start=0.5)),
])
def test_training_reduces_fvu_and_is_sparse(method, kw, tmp_path):
    data = planted(n=2048)
    d, result = _train(method, data, tmp_path, **kw)
    hist = result.histories["a"]
    assert hist[-1]["fvu"] < 0.5 * hist[0]["fvu"] and hist[-1]["fvu"] < 0.2
    assert hist[-1]["recon"] < hist[0]["recon"]
    assert hist[-1]["l0"] < 48 / 3  # well below n_latents (truth: 3 of 24)
    saved = load_dictionary(tmp_path / "a")  # scale folded in: acts on raw inputs
    fvu = ((saved(data) - data).pow(2).sum() / (data - data.mean(0)).pow(2).sum()).item()
    assert fvu == pytest.approx(hist[-1]["fvu"], rel=0.2, abs=0.01)
    if method == "p_anneal":  # the trainer's progress drives the schedule to the end
        assert float(d.p) == pytest.approx(d.config.p_end) and hist[-1]["lp"] > 0


# --- relu_l1 -----------------------------------------------------------------------------

def test_l1_penalty_is_sum_of_latents_and_decoder_norm_form_weights_it():
    torch.manual_seed(3)
    x = torch.randn(40, 8)
    a = create("relu_l1", d_in=8, n_latents=16, l1_coeff=0.5)
    b = create("relu_l1", d_in=8, n_latents=16, l1_coeff=0.5, penalty="decoder_norm")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.W_dec.mul_(torch.linspace(0.5, 3, 16)[:, None])
    za, zb = a.encode(x), b.encode(x)
    assert torch.allclose(a.loss_terms(x)["l1"], 0.5 * za.sum(-1).mean())
    assert torch.allclose(b.loss_terms(x)["l1"], 0.5 * (zb * b.W_dec.norm(dim=1)).sum(-1).mean())
    # recon = the encode/decode reconstruction
    assert torch.allclose(a.loss_terms(x)["recon"], (a(x) - x).pow(2).sum(-1).mean())


def test_decoder_constraint_only_in_l1_form():
    x = torch.randn(32, 8)
    for penalty, unit in (("l1", True), ("decoder_norm", False)):
        torch.manual_seed(4)
        d = create("relu_l1", d_in=8, n_latents=16, penalty=penalty)
        sum(d.loss_terms(x).values()).backward()
        grad = d.W_dec.grad.clone()
        d.before_optimizer_step()
        radial = (d.W_dec.grad * d.W_dec / d.W_dec.norm(dim=1, keepdim=True)).sum(1)
        assert torch.allclose(radial, torch.zeros(16), atol=1e-5) == unit
        assert torch.equal(d.W_dec.grad, grad) != unit
        with torch.no_grad():
            d.W_dec.mul_(3)
        d.after_optimizer_step()
        assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(16), atol=1e-6) == unit
    # April update starts from small decoder rows; the classic form from unit rows.
    assert torch.allclose(create("relu_l1", d_in=8, n_latents=4, penalty="decoder_norm").W_dec.norm(dim=1),
                          torch.full((4,), 0.1))


def test_sparsity_warmup_ramps_the_coefficient():
    torch.manual_seed(5)
    x = torch.randn(20, 8)
    d = create("relu_l1", d_in=8, n_latents=16, sparsity_warmup_steps=10)
    full = create("relu_l1", d_in=8, n_latents=16)
    full.load_state_dict(d.state_dict())
    d.set_progress(0, 100)
    assert torch.allclose(d.loss_terms(x)["l1"], 0.1 * full.loss_terms(x)["l1"])
    d.set_progress(4, 100)
    assert torch.allclose(d.loss_terms(x)["l1"], 0.5 * full.loss_terms(x)["l1"])
    d.set_progress(50, 100)
    assert torch.allclose(d.loss_terms(x)["l1"], full.loss_terms(x)["l1"])


def _one_step(d, x, opt):
    loss = sum(d.loss_terms(x).values())
    opt.zero_grad()
    loss.backward()
    d.before_optimizer_step()
    opt.step()
    d.after_optimizer_step(opt, x)


def test_resampling_reinitialises_dead_latents_from_badly_reconstructed_inputs():
    torch.manual_seed(6)
    d = create("relu_l1", d_in=8, n_latents=16, resample_every=3)
    with torch.no_grad():
        d.b_enc[8:] = -100.0  # latents 8..15 can never fire
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    x = torch.randn(64, 8)
    x[7] *= 50  # by far the worst-reconstructed input: chosen with probability ~1
    for step in range(2):
        d.set_progress(step, 100)
        _one_step(d, x, opt)
    assert (d.b_enc[8:] < -90).all()  # not resampled yet
    assert d.fired[:8].any() and not d.fired[8:].any()
    for p in (d.W_enc, d.b_enc, d.W_dec):  # stale moments, as a latent that died long ago would have
        opt.state[p]["exp_avg"].fill_(1.0)
        opt.state[p]["exp_avg_sq"].fill_(1.0)
    d.set_progress(2, 100)
    _one_step(d, x, opt)
    dead = torch.arange(8, 16)
    assert (d.b_enc[dead] == 0).all()
    assert not d.fired.any()  # firing record restarts after a resample
    directions = x - d.b_dec
    directions = directions / directions.norm(dim=1, keepdim=True)
    sims = d.W_dec[dead] @ directions.T  # every new decoder row is one of the batch's inputs
    assert torch.allclose(sims.max(1).values, torch.ones(8), atol=1e-5)
    assert (sims.argmax(1) == 7).sum() == 1  # the outlier was drawn (once: no replacement)
    alive_norm = d.W_enc[:, :8].norm(dim=0).mean()
    assert torch.allclose(d.W_enc[:, dead].norm(dim=0), torch.full((8,), 0.2) * alive_norm, rtol=1e-4)
    for p, sl in ((d.W_enc, (slice(None), dead)), (d.b_enc, dead), (d.W_dec, dead)):
        st = opt.state[p]
        assert (st["exp_avg"][sl] == 0).all() and (st["exp_avg_sq"][sl] == 0).all()
    assert (opt.state[d.b_enc]["exp_avg_sq"][:8] > 0.9).all()  # alive latents keep their moments


def test_resample_every_zero_and_decoder_norm_default_disable_resampling():
    for kw, resampled in ((dict(), True), (dict(resample_every=0), False), (dict(penalty="decoder_norm"), False)):
        torch.manual_seed(6)
        d = create("relu_l1", d_in=8, n_latents=16, **kw)
        with torch.no_grad():
            d.b_enc[8:] = -100.0
        opt = torch.optim.Adam(d.parameters(), lr=1e-3)
        x = torch.randn(64, 8)
        for step in range(2500):
            d.train_step = step  # cheap: only the resample trigger depends on the step
            if step in (0, 2499):
                _one_step(d, x, opt)
        assert (d.b_enc[8:] == 0).all() == resampled and (d.b_enc[8:] < -90).all() != resampled
    assert create("relu_l1", d_in=4, n_latents=8).resample_period == 2500


# --- gated -------------------------------------------------------------------------------

def _gated(seed=7):
    torch.manual_seed(seed)
    d = create("gated", d_in=8, n_latents=32, l1_coeff=0.3)
    randomise_biases(d)
    return d


def test_gated_latents_are_zero_where_gate_is_closed_and_magnitudes_use_rmag():
    d = _gated()
    x = torch.randn(100, 8)
    pi_gate, pi_mag = d.pre_activations(x)
    z = d.encode(x)
    assert (pi_gate <= 0).any() and (pi_gate > 0).any()
    assert (z[pi_gate <= 0] == 0).all()
    open_ = pi_gate > 0
    assert torch.allclose(z[open_], pi_mag.relu()[open_])
    # weight sharing: pi_mag = exp(r_mag) * (W_g (x - b_d)) + b_mag
    centred = (x - d.b_dec) @ d.W_gate
    assert torch.allclose(pi_mag, centred * d.r_mag.exp() + d.b_mag, atol=1e-5)
    assert set(d.loss_terms(x)) == {"recon", "l1", "aux_recon"}


def test_gated_l1_does_not_shrink_magnitudes():
    d = _gated()
    x = torch.randn(100, 8)
    d.loss_terms(x)["l1"].backward()
    assert d.r_mag.grad is None or (d.r_mag.grad == 0).all()
    assert d.b_mag.grad is None or (d.b_mag.grad == 0).all()
    assert d.W_dec.grad is None or (d.W_dec.grad == 0).all()
    assert d.W_gate.grad.abs().sum() > 0 and d.b_gate.grad.abs().sum() > 0


def test_gated_aux_reconstruction_trains_the_gate_through_a_frozen_decoder():
    d = _gated()
    x = torch.randn(100, 8)
    aux = d.loss_terms(x)["aux_recon"]
    pi_gate, _ = d.pre_activations(x)
    # It is the reconstruction from ReLU(pi_gate) through the (frozen) decoder.
    assert torch.allclose(aux, (pi_gate.relu() @ d.W_dec + d.b_dec - x).pow(2).sum(-1).mean())
    aux.backward()
    assert d.W_gate.grad.abs().sum() > 0 and d.b_gate.grad.abs().sum() > 0
    assert d.W_dec.grad is None or (d.W_dec.grad == 0).all()
    assert d.r_mag.grad is None or (d.r_mag.grad == 0).all()
    # b_d gets only what flows back through the encoder's input centring x - b_d (paper eq. 8),
    # nothing from its frozen copy in the decoder: grad = -W_g dL/dpi_gate summed over tokens.
    pi_gate = pi_gate.detach().requires_grad_(True)
    aux_of_pi = (pi_gate.relu() @ d.W_dec.detach() + d.b_dec.detach() - x).pow(2).sum(-1).mean()
    (g,) = torch.autograd.grad(aux_of_pi, pi_gate)
    assert torch.allclose(d.b_dec.grad, -(g @ d.W_gate.detach().T).sum(0), atol=1e-4)


def test_gated_recon_trains_magnitudes_and_decoder():
    d = _gated()
    x = torch.randn(100, 8)
    d.loss_terms(x)["recon"].backward()
    for p in (d.r_mag, d.b_mag, d.W_dec, d.b_dec, d.W_gate):
        assert p.grad.abs().sum() > 0
    assert d.b_gate.grad is None or (d.b_gate.grad == 0).all()  # the Heaviside gate passes nothing


def test_gated_sparsity_warmup_and_unit_decoder():
    d = create("gated", d_in=8, n_latents=16, sparsity_warmup_steps=4)
    x = torch.randn(20, 8)
    d.set_progress(0, 10)
    l1_early = d.loss_terms(x)["l1"]
    d.set_progress(3, 10)
    assert torch.allclose(d.loss_terms(x)["l1"], 4 * l1_early)
    with torch.no_grad():
        d.W_dec.mul_(2)
    d.after_optimizer_step()
    assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(16), atol=1e-6)


# --- p_anneal ----------------------------------------------------------------------------

def test_lp_p_is_sum_of_powers_and_has_finite_gradients():
    z = torch.tensor([[0.0, 4.0, 1.0], [9.0, 0.0, 0.0]], requires_grad=True)
    assert torch.allclose(lp_p(z, 0.5), torch.tensor((2 + 1 + 3) / 2))
    lp_p(z, 0.5).backward()
    assert torch.isfinite(z.grad).all() and z.grad[0, 0] == 0


def _p_run(steps: int = 100, **kw):
    torch.manual_seed(8)
    d = create("p_anneal", d_in=8, n_latents=32, sparsity_warmup_steps=0, **kw)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(8)) + 0.5
    seen = []
    for step in range(steps):
        d.set_progress(step, steps)
        p_before, coeff_before = float(d.p), float(d.sparsity_coeff)
        z = d.encode(x).detach()
        term = d.loss_terms(x)["lp"]
        seen.append((step, float(d.p), term.item(), p_before, coeff_before, lp_p(z, p_before).item() * coeff_before))
    return d, seen


def test_p_stays_at_start_before_anneal_start_and_reaches_p_end():
    d, seen = _p_run(anneal_start=0.5, p_end=0.3)
    assert all(p == 1.0 for step, p, *_ in seen if step < 50)
    assert seen[50][1] < 1.0
    assert seen[-1][1] == pytest.approx(0.3)
    ps = [p for _, p, *_ in seen]
    assert all(a >= b for a, b in zip(ps, ps[1:]))  # monotone
    d2, seen2 = _p_run(anneal_start=0.5, p_start=0.8, p_end=0.3)
    assert seen2[0][1] == pytest.approx(0.8)


def test_coefficient_is_rescaled_so_the_penalty_is_continuous_at_each_change():
    d, seen = _p_run(anneal_start=0.2, p_end=0.2)
    changes = [s for s in seen if s[1] != s[3]]
    assert len(changes) == 10
    for step, p, term, p_before, coeff_before, old_penalty in changes:
        assert term == pytest.approx(old_penalty, rel=1e-4)  # same batch, same model: same value
    assert float(d.sparsity_coeff) != pytest.approx(0.1)  # it did change
    # Without the rescale the penalty would jump (z^p != z for z != 1); no training, so z is fixed.
    z = d.encode(torch.randn(64, 8, generator=torch.Generator().manual_seed(8)) + 0.5).detach()
    for step, p, term, p_before, coeff_before, _ in changes[:3]:
        assert term != pytest.approx(coeff_before * lp_p(z, p).item(), rel=1e-2)


def test_n_sparsity_updates_sets_the_number_of_p_values():
    for n in (2, 5):
        _, seen = _p_run(anneal_start=0.3, n_sparsity_updates=n)
        assert len({p for _, p, *_ in seen}) == n + 1


def test_p_and_coefficient_are_buffers_in_the_checkpoint_state():
    d, _ = _p_run(anneal_start=0.2)
    state = d.state_dict()
    assert {"p", "sparsity_coeff", "p_index"} <= set(state)
    fresh = create("p_anneal", **asdict(d.config))
    fresh.load_state_dict(state)
    assert float(fresh.p) == float(d.p) < 1 and float(fresh.sparsity_coeff) == float(d.sparsity_coeff)


def test_p_anneal_can_resample():
    torch.manual_seed(9)
    d = create("p_anneal", d_in=8, n_latents=16, resample_every=2)
    with torch.no_grad():
        d.b_enc[8:] = -100.0
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    x = torch.randn(64, 8)
    for step in range(2):
        d.set_progress(step, 100)
        _one_step(d, x, opt)
    assert (d.b_enc[8:] == 0).all()


# --- transcoders ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_transcoder_mode_encodes_uncentred_input(method):
    torch.manual_seed(10)
    d = create(method, d_in=8, n_latents=16, d_out=5)
    x, y = torch.randn(20, 8), torch.randn(20, 5)
    z = d.encode(x)
    with torch.no_grad():
        d.b_dec.add_(3.0)  # the output bias does not move the encoder's input
    assert torch.equal(d.encode(x), z)
    assert d(x).shape == (20, 5) and d.decoder_directions.shape == (16, 5)
    terms = d.loss_terms(x, y)
    assert torch.allclose(terms["recon"], (d(x) - y).pow(2).sum(-1).mean())


def test_transcoder_resampling_points_decoder_rows_at_targets():
    torch.manual_seed(11)
    d = create("relu_l1", d_in=8, n_latents=16, d_out=5, resample_every=1)
    with torch.no_grad():
        d.b_enc[8:] = -100.0
    x, y = torch.randn(64, 8), torch.randn(64, 5)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    d.set_progress(0, 10)
    loss = sum(d.loss_terms(x, y).values())
    loss.backward()
    d.before_optimizer_step()
    opt.step()
    d.after_optimizer_step(opt, x)
    dead = torch.arange(8, 16)
    assert (d.b_enc[dead] == 0).all()
    targets = (y - d.b_dec) / (y - d.b_dec).norm(dim=1, keepdim=True)
    inputs = x / x.norm(dim=1, keepdim=True)
    assert torch.allclose((d.W_dec[dead] @ targets.T).max(1).values, torch.ones(8), atol=1e-5)
    enc = d.W_enc[:, dead] / d.W_enc[:, dead].norm(dim=0)
    assert torch.allclose((inputs @ enc).max(0).values, torch.ones(8), atol=1e-5)
