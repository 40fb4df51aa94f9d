"""Sparse ConCA: the 12 registered variants, each normalisation's and each g's defining behaviour,
every option, folding, save/load and training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conca.activations.stream import TensorSource
from conca.dictionaries import create, load_dictionary, methods
from conca.dictionaries.conca import GS, NORMS, PAPER_GS, VARIANTS, sparsity_function
from conca.errors import ConfigError
from conca.training.trainer import TrainConfig, train
from conftest import planted


def quick(**kw):
    base = dict(steps=150, batch_size=256, lr=3e-3, warmup_steps=10, eval_every=50, checkpoint_every=0,
                init_tokens=1024, eval_tokens=1024, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def with_random_affine(d):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return d


def test_the_twelve_paper_variants_are_registered_with_their_settings():
    names = [f"conca_{n}_{g}" for n in NORMS for g in PAPER_GS]
    assert len(names) == 12 and set(names) <= set(methods()) and set(VARIANTS) == set(names)
    for name in names:
        d = create(name, d_in=8, n_latents=16)
        _, norm, g = name.split("_")
        assert (d.config.norm, d.config.g, d.config.alpha) == (norm, g, 1e-4)
        assert d.encode(torch.randn(5, 8)).shape == (5, 16)
    with pytest.raises(ConfigError, match="fixes norm=layernorm"):
        create("conca_layernorm_softplus", d_in=8, n_latents=16, norm="batchnorm")


@pytest.mark.parametrize("bad,match", [({"norm": "rmsnorm"}, "unknown ConCA normalisation"), ({"g": "relu"}, "unknown ConCA sparsity"),
                                       ({"alpha": -1.0}, "alpha"), ({"norm": "groupnorm", "num_groups": 5}, "divide n_latents"),
                                       ({"dropout": 1.0}, "dropout"), ({"exp_clamp": 0.0}, "exp_clamp"),
                                       ({"batchnorm_momentum": 0.0}, "batchnorm_momentum")])
def test_bad_options_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        create("conca", d_in=8, n_latents=16, **bad)


def test_encoder_is_linear_before_the_normalisation_and_decoder_linear():
    d = with_random_affine(create("conca", d_in=6, n_latents=12, norm="dropout")).eval()
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    lin = lambda x: d.encode(x) - d.encode(torch.zeros(1, 6))  # noqa: E731
    assert torch.allclose(lin(2 * a + b), 2 * lin(a) + lin(b), atol=1e-5)  # no ReLU anywhere
    z = torch.randn(3, 12)
    assert torch.allclose(d.decode(z), z @ d.W_dec + d.b_dec)


def test_layernorm_normalises_each_token_over_latents():
    d = create("conca_layernorm_softplus", d_in=8, n_latents=32)
    z = d.encode(torch.randn(10, 8) * 5 + 3)
    assert torch.allclose(z.mean(1), torch.zeros(10), atol=1e-5)
    assert torch.allclose(z.var(1, unbiased=False), torch.ones(10), atol=1e-3)


@pytest.mark.parametrize("groups", [4, 8])
def test_groupnorm_normalises_each_group_separately(groups):
    d = create("conca", d_in=8, n_latents=32, norm="groupnorm", num_groups=groups)
    z = d.encode(torch.randn(10, 8) * 5 + 3).reshape(10, groups, 32 // groups)
    assert torch.allclose(z.mean(-1), torch.zeros(10, groups), atol=1e-5)
    assert torch.allclose(z.var(-1, unbiased=False), torch.ones(10, groups), atol=1e-2)
    # One group is not the same as LayerNorm over all latents unless groups == 1.
    ln = create("conca", d_in=8, n_latents=32, norm="layernorm")
    ln.load_state_dict(d.state_dict())
    x = torch.randn(4, 8)
    assert not torch.allclose(ln.encode(x), d.encode(x), atol=1e-3)


def test_batchnorm_uses_batch_statistics_in_training_and_running_statistics_at_inference():
    torch.manual_seed(0)
    d = create("conca_batchnorm_softplus", d_in=8, n_latents=16, batchnorm_momentum=0.5)
    x = torch.randn(64, 8) * 3 + 1
    d.train()
    z = d.encode(x)
    assert torch.allclose(z.mean(0), torch.zeros(16), atol=1e-5)  # per latent, over the batch
    assert not torch.allclose(d.running_mean, torch.zeros(16))  # statistics were tracked
    d.eval()
    first = d.encode(x[:1])
    # Inference does not depend on the batch. Not bit-exact: on some CPUs (AMX) the matmul kernel for
    # 1 row rounds differently from the one for 2 (1e-7); batch statistics would move latents by O(1).
    assert torch.allclose(first, d.encode(x[:2])[:1], rtol=0, atol=1e-5)
    assert not torch.allclose(first, z[:1], atol=1e-3)


def test_calibrate_sets_an_untrained_batchnorm_to_the_data_statistics_changing_no_weight():
    # Untrained, BatchNorm's running statistics are 0 and 1: eval-mode latents are the raw pre-activations,
    # on another scale than a trained one's. calibrate() sets them to the pre-activations' statistics on x.
    torch.manual_seed(0)
    d = create("conca_batchnorm_softplus", d_in=8, n_latents=16).eval()
    x = torch.randn(512, 8) * 3 + 1
    assert d.encode(x).std(0).mean() > 1.3  # uncalibrated: the pre-activations' own scale
    weights = {k: v.clone() for k, v in d.state_dict().items() if not k.startswith("running_")}
    assert d.calibrate(x) is d
    z = d.encode(x)
    assert torch.allclose(z.mean(0), torch.zeros(16), atol=1e-4) and torch.allclose(z.std(0), torch.ones(16), atol=1e-3)
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in weights.items())
    # Other norms keep nothing from data: calibrate leaves them as they were.
    ln = create("conca_layernorm_softplus", d_in=8, n_latents=16).eval()
    before = ln.encode(x)
    assert torch.equal(ln.calibrate(x).encode(x), before) and torch.equal(ln.running_mean, torch.zeros(16))


def test_batchnorm_momentum_controls_the_running_statistics():
    x = torch.randn(64, 8) * 3 + 1
    means = []
    for momentum in (0.1, 0.9):
        torch.manual_seed(0)
        d = create("conca_batchnorm_softplus", d_in=8, n_latents=16, batchnorm_momentum=momentum).train()
        d.encode(x)
        means.append(d.running_mean.abs().sum().item())
    assert means[1] == pytest.approx(9 * means[0], rel=1e-4)


def test_dropout_zeroes_latents_only_in_training_with_the_given_rate():
    torch.manual_seed(0)
    d = create("conca_dropout_softplus", d_in=8, n_latents=512, dropout=0.3)
    x = torch.randn(64, 8)
    zero_share = (d.train().encode(x) == 0).float().mean().item()
    assert zero_share == pytest.approx(0.3, abs=0.02)
    assert (d.eval().encode(x) == 0).float().mean().item() == 0.0
    assert torch.allclose(d.encode(x), x @ d.W_enc + d.b_enc)  # inference: the bare linear encoder


def test_norm_affine_adds_learnable_scale_and_shift():
    with_affine = create("conca", d_in=8, n_latents=16)
    without = create("conca", d_in=8, n_latents=16, norm_affine=False)
    names = lambda d: {n for n, _ in d.named_parameters()}  # noqa: E731
    assert names(with_affine) - names(without) == {"norm_weight", "norm_bias"}
    assert "norm_weight" not in names(create("conca", d_in=8, n_latents=16, norm="dropout"))


def test_sparsity_functions_match_their_formulas():
    z = torch.linspace(-6, 3, 50)
    assert torch.allclose(sparsity_function("softplus", z), torch.log1p(torch.exp(z)))
    assert torch.allclose(sparsity_function("elu", z), torch.where(z > 0, z, torch.exp(z) - 1))
    assert torch.allclose(sparsity_function("selu", z), F.selu(z))
    neg = z[z <= 0]
    assert torch.allclose(sparsity_function("elu_plus_one", neg), torch.exp(neg), atol=1e-6)  # exp where it matters
    shifted = sparsity_function("selu_shift", z)
    assert (shifted >= 0).all() and sparsity_function("selu_shift", torch.tensor([-50.0])).item() == pytest.approx(0, abs=1e-6)
    assert torch.allclose(sparsity_function("exp", z), torch.exp(z))
    # Softplus approximates exp for very negative log-posteriors (the reason it stands in for exp).
    assert sparsity_function("softplus", torch.tensor(-8.0)).item() == pytest.approx(math.exp(-8), rel=1e-3)
    assert set(GS) == {"selu", "softplus", "elu", "elu_plus_one", "selu_shift", "exp"}


def test_penalty_is_alpha_times_summed_abs_g_and_changes_with_g():
    x = torch.randn(16, 8)
    values = {}
    for g in GS:
        torch.manual_seed(0)
        d = create("conca", d_in=8, n_latents=16, g=g, alpha=0.5)
        z = d.encode(x)
        terms = d.loss_terms(x)
        assert terms["sparsity"].item() == pytest.approx(0.5 * d.g(z).abs().sum(-1).mean().item(), rel=1e-5)
        assert terms["recon"].item() == pytest.approx((d.decode(z) - x).pow(2).sum(-1).mean().item(), rel=1e-5)
        values[g] = terms["sparsity"].item()
    assert len({round(v, 5) for v in values.values()}) == len(GS)
    assert create("conca", d_in=8, n_latents=16, alpha=0.0).loss_terms(x)["sparsity"].item() == 0.0


def test_exp_clamps_the_latents():
    d = create("conca", d_in=4, n_latents=8, g="exp", exp_clamp=0.5, norm_affine=False)
    z = d.encode(torch.randn(20, 4) * 10)
    assert z.abs().max().item() == pytest.approx(0.5)
    wider = create("conca", d_in=4, n_latents=8, g="exp", exp_clamp=30.0, norm_affine=False)
    wider.load_state_dict(d.state_dict())
    assert wider.encode(torch.randn(20, 4) * 10).abs().max().item() > 0.5


def test_sparsity_warmup_ramps_alpha():
    d = create("conca", d_in=8, n_latents=16, alpha=1.0, sparsity_warmup_steps=10)
    x = torch.randn(8, 8)
    d.set_progress(0, 100)
    early = d.loss_terms(x)["sparsity"].item()
    d.set_progress(20, 100)
    assert d.loss_terms(x)["sparsity"].item() == pytest.approx(10 * early, rel=1e-5)


def test_unit_norm_decoder_option_keeps_rows_unit_through_training():
    x = planted(n=1024, d=16)
    d = create("conca", d_in=16, n_latents=32, unit_norm_decoder=True)
    free = create("conca", d_in=16, n_latents=32)
    train({"u": d, "f": free}, TensorSource(x), quick(steps=30, eval_every=30))
    # Folding divides by the input scale, so rows are equal (not 1) after training.
    norms = d.W_dec.norm(dim=1)
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4)
    assert free.W_dec.norm(dim=1).std() > 1e-3


@pytest.mark.parametrize("norm", NORMS)
def test_fold_input_scale_preserves_function(norm):
    d = with_random_affine(create("conca", d_in=8, n_latents=32, norm=norm, num_groups=4))
    d.train()
    d.encode(torch.randn(256, 8) * 0.25)  # BatchNorm: running statistics from scaled inputs
    d.eval()
    x = torch.randn(50, 8) * 7
    scale = 0.25
    expected_z, expected_x = d.encode(x * scale), d(x * scale) / scale
    d.fold_input_scale(scale)
    assert torch.allclose(d.encode(x), expected_z, atol=1e-4)  # log-posterior estimates unscaled
    assert torch.allclose(d(x), expected_x, atol=1e-3)


@pytest.mark.parametrize("name", ["conca_batchnorm_selu", "conca_groupnorm_elu", "conca_layernorm_softplus", "conca_dropout_softplus"])
def test_save_load_round_trip(name, tmp_path):
    d = with_random_affine(create(name, d_in=8, n_latents=16, num_groups=8))
    d.train()
    d.encode(torch.randn(64, 8))
    d.eval()
    d.save(tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert loaded.name == name and loaded.config == d.config
    x = torch.randn(10, 8)
    assert torch.equal(loaded.encode(x), d.encode(x)) and torch.equal(loaded(x), d(x))


@pytest.mark.parametrize("name", ["conca_layernorm_softplus", "conca_groupnorm_softplus", "conca_batchnorm_softplus",
                                  "conca_dropout_selu"])
def test_training_lowers_the_reconstruction_error(name):
    x = planted(n=2048, d=16)
    torch.manual_seed(0)
    d = create(name, d_in=16, n_latents=48)
    result = train({"c": d}, TensorSource(x), quick(steps=300, lr=1e-2, eval_every=100))
    fvu = [h["fvu"] for h in result.histories["c"]]
    assert fvu[-1] < 0.1 and fvu[-1] < 0.5 * fvu[0]


def test_larger_alpha_lowers_the_penalised_mass():
    x = planted(n=2048, d=16)
    mass = {}
    for alpha in (1e-4, 1.0):
        torch.manual_seed(0)
        d = create("conca_layernorm_softplus", d_in=16, n_latents=48, alpha=alpha)
        train({"c": d}, TensorSource(x), quick())
        with torch.no_grad():
            mass[alpha] = d.g(d.encode(x[:512])).sum(-1).mean().item()
    assert mass[1.0] < 0.75 * mass[1e-4]


def test_conca_trains_as_a_transcoder():
    x = planted(n=2048, d=16)
    target = torch.relu(x @ torch.randn(16, 12, generator=torch.Generator().manual_seed(7)))
    torch.manual_seed(0)
    d = create("conca_layernorm_softplus", d_in=16, d_out=12, n_latents=48)
    result = train({"t": d}, TensorSource(x), quick(steps=150), target_source=TensorSource(target))
    assert d(x[:5]).shape == (5, 12)
    fvu = [h["fvu"] for h in result.histories["t"]]
    assert fvu[-1] < min(1.0, fvu[0])
