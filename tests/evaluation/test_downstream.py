"""CE-loss recovered and KL with a dictionary spliced in: closed-form cases on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conca.dictionaries.base import Dictionary, DictionaryConfig
from conca.evaluation.downstream import downstream_metrics
from conca.models.load import load_model
from conca.text.batching import tokenize_contexts
from conca.text.corpus import load_documents
from conftest import SAMPLE_TEXT


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


# --- SAELens' variant: zero-ablation of every position, BOS included ------------------------------
@pytest.fixture(scope="module")
def sharp(tiny_model_dirs):
    """The tiny GPT-NeoX with its unembedding scaled up: a random model's predictions are nearly
    uniform, so zero-ablation would barely move CE and CE-loss recovered would be a ratio of two
    tiny differences. Several short documents, so contexts hold EOS tokens mid-way as well as a
    leading BOS: the two variants then average over different positions."""
    loaded = load_model(str(tiny_model_dirs["gpt_neox"]))
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(40.0)
    documents = [sentence for sentence in SAMPLE_TEXT.replace(";", ".").split(".") if sentence.strip()] * 6
    contexts = tokenize_contexts(documents, loaded.tokenizer, ctx_len=16, max_contexts=6)
    assert (~contexts.mask[:, 1:]).any()  # an EOS somewhere after the BOS
    return loaded, contexts


def _per_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_saelens_variant_matches_hand_computation_with_hooks(sharp, factor):
    loaded, contexts = sharp
    model = loaded.model
    ids, mask = contexts.ids, contexts.mask
    layer = model.gpt_neox.layers[1]  # resid.1 is this block's output

    def logits_with(replace=None):
        handle = None
        if replace is not None:
            handle = layer.register_forward_hook(
                lambda mod, args, out: (replace(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else replace(out))
        try:
            with torch.no_grad():
                return model(input_ids=ids).logits
        finally:
            if handle is not None:
                handle.remove()

    clean = logits_with()
    zero_all = logits_with(torch.zeros_like)  # every position, BOS included
    spliced = logits_with(lambda x: torch.where(mask[..., None], factor * x, x))  # real tokens only
    from_real = mask[:, :-1]  # SAELens averages CE over predictions made from a real token
    ce = {name: _per_token_ce(logits, ids)[from_real].double().mean().item()
          for name, logits in (("clean", clean), ("zero_all", zero_all), ("dict", spliced))}
    expected = (ce["zero_all"] - ce["dict"]) / (ce["zero_all"] - ce["clean"])

    def kl(logits):  # KL(clean || logits) at every real-token position, the last one included
        p, q = F.log_softmax(clean.float(), -1), F.log_softmax(logits.float(), -1)
        return (p.exp() * (p - q)).sum(-1)[mask].double().mean().item()

    m = downstream_metrics(model, Scaled(32, factor), "resid.1", contexts, batch_size=len(contexts))
    assert m["ce_loss_clean_saelens"] == pytest.approx(ce["clean"], rel=1e-6)
    assert m["ce_loss_zero_ablated_saelens"] == pytest.approx(ce["zero_all"], rel=1e-6)
    assert m["ce_loss_spliced_saelens"] == pytest.approx(ce["dict"], rel=1e-6)
    assert m["ce_loss_recovered_saelens"] == pytest.approx(expected, rel=1e-5)
    assert m["kl_div_score_saelens"] == pytest.approx((kl(zero_all) - kl(spliced)) / kl(zero_all), rel=1e-5)
    assert m["n_scored_tokens_saelens"] == from_real.sum().item() != m["n_scored_tokens"]
    # Zeroing BOS as well gives another baseline, so the variants differ.
    assert m["ce_loss_zero_ablated_saelens"] != pytest.approx(m["ce_loss_zero_ablated"], rel=1e-3)
    if factor == 0.0:  # conca's zero-ablation *is* a zero dictionary; SAELens' is another
        assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
        assert m["ce_loss_recovered_saelens"] != pytest.approx(0.0, abs=1e-3)


def test_identity_dictionary_is_one_in_both_variants(sharp):
    loaded, contexts = sharp
    m = downstream_metrics(loaded.model, Scaled(32, 1.0), "resid.1", contexts)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert m["ce_loss_recovered_saelens"] == pytest.approx(1.0, abs=1e-6)
    assert m["kl_div_score_saelens"] == pytest.approx(1.0, abs=1e-6)


def test_saelens_zero_ablation_of_a_llama_residual_gives_uniform_predictions(tiny_model_dirs, text_file):
    """Zeros at every position of a Llama residual stream (no biases) stay zeros through the later
    blocks and the final RMSNorm: logits 0, so CE_zero_all = ln(vocab) exactly (as SmolLM2 shows)."""
    loaded = load_model(str(tiny_model_dirs["llama"]))
    contexts = tokenize_contexts(load_documents(str(text_file)), loaded.tokenizer, ctx_len=16, max_contexts=4)
    m = downstream_metrics(loaded.model, Scaled(32, 0.5), "resid.1", contexts)
    vocab = loaded.model.config.vocab_size
    assert m["ce_loss_zero_ablated_saelens"] == pytest.approx(math.log(vocab), rel=1e-6)
    # conca's zero-ablation keeps BOS, which the later blocks still read: not uniform.
    assert m["ce_loss_zero_ablated"] != pytest.approx(math.log(vocab), rel=1e-4)


@pytest.mark.slow  # SAELens' own evals beside ours
def test_saelens_variant_agrees_with_sae_lens_own_evals(sharp):
    """sae_lens.evals.get_downstream_reconstruction_metrics (what run_evals calls) on the same model,
    tokens and special-token list, through a minimal stand-in for its HookedTransformer."""
    evals = pytest.importorskip("sae_lens.evals")
    from types import SimpleNamespace

    from conca.models.sites import Site, replace_output
    from sae_lens.training.activation_scaler import ActivationScaler

    loaded, contexts = sharp
    model = loaded.model
    dictionary = Scaled(32, 0.5)

    class HookedStandIn:  # the two calls get_recons_loss makes, with TransformerLens' per-token loss
        def __call__(self, tokens, return_type, loss_per_token, **_):
            logits = model(input_ids=tokens).logits
            return logits, _per_token_ce(logits, tokens)

        def run_with_hooks(self, tokens, return_type, fwd_hooks, loss_per_token, **_):
            (hook_name, fn), = fwd_hooks
            with replace_output(model, Site.parse(hook_name), lambda x: fn(x, hook=None)):
                return self(tokens, return_type, loss_per_token)

    sae = SimpleNamespace(cfg=SimpleNamespace(metadata=SimpleNamespace(hook_name="resid.1", hook_head_index=None)),
                          device=torch.device("cpu"), encode=dictionary.encode, decode=dictionary.decode)
    batches = iter(contexts.ids.split(3))
    store = SimpleNamespace(get_batch_tokens=lambda n: next(batches))
    special = sorted(set(loaded.tokenizer.all_special_ids))
    with torch.no_grad():
        theirs = evals.get_downstream_reconstruction_metrics(
            sae, HookedStandIn(), store, ActivationScaler(), compute_kl=True, compute_ce_loss=True, n_batches=2,
            eval_batch_size_prompts=3, ignore_tokens=special)
    ours = downstream_metrics(model, dictionary, "resid.1", contexts, batch_size=3)
    pairs = {"ce_loss_score": "ce_loss_recovered_saelens", "ce_loss_with_ablation": "ce_loss_zero_ablated_saelens",
             "ce_loss_with_sae": "ce_loss_spliced_saelens", "ce_loss_without_sae": "ce_loss_clean_saelens",
             "kl_div_score": "kl_div_score_saelens", "kl_div_with_sae": "kl_div_saelens",
             "kl_div_with_ablation": "kl_div_zero_ablated_saelens"}
    for their_key, our_key in pairs.items():
        assert ours[our_key] == pytest.approx(theirs[their_key], rel=1e-5), their_key
    assert ours["ce_loss_recovered"] != pytest.approx(theirs["ce_loss_score"], rel=1e-3)


def test_batches_shrink_with_the_vocabulary_so_the_logits_fit_the_budget():
    from conca.evaluation.downstream import LOGIT_BUDGET, contexts_per_batch

    assert contexts_per_batch(8, 128, 49152) == 8  # SmolLM2: 8 contexts fit
    assert contexts_per_batch(8, 128, 262144) == 2  # Gemma 3: 33.5M logits per context
    assert contexts_per_batch(8, 128, 262144) * 128 * 262144 <= LOGIT_BUDGET
    assert contexts_per_batch(8, 4096, 262144) == 1  # never fewer than one context


def test_metrics_do_not_depend_on_how_many_contexts_share_a_forward(setup, monkeypatch):
    import conca.evaluation.downstream as downstream

    loaded, contexts = setup
    model = loaded.model
    dictionary = Scaled(32, 0.5)
    whole = downstream_metrics(model, dictionary, "resid.1", contexts, batch_size=len(contexts))
    monkeypatch.setattr(downstream, "LOGIT_BUDGET", 1)  # one context per forward
    one_by_one = downstream.downstream_metrics(model, dictionary, "resid.1", contexts, batch_size=len(contexts))
    assert one_by_one == pytest.approx(whole, rel=1e-5)
