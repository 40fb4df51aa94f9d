"""The contract every registered dictionary method keeps, checked for each one (`conca methods`):
shapes and dtypes, save/load, training, transcoder mode, its declared unit-norm decoder and its
declared SAELens mapping. A new method in conca/dictionaries/ (or in CONCA_METHODS) is tested here
without editing this file."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from conca.activations.stream import TensorSource
from conca.dictionaries import create, get_method, load_dictionary, methods
from conca.errors import ConfigError
from conca.interop.saelens import export_saelens, import_saelens
from conca.training.trainer import TrainConfig, train

D, N, D_OUT = 8, 16, 5
STEPS = 40
METHODS = methods()


def build(method: str, **options):
    """A tiny dictionary of `method`: its own mapping of the shared settings, fitted to N latents."""
    torch.manual_seed(0)
    return create(method, **{**get_method(method).config_for(D, N, steps=STEPS, fit_width=True), **options})


FEATURES = torch.randn(24, D, generator=torch.Generator().manual_seed(123))


def data(n: int, seed: int = 0) -> torch.Tensor:
    """Sparse combinations of 24 fixed directions in D dimensions (what dictionaries are for); the
    seed draws the combinations, so other seeds are held-out data of the same kind."""
    g = torch.Generator().manual_seed(seed)
    codes = (torch.rand(n, 24, generator=g) < 0.15) * torch.rand(n, 24, generator=g) * 3
    return codes @ FEATURES + 0.5


def to_target(x: torch.Tensor) -> torch.Tensor:
    """A transcoder's target: a fixed linear map of the input to D_OUT dimensions."""
    return x @ torch.randn(D, D_OUT, generator=torch.Generator().manual_seed(7))


def short_training(dictionary, x: torch.Tensor, y: torch.Tensor | None = None, steps: int = STEPS):
    cfg = TrainConfig(steps=steps, batch_size=128, lr=3e-3, warmup_steps=5, eval_every=steps, checkpoint_every=10**9,
                      init_tokens=1024, eval_tokens=256, progress=False, seed=0)
    train({"d": dictionary}, TensorSource(x), cfg, target_source=None if y is None else TensorSource(y))
    return dictionary.eval()


_TRAINED: dict = {}


def trained(method: str):
    """`method` after a short training on `data` (shared by the tests that only read it)."""
    if method not in _TRAINED:
        _TRAINED[method] = short_training(build(method), data(2048))
    return _TRAINED[method]


def mse(dictionary, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float((dictionary.eval()(x) - target).pow(2).sum(-1).mean())


@pytest.mark.parametrize("method", METHODS)
def test_encode_and_decode_give_the_declared_shapes_and_dtypes(method):
    dictionary = build(method).eval()
    x = data(32)
    with torch.no_grad():
        z = dictionary.encode(x)
        assert z.shape == (32, N) and z.dtype == torch.float32 and torch.isfinite(z).all()
        x_hat = dictionary.decode(z)
        assert x_hat.shape == (32, D) and x_hat.dtype == torch.float32
        assert torch.equal(dictionary(x), x_hat)
        assert dictionary.decoder_directions.shape == (N, D)
        wide = dictionary.double()
        assert wide.encode(x.double()).dtype == torch.float64 and wide(x.double()).dtype == torch.float64


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_give_identical_encodings(method, tmp_path):
    dictionary = trained(method)
    dictionary.save(tmp_path / method)
    loaded = load_dictionary(tmp_path / method)
    assert type(loaded) is type(dictionary) and loaded.config == dictionary.config
    x = data(128, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), dictionary.encode(x))
        assert torch.equal(loaded(x), dictionary(x))


@pytest.mark.parametrize("method", METHODS)
def test_a_short_training_lowers_the_reconstruction_loss(method):
    x = data(512, seed=2)  # held out from the training data
    untrained = mse(build(method), x, x)
    after = mse(trained(method), x, x)
    assert after < 0.6 * untrained, (untrained, after)  # measured: 0.14 (structured) .. 0.44 (GroupNorm ConCA)


@pytest.mark.parametrize("method", METHODS)
def test_transcoder_mode_works_where_declared(method):
    if not get_method(method).supports_transcoder:
        with pytest.raises(ConfigError, match="transcoder|d_out"):
            build(method, d_out=D_OUT)
        return
    x, xs = data(2048), data(512, seed=3)
    transcoder = build(method, d_out=D_OUT)
    assert transcoder.is_transcoder
    z = transcoder.encode(xs)
    assert z.shape == (512, N) and transcoder.decode(z).shape == (512, D_OUT)
    terms = transcoder.loss_terms(xs, to_target(xs))
    assert all(torch.isfinite(v) for v in terms.values())
    untrained = mse(transcoder, xs, to_target(xs))
    short_training(transcoder, x, to_target(x), steps=150)  # a random encoder needs longer than STEPS
    assert mse(transcoder, xs, to_target(xs)) < 0.5 * untrained  # measured: at most 0.24


def _variants(method: str) -> list:
    """The default dictionary and, where the config has the switch, both settings of unit_norm_decoder."""
    config_fields = {f.name for f in fields(get_method(method).Config)}
    extra = [{"unit_norm_decoder": True}, {"unit_norm_decoder": False}] if "unit_norm_decoder" in config_fields else []
    return [build(method, **options) for options in [{}, *extra]]


@pytest.mark.parametrize("method", METHODS)
def test_the_unit_norm_decoder_constraint_holds_where_declared(method):
    cls = get_method(method)
    x = data(256)
    for dictionary in _variants(method):
        keeps = dictionary.keeps_unit_norm_decoder
        assert cls.unit_norm_decoder or not keeps  # only a class that declares it keeps it
        optimizer = torch.optim.Adam(dictionary.parameters(), lr=0.1)
        sum(dictionary.loss_terms(x).values()).backward()
        dictionary.before_optimizer_step()
        if keeps:  # the gradient is tangent to the unit rows
            grad = dictionary.W_dec.grad
            radial = (grad * dictionary.W_dec.detach()).sum(1)
            assert (radial.abs() <= 1e-5 * (1 + grad.norm(dim=1))).all()  # zero up to float32 rounding
        optimizer.step()
        dictionary.after_optimizer_step(optimizer, x)
        norms = dictionary.W_dec.detach().norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5) == keeps, (method, dictionary.config)


@pytest.mark.parametrize("method", METHODS)
def test_saelens_round_trip_where_mapped(method, tmp_path):
    dictionary = trained(method)
    if get_method(method).saelens_architecture is None:
        with pytest.raises(ConfigError, match="no SAELens counterpart"):
            export_saelens(dictionary, tmp_path / "sae")
        assert not (tmp_path / "sae").exists()
        return
    back = import_saelens(export_saelens(dictionary, tmp_path / "sae"))
    assert type(back) is type(dictionary) and back.config == dictionary.config
    x = data(256, seed=4)
    with torch.no_grad():
        z = dictionary.encode(x)
        assert torch.equal(back.encode(x), z) and torch.equal(back.decode(z), dictionary.decode(z))


@pytest.mark.parametrize("method", METHODS)
def test_the_shared_target_l0_reaches_the_declared_option_only(method):
    cls = get_method(method)
    config = cls.config_for(D, N, target_l0=3, some_option_no_method_has=1)
    widths = {"d_in": D, "n_latents": N}
    expected = {**widths, cls.target_l0_option: 3} if cls.target_l0_option else widths
    assert config == expected
    assert create(method, **config).config.n_latents == N


@pytest.mark.parametrize("method", METHODS)
def test_only_methods_declaring_signed_latents_encode_negative_values(method):
    # The atlas shows most negative examples only for signed methods: an unsigned method that
    # encodes a negative value would hide them, a signed one that never does shows empty lists.
    x = torch.cat([data(256, seed=5), 3 * torch.randn(256, D, generator=torch.Generator().manual_seed(5))])
    dictionaries = (build(method), trained(method))  # training needs gradients: outside no_grad
    with torch.no_grad():
        negative = [bool((dictionary.eval().encode(x) < 0).any()) for dictionary in dictionaries]
    assert negative == [get_method(method).signed_latents] * 2, negative
