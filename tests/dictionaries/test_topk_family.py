"""BatchTopK, Matryoshka and JumpReLU SAEs: defining behaviour, options, persistence, training."""

from __future__ import annotations

import pytest
import torch

from conca.activations.stream import TensorSource
from conca.dictionaries import create, load_dictionary
from conca.dictionaries.jumprelu import JumpReLUFunction, StepFunction
from conca.errors import ConfigError
from conca.training.trainer import TrainConfig, train
from conftest import planted


def quick(**kw) -> TrainConfig:
    base = dict(steps=150, batch_size=256, lr=3e-3, warmup_steps=10, eval_every=50, checkpoint_every=1000,
                init_tokens=1024, eval_tokens=1024, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def fvu(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def randomise_biases(d) -> None:
    with torch.no_grad():
        d.b_enc.normal_()
        d.b_dec.normal_()


# --- BatchTopK -------------------------------------------------------------------------------


def test_batchtopk_training_mode_keeps_k_times_batch_with_varying_per_token_counts():
    torch.manual_seed(0)
    sae = create("batchtopk", d_in=8, n_latents=32, k=3)
    x = torch.randn(64, 8) * torch.linspace(0.2, 3, 64)[:, None]  # token norms differ, so do their counts
    z = sae.encode(x)
    per_token = (z != 0).sum(-1)
    assert int(per_token.sum()) == 3 * 64
    assert per_token.min() < 3 < per_token.max()
    assert (z >= 0).all()
    acts = sae.pre_activation(x).relu()
    assert z[z != 0].min() >= acts[z == 0].max()  # the kept entries are the batch's largest


def test_batchtopk_eval_mode_is_a_jumprelu_on_the_threshold():
    torch.manual_seed(1)
    sae = create("batchtopk", d_in=8, n_latents=32, k=3).eval()
    x = torch.randn(40, 8)
    acts = sae.pre_activation(x).relu()
    assert torch.equal(sae.encode(x), acts)  # threshold not estimated yet (negative): plain ReLU
    with torch.no_grad():
        sae.threshold.fill_(0.7)
    z = sae.encode(x)
    assert torch.equal(z, torch.where(acts > 0.7, acts, torch.zeros_like(acts)))
    assert torch.allclose(sae.encode(x[:5]), z[:5], atol=1e-6)  # per-token: independent of the rest of the batch


def test_batchtopk_threshold_is_an_ema_of_the_smallest_selected_activation():
    torch.manual_seed(2)
    x1, x2 = torch.randn(32, 8), torch.randn(32, 8) * 2
    mins = []
    for beta in (0.999, 0.5):
        sae = create("batchtopk", d_in=8, n_latents=32, k=2, threshold_beta=beta)
        sae.loss_terms(x1)
        z1 = sae.encode(x1)
        assert sae.threshold.item() == pytest.approx(z1[z1 > 0].min().item())  # first batch: taken as is
        z2 = sae.encode(x2)
        sae.loss_terms(x2)
        early_beta = min(beta, 1 / 11)  # the horizon grows with the number of updates: n / (n + 10)
        expected = early_beta * z1[z1 > 0].min() + (1 - early_beta) * z2[z2 > 0].min()
        assert sae.threshold.item() == pytest.approx(expected.item(), rel=1e-5)
        sae.threshold_updates.fill_(100_000)  # late in training the configured beta applies
        start = sae.threshold.item()
        sae.loss_terms(x1)
        late_beta = min(beta, 100_000 / 100_010)
        assert sae.threshold.item() == pytest.approx(late_beta * start + (1 - late_beta) * z1[z1 > 0].min().item(), rel=1e-5)
        mins.append(sae.threshold.item())
        before = sae.threshold.clone()
        sae.eval().loss_terms(x1)  # a loss computed in eval mode does not move it
        assert torch.equal(sae.threshold, before)
    assert mins[0] != pytest.approx(mins[1])
    with pytest.raises(ConfigError, match="threshold_beta"):
        create("batchtopk", d_in=8, n_latents=32, k=2, threshold_beta=1.0)


def test_batchtopk_loss_is_the_training_reconstruction_and_auxk_reaches_dead_latents():
    torch.manual_seed(3)
    sae = create("batchtopk", d_in=8, n_latents=32, k=2, dead_after_tokens=10)
    x = torch.randn(5, 8)
    expected = (sae.decode(sae.encode(x)) - x).pow(2).sum(-1).mean()
    terms = sae.loss_terms(x)
    assert torch.allclose(terms["recon"], expected, atol=1e-5)
    assert set(terms) == {"recon"}  # nothing dead yet (5 tokens < 10)
    point = torch.randn(1, 8).repeat(64, 1) + 0.01 * torch.randn(64, 8)
    terms = sae.loss_terms(point)
    assert "auxk" in terms and terms["auxk"] > 0
    sae.zero_grad()
    terms["auxk"].backward()
    dead = sae.tokens_since_fired >= 10
    rows = sae.W_dec.grad.abs().sum(1) > 0
    assert dead.any() and rows[dead].any() and not rows[~dead].any()


def test_batchtopk_as_transcoder():
    torch.manual_seed(0)
    sae = create("batchtopk", d_in=8, n_latents=32, k=2, d_out=5)
    x, y = torch.randn(10, 8), torch.randn(10, 5)
    with torch.no_grad():
        y_hat = sae.decode(sae.encode(x))  # training mode: the same batch-top-k selection the loss uses
    terms = sae.loss_terms(x, y)
    assert y_hat.shape == (10, 5)
    # The reconstruction error is measured against the target (d_out wide), not against the input.
    assert terms["recon"].item() == pytest.approx((y_hat - y).pow(2).sum(-1).mean().item(), rel=1e-5)


# --- Matryoshka ------------------------------------------------------------------------------


def test_matryoshka_prefix_sizes_from_fractions_and_ints():
    assert create("matryoshka", d_in=8, n_latents=64, k=2).prefix_sizes == [4, 8, 16, 32, 64]
    assert create("matryoshka", d_in=8, n_latents=8, k=2).prefix_sizes == [1, 2, 4, 8]  # rounded sizes kept once
    assert create("matryoshka", d_in=8, n_latents=64, k=2, prefixes=[10, 0.5, 64]).prefix_sizes == [10, 32, 64]
    assert create("matryoshka", d_in=8, n_latents=64, k=2, prefixes=[0.25, 1.0]).prefix_weights == [0.5, 0.5]
    sae = create("matryoshka", d_in=8, n_latents=64, k=2, prefixes=[16, 64], prefix_weights=[3, 1])
    assert sae.prefix_weights == [0.75, 0.25]
    for bad, match in [(dict(prefixes=[32, 16, 64]), "increasing"), (dict(prefixes=[16, 32]), "last prefix"),
                       (dict(prefixes=[1.5, 64]), "fraction"), (dict(prefixes=[]), "empty"),
                       (dict(prefixes=[16, 64], prefix_weights=[1.0]), "entries"),
                       (dict(prefixes=[16, 64], prefix_weights=[-1.0, 2.0]), "non-negative")]:
        with pytest.raises(ConfigError, match=match):
            create("matryoshka", d_in=8, n_latents=64, k=2, **bad)


def test_matryoshka_loss_is_the_weighted_sum_of_prefix_reconstructions():
    torch.manual_seed(4)
    x = torch.randn(24, 8)
    losses = []
    for weights in ([1.0, 1.0, 1.0], [1.0, 0.0, 0.0]):
        torch.manual_seed(5)
        sae = create("matryoshka", d_in=8, n_latents=32, k=3, prefixes=[4, 12, 32], prefix_weights=weights)
        randomise_biases(sae)
        z = sae.encode(x)  # training mode: the same BatchTopK selection as the loss
        errors = [(sae.decode_prefix(z, m) - x).pow(2).sum(-1).mean() for m in (4, 12, 32)]
        w = torch.tensor(weights) / sum(weights)
        loss = sae.loss_terms(x)["recon"]
        assert torch.allclose(loss, sum(wi * e for wi, e in zip(w, errors)), atol=1e-4)
        losses.append(loss.item())
    assert losses[1] != pytest.approx(losses[0])


def test_matryoshka_with_a_single_prefix_is_batchtopk():
    torch.manual_seed(6)
    plain = create("batchtopk", d_in=8, n_latents=32, k=2, dead_after_tokens=40)
    nested = create("matryoshka", d_in=8, n_latents=32, k=2, dead_after_tokens=40, prefixes=[1.0])
    randomise_biases(plain)
    nested.load_state_dict(plain.state_dict())
    for _ in range(3):  # from the second batch on some latents are dead: AuxK is compared too
        x = torch.randn(30, 8)
        a, b = plain.loss_terms(x), nested.loss_terms(x)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6)
    assert "auxk" in a
    assert torch.equal(plain.threshold, nested.threshold)


def test_training_batchtopk_reaches_l0_k_at_inference_and_matryoshka_prefixes_reconstruct():
    x = planted(n_features=32)
    torch.manual_seed(0)
    nested = create("matryoshka", d_in=16, n_latents=32, k=3, threshold_beta=0.9, prefixes=[4, 8, 16, 32])
    torch.manual_seed(0)
    plain = create("batchtopk", d_in=16, n_latents=32, k=3, threshold_beta=0.9)
    result = train({"m": nested, "p": plain}, TensorSource(x), quick(steps=120, eval_every=30))
    for name in "mp":
        hist = result.histories[name]
        assert hist[-1]["fvu"] < 0.9 * hist[0]["fvu"] and hist[-1]["fvu"] < 0.25
        assert hist[-1]["loss"] < hist[0]["loss"]
        assert abs(hist[-1]["l0"] - 3) < 0.5  # eval mode = threshold; per-token counts average k
    held = x[:2048]  # after training both act on raw x (input scale and threshold folded)
    z = plain.encode(held)
    assert abs((z != 0).sum(-1).float().mean().item() - 3) < 0.5
    assert fvu(plain.decode(z), held) < 0.25
    z = nested.encode(held)
    per_prefix = [fvu(nested.decode_prefix(z, m), held) for m in nested.prefix_sizes]
    assert per_prefix[0] < 0.85  # 4 of 32 latents alone already explain part of the variance
    assert all(b < a for a, b in zip(per_prefix, per_prefix[1:]))
    assert per_prefix[-1] < 0.25
    # Without the nested losses, the same leading latents reconstruct worse on their own.
    z = plain.encode(held)
    plain_prefix = [fvu(z[:, :m] @ plain.W_dec[:m] + plain.b_dec, held) for m in (4, 8)]
    assert per_prefix[0] < plain_prefix[0] - 0.05 and per_prefix[1] < plain_prefix[1] - 0.05


# --- JumpReLU --------------------------------------------------------------------------------


def test_jumprelu_output_is_pre_above_threshold_and_exactly_zero_below():
    torch.manual_seed(7)
    sae = create("jumprelu", d_in=8, n_latents=32, init_threshold=0.3)
    assert torch.allclose(sae.threshold, torch.full((32,), 0.3))
    x = torch.randn(50, 8)
    pre = sae.pre_activation(x)
    z = sae.encode(x)
    above = pre > 0.3
    assert above.any() and (~above).any()
    assert torch.equal(z[above], pre[above])
    assert (z[~above] == 0).all()


def test_jumprelu_threshold_gets_gradient_from_reconstruction_and_from_l0():
    torch.manual_seed(8)
    sae = create("jumprelu", d_in=8, n_latents=16, l0_coeff=0.5, sparsity_warmup_steps=0)
    x = torch.randn(4, 8)
    with torch.no_grad():  # put every latent's threshold just below token 0's pre-activation
        sae.log_threshold.copy_((sae.pre_activation(x)[0].abs() - 2e-4).clamp_min(1e-3).log())
    terms = sae.loss_terms(x)
    g_recon = torch.autograd.grad(terms["recon"], sae.log_threshold, retain_graph=True)[0]
    g_l0, g_enc = torch.autograd.grad(terms["sparsity"], (sae.log_threshold, sae.W_enc))
    inside = sae.pre_activation(x)[0] > sae.threshold  # latents whose kernel window holds token 0
    assert inside.any()
    assert (g_recon[inside] != 0).all() and (g_l0[inside] != 0).all()
    assert (g_l0[inside] < 0).all()  # raising a threshold lowers L0
    assert (g_enc == 0).all()  # the Heaviside passes no gradient to the pre-activations


def test_jumprelu_straight_through_estimators_match_the_paper():
    theta = torch.tensor([0.5, 0.5], requires_grad=True)
    pre = torch.tensor([[0.5003, 0.9]], requires_grad=True)
    out = JumpReLUFunction.apply(pre, theta, 0.001)
    assert torch.equal(out.detach(), pre.detach())
    g_pre, g_theta = torch.autograd.grad(out.sum(), (pre, theta))
    # d/dtheta = -(theta/eps) K((pre - theta)/eps): only the first entry lies in the window.
    assert torch.allclose(g_theta, torch.tensor([-500.0, 0.0]))
    assert torch.equal(g_pre, torch.ones(1, 2))
    step = StepFunction.apply(pre, theta, 0.001)
    g_pre, g_theta = torch.autograd.grad(step.sum(), (pre, theta))
    assert torch.allclose(g_theta, torch.tensor([-1000.0, 0.0])) and (g_pre == 0).all()
    # A wider bandwidth sees the second entry too, with a smaller kernel height.
    g_wide = torch.autograd.grad(StepFunction.apply(pre, theta, 1.0).sum(), theta)[0]
    assert torch.allclose(g_wide, torch.tensor([-1.0, -1.0]))


def test_jumprelu_sparsity_term_counts_active_latents_with_warmup_and_target():
    torch.manual_seed(9)
    x = torch.randn(20, 8)
    sae = create("jumprelu", d_in=8, n_latents=32, l0_coeff=0.5, sparsity_warmup_steps=0, init_threshold=0.2)
    count = (sae.encode(x) != 0).sum(-1).float().mean()
    assert 0 < count < 32
    assert torch.allclose(sae.loss_terms(x)["sparsity"], 0.5 * count)
    warm = create("jumprelu", d_in=8, n_latents=32, l0_coeff=0.5, sparsity_warmup_steps=10, init_threshold=0.2)
    warm.load_state_dict(sae.state_dict())
    warm.set_progress(1, 100)  # (1 + 1) / 10 of the way through the warm-up
    assert torch.allclose(warm.loss_terms(x)["sparsity"], 0.2 * 0.5 * count)
    target = create("jumprelu", d_in=8, n_latents=32, l0_coeff=0.5, sparsity_warmup_steps=0, init_threshold=0.2,
                    target_l0=4.0)
    target.load_state_dict(sae.state_dict())
    assert torch.allclose(target.loss_terms(x)["sparsity"], 0.5 * (count / 4 - 1) ** 2)
    grads = []
    for eps in (0.001, 1.0):  # the bandwidth option reaches the estimators: a wide window sees many tokens
        wide = create("jumprelu", d_in=8, n_latents=32, l0_coeff=0.5, sparsity_warmup_steps=0, bandwidth=eps)
        wide.load_state_dict(sae.state_dict())
        grads.append(torch.autograd.grad(wide.loss_terms(x)["sparsity"], wide.log_threshold)[0])
    assert (grads[1] != 0).sum() > (grads[0] != 0).sum()
    for bad in (dict(bandwidth=0.0), dict(init_threshold=-1.0), dict(target_l0=0.0), dict(sparsity_warmup_steps=-1)):
        with pytest.raises(ConfigError):
            create("jumprelu", d_in=8, n_latents=32, **bad)


def test_jumprelu_unit_norm_decoder_option():
    x = torch.randn(32, 8)
    norms = {}
    for flag in (True, False):
        torch.manual_seed(10)
        sae = create("jumprelu", d_in=8, n_latents=16, init_threshold=0.1, unit_norm_decoder=flag)
        opt = torch.optim.Adam(sae.parameters(), lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            sum(sae.loss_terms(x).values()).backward()
            sae.before_optimizer_step()
            opt.step()
            sae.after_optimizer_step(opt, x)
        norms[flag] = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms[True], torch.ones(16), atol=1e-6)
    assert not torch.allclose(norms[False], torch.ones(16), atol=1e-2)


def test_jumprelu_training_reduces_fvu_and_l0():
    torch.manual_seed(0)
    sae = create("jumprelu", d_in=16, n_latents=48, l0_coeff=0.03, init_threshold=0.1, bandwidth=0.05,
                 sparsity_warmup_steps=20)
    start_threshold = sae.threshold.detach().clone()
    result = train({"a": sae}, TensorSource(planted()), quick(steps=120, eval_every=30))
    hist = result.histories["a"]
    assert hist[-1]["fvu"] < 0.7 * hist[0]["fvu"] and hist[-1]["fvu"] < 0.2
    assert hist[-1]["l0"] < 0.8 * hist[0]["l0"]
    assert hist[-1]["recon"] < hist[0]["recon"]
    assert (sae.threshold * result.input_scale > start_threshold).float().mean() > 0.9  # thresholds were learnt


# --- all three -------------------------------------------------------------------------------

METHODS = [
    ("batchtopk", dict(k=3)),
    ("matryoshka", dict(k=3, prefixes=[0.125, 0.5, 1.0], prefix_weights=[1.0, 2.0, 3.0])),
    ("jumprelu", dict(init_threshold=0.2, bandwidth=0.01)),
]


def _trained_a_little(method: str, options: dict):
    torch.manual_seed(11)
    sae = create(method, d_in=8, n_latents=32, **options)
    randomise_biases(sae)
    x = torch.randn(64, 8) + 1
    sae.init_from_data(x)
    sae.loss_terms(x)  # BatchTopK: sets the threshold
    return sae.eval()


@pytest.mark.parametrize("method,options", METHODS)
def test_save_load_roundtrip_gives_identical_encodings(tmp_path, method, options):
    sae = _trained_a_little(method, options)
    sae.save(tmp_path / method)
    loaded = load_dictionary(tmp_path / method)
    assert not loaded.training and type(loaded) is type(sae)
    x = torch.randn(40, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))
    assert torch.equal(loaded.decoder_directions, sae.W_dec)
    if method != "jumprelu":
        assert loaded.threshold.item() == sae.threshold.item() > 0


@pytest.mark.parametrize("method,options", METHODS)
def test_fold_input_scale_preserves_function(method, options):
    sae = _trained_a_little(method, options)
    x = torch.randn(50, 8) * 7
    scale = 0.25
    expected_z = sae.encode(x * scale) / scale
    expected_x = sae(x * scale) / scale
    sae.fold_input_scale(scale)
    assert torch.allclose(sae.encode(x), expected_z, atol=1e-4)
    assert torch.allclose(sae(x), expected_x, atol=1e-4)


@pytest.mark.parametrize("method,options", METHODS)
def test_decoder_rows_stay_unit_norm(method, options):
    sae = create(method, d_in=8, n_latents=16, **options)
    sum(sae.loss_terms(torch.randn(32, 8)).values()).backward()
    sae.before_optimizer_step()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(16), atol=1e-5)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.after_optimizer_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-6)


def test_geometric_median_decoder_bias_init():
    x = torch.randn(256, 8) + torch.arange(8.0)
    for method, options in METHODS:
        sae = create(method, d_in=8, n_latents=16, **options)
        sae.init_from_data(x)
        assert torch.allclose(sae.b_dec, torch.arange(8.0), atol=0.3)


def test_calibrate_gives_an_untrained_batchtopk_its_sparsity_without_changing_a_weight():
    # An untrained BatchTopK has no inference threshold (-1): eval-mode encoding is plain ReLU, dense.
    # calibrate() sets it as the first training step does, so a chance floor is k-sparse like the trained one.
    torch.manual_seed(0)
    sae = create("batchtopk", d_in=16, n_latents=64, k=4).eval()
    x = torch.randn(256, 16)
    assert (sae.encode(x) > 0).float().sum(1).mean() > 16
    weights = {k: v.clone() for k, v in sae.state_dict().items() if not k.startswith("threshold")}
    assert sae.calibrate(x) is sae
    # Strictly above the smallest selected activation: k*B - 1 entries survive on the same tokens.
    assert (sae.encode(x) > 0).float().sum().item() == 4 * 256 - 1
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in weights.items())
    assert sae.threshold_updates.item() == 1


def test_calibrate_changes_nothing_for_methods_that_set_no_inference_state_from_data():
    torch.manual_seed(0)
    x = torch.randn(128, 16)
    for method in ("topk", "conca"):
        d = create(method, d_in=16, n_latents=32).eval()
        before = d.encode(x)
        state = {k: v.clone() for k, v in d.state_dict().items()}
        assert d.calibrate(x) is d
        assert torch.equal(d.encode(x), before)
        assert all(torch.equal(v, d.state_dict()[k]) for k, v in state.items())
