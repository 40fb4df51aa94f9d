"""CE-loss recovered and KL with a dictionary spliced in: closed-form cases on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conca.dictionaries.base import Dictionary, DictionaryConfig
from conca.evaluation.downstream import downstream_metrics
from conca.models.load import load_model
from conca.text.batching import tokenize_contexts
from conca.text.corpus import load_documents


class Scaled(Dictionary):
    """decode(encode(x)) = factor * x: factor 1 is a perfect dictionary, 0 is zero-ablation."""

    name = "_test_scaled"

    def __init__(self, d: int, factor: float):
        super().__init__(DictionaryConfig(d_in=d, n_latents=d))
        self.factor = factor

    def encode(self, x):
        return x * self.factor

    def decode(self, z):
        return z


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, text_file):
    loaded = load_model(str(tiny_model_dirs["gpt_neox"]))
    contexts = tokenize_contexts(load_documents(str(text_file)), loaded.tokenizer, ctx_len=16, max_contexts=6)
    return loaded, contexts


def test_perfect_dictionary_recovers_everything(setup):
    loaded, contexts = setup
    m = downstream_metrics(loaded.model, Scaled(32, 1.0), "resid.1", contexts)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["ce_loss_zero_ablated"] != pytest.approx(m["ce_loss_clean"])
    # CE_clean is the ordinary next-token loss at positions whose target is a real token.
    logits = loaded.model(contexts.ids).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), contexts.ids[:, 1:].reshape(-1), reduction="none")
    assert m["ce_loss_clean"] == pytest.approx(ce[contexts.mask[:, 1:].reshape(-1)].mean().item(), rel=1e-5)
    assert m["n_scored_tokens"] == contexts.mask[:, 1:].sum().item()


def test_zero_dictionary_recovers_nothing(setup):
    loaded, contexts = setup
    m = downstream_metrics(loaded.model, Scaled(32, 0.0), "final", contexts)
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_div"] == pytest.approx(m["kl_div_zero_ablated"], rel=1e-6)
    assert m["kl_div_score"] == pytest.approx(0.0, abs=1e-6)


def test_partial_dictionary_lies_between(setup):
    loaded, contexts = setup
    m = downstream_metrics(loaded.model, Scaled(32, 0.5), "final", contexts)
    expected = (m["ce_loss_zero_ablated"] - m["ce_loss_spliced"]) / (m["ce_loss_zero_ablated"] - m["ce_loss_clean"])
    assert m["ce_loss_recovered"] == pytest.approx(expected)
    assert 0 < m["kl_div"] < m["kl_div_zero_ablated"]


def test_hooks_removed_after_evaluation(setup):
    loaded, contexts = setup
    before = loaded.model(contexts.ids).logits
    downstream_metrics(loaded.model, Scaled(32, 0.0), "final", contexts)
    assert torch.equal(before, loaded.model(contexts.ids).logits)


def test_many_dictionaries_share_clean_pass_and_match_single_runs(setup):
    from conca.evaluation.downstream import downstream_metrics_many

    loaded, contexts = setup
    many = downstream_metrics_many(loaded.model, {"half": Scaled(32, 0.5), "one": Scaled(32, 1.0)}, "final", contexts)
    single = downstream_metrics(loaded.model, Scaled(32, 0.5), "final", contexts)
    assert many["half"]["ce_loss_recovered"] == pytest.approx(single["ce_loss_recovered"], rel=1e-9)
    assert many["one"]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
