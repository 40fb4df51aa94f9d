"""Feature absorption on planted activations: closed-form per-token fractions and a planted absorbed share."""

from __future__ import annotations

import pytest
import torch

from conca.evaluation.absorption import absorption, absorption_per_token, split_tokens


class PlantedDictionary:
    def __init__(self, decoder: torch.Tensor, signed: bool = False):
        self.decoder_directions = decoder
        self.signed_latents = signed

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the planted tests pass codes")


def test_partial_absorption_fraction_matches_the_closed_form():
    # act = x . e0 = 3; the main latent projects 1, the absorbing one 2: fraction = 2 / (2 + 1).
    decoder = torch.zeros(3, 4)
    decoder[0, 0] = 1.0                                   # main latent: the letter direction
    decoder[1] = torch.tensor([2.0, 2.0, 0.0, 0.0]) / 8 ** 0.5  # absorbing latent: letter + token
    decoder[2, 3] = 1.0                                   # unrelated latent
    x = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    codes = torch.tensor([[1.0, 8 ** 0.5, 5.0]])
    fraction, full = absorption_per_token(x, codes, decoder, torch.tensor([1.0, 0, 0, 0]), [0])
    assert fraction.item() == pytest.approx(2 / 3)
    assert not full.item()  # the main latent fired


def test_full_absorption_when_the_main_latent_is_silent():
    decoder = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    x = torch.tensor([[3.0, 4.0]])
    codes = torch.tensor([[0.0, 5.0]])  # all of x along the absorbing latent; projection 3 = act
    fraction, full = absorption_per_token(x, codes, decoder, torch.tensor([1.0, 0.0]), [0])
    assert fraction.item() == 1.0 and full.item()


def test_no_absorption_when_the_absorbing_latent_is_not_aligned_with_the_probe():
    decoder = torch.tensor([[1.0, 0.0], [0.05, (1 - 0.05 ** 2) ** 0.5]])  # cosine 0.05 < 0.1 with the probe
    x = torch.tensor([[0.1, 2.0]])
    codes = torch.tensor([[0.0, 2.0]])
    fraction, _ = absorption_per_token(x, codes, decoder, torch.tensor([1.0, 0.0]), [0])
    assert fraction.item() == 0.0


def _planted_letters(n_letters=3, per_letter=150, d=24, share=0.3, seed=0):
    """x = 3 e_letter + 2 u_token (+ noise). A `share` of each letter's tokens is absorbed: the letter
    latent is silent and a token-specific latent along (3 e_letter + 2 u_token) fires instead."""
    g = torch.Generator().manual_seed(seed)
    n = n_letters * per_letter
    letters = torch.arange(n_letters).repeat_interleave(per_letter)
    u = torch.randn(n, d, generator=g)
    u[:, :n_letters] = 0
    u = u / u.norm(dim=1, keepdim=True)
    signal = torch.zeros(n, d)
    signal[torch.arange(n), letters] = 3.0
    signal += 2.0 * u
    x = signal + 0.01 * torch.randn(n, d, generator=g)
    absorbed = torch.zeros(n, dtype=torch.bool)
    for c in range(n_letters):
        rows = (letters == c).nonzero()[:, 0]
        absorbed[rows[:round(share * per_letter)]] = True
    # Latents: one per letter, then one absorbing latent per absorbed token.
    n_abs = int(absorbed.sum())
    decoder = torch.zeros(n_letters + n_abs, d)
    decoder[torch.arange(n_letters), torch.arange(n_letters)] = 1.0
    codes = torch.zeros(n, n_letters + n_abs)
    absorbed_rows = absorbed.nonzero()[:, 0]
    decoder[n_letters:] = signal[absorbed_rows] / signal[absorbed_rows].norm(dim=1, keepdim=True)
    codes[absorbed_rows, n_letters + torch.arange(n_abs)] = signal[absorbed_rows].norm(dim=1)
    plain = (~absorbed).nonzero()[:, 0]
    codes[plain, letters[plain]] = 3.0
    return x, letters, decoder, codes, absorbed


def test_absorption_fraction_equals_the_planted_share():
    x, letters, decoder, codes, absorbed = _planted_letters()
    result = absorption(x, letters, PlantedDictionary(decoder), codes, min_letters=20)
    _, test = split_tokens(len(x), 0.2, 0)
    expected = [absorbed[test][letters[test] == c].float().mean().item() for c in range(3)]
    assert result["letters_evaluated"] == 3
    for c, name in enumerate("abc"):
        row = result["per_letter"][name]
        assert row["split_feats"] == [c]  # the letter latent alone is the main latent
        assert row["num_probe_true_positives"] == int((letters[test] == c).sum())
        assert row["mean_absorption_fraction"] == pytest.approx(expected[c], abs=1e-6)
        assert row["full_absorption_rate"] == pytest.approx(expected[c], abs=1e-6)
    assert result["mean_absorption_fraction_score"] == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert result["enough_letters"] is False and "16k" in result["caveat"]


def test_no_absorption_is_found_when_nothing_is_absorbed():
    x, letters, decoder, codes, _ = _planted_letters(share=0.0)
    result = absorption(x, letters, PlantedDictionary(decoder), codes)
    assert result["mean_absorption_fraction_score"] == 0.0
    assert result["mean_full_absorption_score"] == 0.0


# --- the model side (tiny random model) ----------------------------------------------------------

def test_alpha_vocab_keeps_only_letter_tokens(tiny):
    from conca.evaluation.absorption_data import alpha_vocab

    vocab = alpha_vocab(tiny.tokenizer)
    assert vocab
    for token_id, text in vocab:
        assert text.lstrip(" ").isalpha() and text.lstrip(" ").isascii() and len(text) - len(text.lstrip(" ")) <= 1
        assert tiny.tokenizer.decode([token_id]) == text


def test_prompts_end_with_the_word_token_after_answered_examples(tiny):
    from conca.evaluation.absorption_data import alpha_vocab, first_letter_prompts

    tok = tiny.tokenizer
    vocab = alpha_vocab(tok)
    (prompt,) = first_letter_prompts(tok, vocab, [vocab[0]], n_icl=3)
    assert prompt[0] == tok.bos_token_id and prompt[-1] == vocab[0][0]
    assert tok.decode(prompt[1:-1]).count("has the first letter:") == 3


def test_word_activations_do_not_depend_on_batch_padding(tiny):
    from conca.evaluation.absorption_data import first_letter_activations

    x, letters, words = first_letter_activations(tiny, "resid.1", max_tokens_per_letter=2, batch_size=16)
    assert len(x) == len(letters) == len(words) > 2
    assert all("abcdefghijklmnopqrstuvwxyz"[i] == w.strip()[0].lower() for i, w in zip(letters.tolist(), words))
    # One prompt per batch: no padding at all; padded batches must give the same activations at the words.
    alone, _, _ = first_letter_activations(tiny, "resid.1", max_tokens_per_letter=2, batch_size=1)
    assert torch.allclose(x, alone, atol=1e-5)


def test_absorption_on_model_returns_saebench_metrics_with_the_caveat(tiny):
    from conca import strict_json
    from conca.dictionaries import create
    from conca.evaluation.absorption_data import absorption_on_model

    torch.manual_seed(0)
    result = absorption_on_model(tiny, "resid.1", {"relu": create("relu_l1", d_in=tiny.d_model, n_latents=32)},
                                 max_tokens_per_letter=4)["relu"]
    assert {"mean_absorption_fraction_score", "mean_full_absorption_score", "caveat", "per_letter"} <= set(result)
    assert result["enough_letters"] is False
    strict_json.dumps(result)


def test_too_few_tokens_are_refused():
    from conca.errors import InputError

    with pytest.raises(InputError, match="tokens to train and test"):
        absorption(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), PlantedDictionary(torch.eye(4)), torch.zeros(1, 4))


def test_absorption_results_are_written_in_saebench_layout():
    import json

    from conca import strict_json
    from conca.evaluation.saebench_json import absorption_output

    x, letters, decoder, codes, _ = _planted_letters()
    result = absorption(x, letters, PlantedDictionary(decoder), codes)
    result["per_letter"]["d"] = {"f1_probe": 0.1, "num_test_tokens": 3, "skipped": "probe F1 0.10 <= 0.6"}
    out = absorption_output(result, model="m", site="resid.3", dictionary={"method": "planted"})
    assert out["eval_type_id"] == "absorption_first_letter"
    mean = out["eval_result_metrics"]["mean"]
    assert mean["mean_absorption_fraction_score"] == result["mean_absorption_fraction_score"]
    assert set(mean) == {"mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
                         "std_dev_absorption_fraction_score", "std_dev_full_absorption_score",
                         "std_dev_num_split_features"}
    rows = out["eval_result_details"]
    assert [r["first_letter"] for r in rows] == ["a", "b", "c"]  # scored letters only
    assert rows[0]["mean_absorption_fraction"] == result["per_letter"]["a"]["mean_absorption_fraction"]
    assert set(rows[0]) == {"first_letter", "mean_absorption_fraction", "full_absorption_rate", "num_full_absorption",
                            "num_probe_true_positives", "num_split_features"}
    assert out["eval_result_unstructured"]["skipped_letters"] == {"d": "probe F1 0.10 <= 0.6"}
    assert "16k" in out["eval_result_unstructured"]["caveat"]
    json.loads(strict_json.dumps(out))
