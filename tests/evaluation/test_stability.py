"""Stability across seeds: decoder agreement and activation MCC, checked where the answer is known
(a permuted, sign-flipped copy; independent random dictionaries; planted features two trained TopK
SAEs both find) and against a dense brute force for the streamed and approximate paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from conca import strict_json
from conca.activations.stream import TensorSource
from conca.dictionaries import create
from conca.dictionaries.base import Dictionary, DictionaryConfig
from conca.errors import ConfigError, InputError, ShapeError
from conca.evaluation import stability as stability_module
from conca.evaluation.latent_matching import match_directions
from conca.evaluation.stability import activation_mcc, decoder_agreement, stability_report
from conca.training.config import TrainConfig
from conca.training.seeds import seed_family, train_seeds

pytestmark = pytest.mark.usefixtures("one_thread")


class LinearCodes(Dictionary):
    """z = x W_enc: signed codes, so that negating a latent negates its activations exactly."""

    name = "linear_codes_test"

    def __init__(self, config: DictionaryConfig):
        super().__init__(config)
        self.W_enc = nn.Parameter(torch.randn(config.d_in, config.n_latents))
        self.W_dec = nn.Parameter(self.W_enc.detach().T.clone())
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc


def _linear(d_in: int = 16, n_latents: int = 24, seed: int = 0) -> LinearCodes:
    torch.manual_seed(seed)
    return LinearCodes(DictionaryConfig(d_in=d_in, n_latents=n_latents))


def _permuted_flipped_copy(dictionary: LinearCodes, seed: int = 1) -> tuple[LinearCodes, torch.Tensor]:
    """Latent i of the copy is the original's latent perm[i], negated for every third latent."""
    n = dictionary.config.n_latents
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sign = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    copy = LinearCodes(dictionary.config)
    with torch.no_grad():
        copy.W_enc.copy_(dictionary.W_enc[:, perm] * sign)
        copy.W_dec.copy_(dictionary.W_dec[perm] * sign[:, None])
    return copy, perm


def _features(n: int, d: int = 32, n_features: int = 16, active: int = 2, seed: int = 0):
    """Sparse non-negative mixtures of `n_features` fixed random unit directions (fixed by `seed`)."""
    directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=torch.Generator().manual_seed(seed)),
                                               dim=1)
    g = torch.Generator().manual_seed(seed + 1 + n)
    codes = torch.zeros(n, n_features)
    codes.scatter_(1, torch.rand(n, n_features, generator=g).argsort(1)[:, :active], torch.rand(n, active, generator=g) * 3 + 1)
    return codes @ directions, directions


def _simulated_matched_cosine(n_latents: int, d: int, draws: int = 20) -> tuple[float, float]:
    """Mean and sd over draws of the Hungarian-matched |cos| of two independent sets of random unit vectors."""
    rng = np.random.default_rng(123)
    values = []
    for _ in range(draws):
        a, b = rng.standard_normal((2, n_latents, d))
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        s = np.abs(a @ b.T)
        rows, cols = linear_sum_assignment(-s)
        values.append(s[rows, cols].mean())
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------- known answers
def test_a_permuted_sign_flipped_copy_agrees_perfectly():
    original = _linear()
    copy, _ = _permuted_flipped_copy(original)
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(2))
    decoder = decoder_agreement([original, copy])
    assert decoder["matched_cosine"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert decoder["share_above"]["mean"] == 1.0
    assert np.allclose(decoder["per_latent"], 1.0, atol=1e-4)
    mcc = activation_mcc([original, copy], x)
    assert mcc["mcc"]["mean"] == pytest.approx(1.0, abs=1e-5)  # |r|: a negated latent is the same latent
    assert mcc["share_above"]["mean"] == 1.0 and mcc["dead"] == [0, 0]
    assert np.allclose(mcc["per_latent"], 1.0, atol=1e-4)


def test_independent_random_dictionaries_match_at_the_simulated_chance_level():
    n_latents, d = 48, 32
    expected, spread = _simulated_matched_cosine(n_latents, d)
    torch.manual_seed(5)
    dictionaries = [create("topk", d_in=d, n_latents=n_latents, k=4) for _ in range(3)]  # isotropic Gaussian decoders
    decoder = decoder_agreement(dictionaries)
    for pair in decoder["pairs"]:
        assert abs(pair["matched_cosine"] - expected) < 4 * spread  # simulated 0.40 +- 0.01; measured 0.39-0.40
    assert abs(decoder["chance"]["matched_cosine"] - expected) < 4 * spread
    assert decoder["share_above"]["max"] == 0.0
    # best partners may repeat, the matching may not: the matched mean is at most the best-partner mean
    assert decoder["matched_cosine"]["mean"] <= decoder["best_partner_mean"]["mean"]
    mcc = activation_mcc(dictionaries, torch.randn(2000, d, generator=torch.Generator().manual_seed(6)))
    assert mcc["mcc"]["max"] < 0.3  # measured: 0.16-0.17; a copy gives 1


def test_trained_topk_seeds_on_planted_features_agree_and_untrained_ones_do_not():
    x, _ = _features(4096)
    held, _ = _features(2048)
    cfg = TrainConfig(steps=150, batch_size=256, lr=3e-3, warmup_steps=10, eval_every=150, checkpoint_every=0,
                      init_tokens=1024, eval_tokens=1024, progress=False)
    options = dict(d_in=32, n_latents=16, k=2)
    trained, _ = train_seeds("topk", TensorSource(x), [0, 1, 2], cfg, options)
    report = stability_report({"topk": trained, "untrained topk": list(seed_family("topk", options, [0, 1, 2]).values())},
                              held)
    rows = {row["family"]: row for row in report["table"]}
    # measured: trained matched |cos| >= 0.92, MCC >= 0.92; untrained 0.32 and 0.44; chance 0.34
    assert rows["topk"]["matched_cosine_min"] > 0.85 and rows["topk"]["mcc_min"] > 0.8
    assert rows["topk"]["share_above"] >= 0.8
    assert rows["untrained topk"]["matched_cosine_max"] < 0.5 and rows["untrained topk"]["mcc_max"] < 0.6
    assert rows["topk"]["chance_matched_cosine"] < 0.45
    strict_json.dumps(report)  # plain data


# ----------------------------------------------------------------------------- streaming and large widths
def test_streamed_mcc_does_not_depend_on_the_chunk_size_or_the_number_of_passes(monkeypatch):
    dictionaries = [_linear(seed=s) for s in range(3)]
    with torch.no_grad():
        dictionaries[1].W_enc[:, :8] = dictionaries[0].W_enc[:, :8] * 2 + 0.1  # partly shared latents
    x = torch.randn(1000, 16, generator=torch.Generator().manual_seed(3)) + 4.0  # an offset: shifted sums matter
    whole = activation_mcc(dictionaries, x, chunk_tokens=1000)
    assert whole["passes"] == 1
    for chunk_tokens, max_bytes in ((37, 2**30), (256, 8 * 72 * 5)):  # 3 pairs x 24 float64 columns x 5 rows a pass
        streamed = activation_mcc(dictionaries, x, chunk_tokens=chunk_tokens, max_bytes=max_bytes)
        assert [p["mcc"] for p in streamed["pairs"]] == pytest.approx([p["mcc"] for p in whole["pairs"]], abs=1e-5)
        assert np.allclose(streamed["per_latent"], whole["per_latent"], atol=1e-4)
    assert streamed["passes"] == 5  # ceil(24 / 5)
    monkeypatch.setattr(stability_module, "CORRELATION_BLOCK_BYTES", 8 * 24 * 2)  # correlations 2 rows at a time
    split = activation_mcc(dictionaries, x, chunk_tokens=256, max_bytes=8 * 72 * 5)
    assert [p["mcc"] for p in split["pairs"]] == pytest.approx([p["mcc"] for p in whole["pairs"]], abs=1e-5)
    assert np.allclose(split["per_latent"], whole["per_latent"], atol=1e-4)
    x64 = x.double().numpy()
    z0, z1 = (x64 @ d.W_enc.detach().double().numpy() for d in dictionaries[:2])
    r = np.abs(np.corrcoef(z0.T, z1.T)[:24, 24:])
    rows, cols = linear_sum_assignment(-r)
    assert whole["pairs"][0]["mcc"] == pytest.approx(r[rows, cols].mean(), abs=1e-5)


def test_a_dead_latent_counts_as_zero_and_mcc_alive_leaves_it_out():
    original = _linear()
    with torch.no_grad():
        original.W_enc[:, 5] = 0.0
    copy, _ = _permuted_flipped_copy(original)
    mcc = activation_mcc([original, copy], torch.randn(400, 16, generator=torch.Generator().manual_seed(4)))
    assert mcc["dead"] == [1, 1]
    assert mcc["mcc"]["mean"] == pytest.approx(23 / 24, abs=1e-5)
    assert mcc["mcc_alive"]["mean"] == pytest.approx(1.0, abs=1e-5)


def test_above_the_hungarian_cap_the_candidate_matching_brackets_the_exact_value():
    g = torch.Generator().manual_seed(7)
    mine = torch.randn(60, 24, generator=g)
    theirs = torch.cat([mine[:30] + 0.3 * torch.randn(30, 24, generator=g), torch.randn(40, 24, generator=g)])
    exact = match_directions(mine, theirs)
    approx = match_directions(mine, theirs, hungarian_max=10, candidates=4, block_bytes=4 * 70 * 7)  # 7 rows a block
    assert "exact" in exact.matching and "top-4" in approx.matching
    assert approx.matched_mean <= exact.matched_mean + 1e-9  # a valid matching: a lower bound
    assert approx.matched_mean == pytest.approx(exact.matched_mean, abs=0.02)
    assert float(approx.row_best.mean()) >= exact.matched_mean  # best partners: an upper bound
    # the streamed per-latent bests, both ways, are the dense matrix's
    s = (torch.nn.functional.normalize(mine, dim=1) @ torch.nn.functional.normalize(theirs, dim=1).T).abs()
    assert np.allclose(approx.row_best, s.max(1).values, atol=1e-6)
    assert np.allclose(approx.col_best, s.max(0).values, atol=1e-6)
    assert (approx.col_partner == s.argmax(0).numpy()).all()
    assert sorted(set(approx.pairs[0].tolist())) == approx.pairs[0].tolist() and len(set(approx.pairs[1])) == 60


def test_colliding_candidates_still_give_a_full_matching_that_is_a_lower_bound():
    g = torch.Generator().manual_seed(8)
    mine, theirs = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    mine[10:], theirs[:25] = 0.0, 0.0  # dead: cosine 0 with everything, so their candidates all collide
    exact = match_directions(mine, theirs)
    for candidates in (1, 3):  # one partner each: no perfect matching among the candidates alone
        approx = match_directions(mine, theirs, hungarian_max=10, candidates=candidates)
        assert len(approx.matched) == 40 and "top-" in approx.matching
        assert len(set(approx.pairs[0].tolist())) == 40 and len(set(approx.pairs[1].tolist())) == 40
        assert approx.matched_mean <= exact.matched_mean + 1e-9
    assert approx.matched_mean == pytest.approx(exact.matched_mean, abs=1e-6)  # 10 x 15 live: 3 candidates suffice here


# ----------------------------------------------------------------------------- training seeds
def test_seeds_differ_only_in_initialisation_and_see_the_same_batches():
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(9))
    cfg = TrainConfig(steps=20, batch_size=128, lr=3e-3, warmup_steps=2, eval_every=20, checkpoint_every=0,
                      init_tokens=512, eval_tokens=256, progress=False)
    options = dict(d_in=16, n_latents=24, k=3)
    state = torch.random.get_rng_state()
    together, result = train_seeds("topk", TensorSource(x), [0, 1], cfg, options)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    alone, _ = train_seeds("topk", TensorSource(x), [1], cfg, options)
    assert torch.equal(together[1].W_dec, alone[0].W_dec)  # trained beside seed 0 or alone: the same batches
    assert not torch.equal(together[0].W_dec, together[1].W_dec)
    assert list(result.dictionaries) == ["topk_seed0", "topk_seed1"]
    with pytest.raises(ConfigError, match="distinct"):
        seed_family("topk", options, [1, 1])


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_get_one_clear_error():
    one, other = _linear(), _linear(d_in=8)
    with pytest.raises(ConfigError, match="at least 2"):
        decoder_agreement([one])
    with pytest.raises(ShapeError, match="widths"):
        decoder_agreement([one, other])
    with pytest.raises(ShapeError, match="width 16, the held-out activations have width 8"):
        activation_mcc([one, _linear(seed=1)], torch.randn(10, 8))
    with pytest.raises(InputError, match="NaN"):
        activation_mcc([one, _linear(seed=1)], torch.full((10, 16), float("nan")))
    with pytest.raises(InputError, match="not a conca Dictionary"):
        activation_mcc([one, "seed1"], torch.randn(10, 16))
    with pytest.raises(ConfigError, match="family 'topk' has 1"):
        stability_report({"topk": [one]})
