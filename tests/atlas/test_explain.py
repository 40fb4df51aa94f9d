"""The atlas' explanations of a latent: vocabulary projections, clamped continuations, seed
stability and concept matches, checked against brute-force references on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conca.atlas import stability as stability_module
from conca.atlas import vocab as vocab_module
from conca.atlas.concepts import read_concept_matches
from conca.atlas.describe import describe_latents
from conca.atlas.stability import seed_stability
from conca.atlas.vocab import vocab_projections
from conca.dictionaries import create
from conca.errors import ConfigError, InputError, ShapeError
from conca.interventions.hooks import Clamp, Steer, intervene
from conca.models.sites import final_norm
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _dictionary(n_latents: int = 24, seed: int = 0, **options):
    torch.manual_seed(seed)
    return create("topk", d_in=32, n_latents=n_latents, k=4, **options).eval()


def _model(arch: str, tokenizer, seed: int = 4):
    model = make_tiny_model(arch, tokenizer, seed=seed)
    with torch.no_grad():  # a gain far from 1, so that forgetting (or misapplying) it shows
        final_norm(model).weight.uniform_(0.2, 3.0)
    return model


# ----------------------------------------------------------------------------- vocabulary
def _brute_force_vocab(model, tokenizer, dictionary, top, gain=None, centre=False):
    """Per latent, one at a time in float64: sorted W_U (g * d_j)."""
    w_u = model.get_output_embeddings().weight.detach().double()
    rows = []
    for d in dictionary.decoder_directions.detach().double():
        if centre:
            d = d - d.mean()
        if gain is not None:
            d = d * gain.double()
        logits = w_u @ d
        order = torch.argsort(logits, descending=True).tolist()
        rows.append({"top": [(tokenizer.decode([i]), float(logits[i])) for i in order[:top]],
                     "bottom": [(tokenizer.decode([i]), float(logits[i])) for i in order[::-1][:top]]})
    return rows


def _assert_same_projections(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for side in ("top", "bottom"):
            assert [t for t, _ in g[side]] == [t for t, _ in e[side]]
            assert torch.allclose(torch.tensor([v for _, v in g[side]], dtype=torch.float64),
                                  torch.tensor([v for _, v in e[side]], dtype=torch.float64), atol=1e-4)


def test_vocab_projection_at_final_is_the_plain_unembedding(tiny_tokenizer):
    model, dictionary = _model("llama", tiny_tokenizer), _dictionary()
    how, got = vocab_projections(model, tiny_tokenizer, dictionary, "final", top=7)
    assert how.startswith("exact at final")
    _assert_same_projections(got, _brute_force_vocab(model, tiny_tokenizer, dictionary, 7))
    assert got[3]["top"][0][1] > 0 > got[3]["bottom"][0][1]


def test_vocab_projection_at_final_is_the_logit_change_per_unit_of_the_latent(tiny_tokenizer):
    # What "exact at final" claims: adding alpha * d_j at final moves each logit by alpha * value.
    model, dictionary = _model("llama", tiny_tokenizer), _dictionary()
    _, got = vocab_projections(model, tiny_tokenizer, dictionary, "final", top=5)
    ids = tiny_tokenizer("Rome is the capital of Italy", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits[0, -1]
        with intervene(model, "final", Steer(6, 2.0), dictionary=dictionary):
            after = model(ids).logits[0, -1]
    change = (after - before) / 2.0
    expected_top = change.topk(5).values.tolist()
    expected_bottom = change.topk(5, largest=False).values.tolist()
    assert [v for _, v in got[6]["top"]] == pytest.approx(expected_top, abs=1e-4)
    assert [v for _, v in got[6]["bottom"]] == pytest.approx(expected_bottom, abs=1e-4)
    assert [t for t, _ in got[6]["top"]] == [tiny_tokenizer.decode([i]) for i in change.topk(5).indices.tolist()]


def test_vocab_projection_at_a_residual_site_goes_through_the_final_norm_gain(tiny_tokenizer):
    model, dictionary = _model("llama", tiny_tokenizer), _dictionary()
    how, got = vocab_projections(model, tiny_tokenizer, dictionary, "resid.1", top=6)
    assert "through the final norm's gain" in how and "linearised" in how
    gain = final_norm(model).weight.detach()
    _assert_same_projections(got, _brute_force_vocab(model, tiny_tokenizer, dictionary, 6, gain=gain))
    _, at_final = vocab_projections(model, tiny_tokenizer, dictionary, "final", top=6)
    assert [t for t, _ in got[0]["top"]] != [t for t, _ in at_final[0]["top"]]  # the gain mattered


def test_vocab_projection_of_a_tied_layernorm_model_centres_and_uses_the_embedding(tiny_tokenizer):
    model, dictionary = _model("gpt2", tiny_tokenizer), _dictionary()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    how, got = vocab_projections(model, tiny_tokenizer, dictionary, "resid.0", top=5)
    assert "centred" in how
    gain = final_norm(model).weight.detach()
    _assert_same_projections(got, _brute_force_vocab(model, tiny_tokenizer, dictionary, 5, gain=gain, centre=True))


def test_vocab_projection_is_independent_of_the_chunk_size(tiny_tokenizer, monkeypatch):
    model, dictionary = _model("llama", tiny_tokenizer), _dictionary(n_latents=40)
    whole = vocab_projections(model, tiny_tokenizer, dictionary, "resid.2", top=4)
    monkeypatch.setattr(vocab_module, "_CHUNK_BYTES", 4 * len(tiny_tokenizer) * 3)  # 3 latents per chunk
    how, chunked = vocab_projections(model, tiny_tokenizer, dictionary, "resid.2", top=4)
    assert how == whole[0]
    _assert_same_projections(chunked, whole[1])  # equal up to float32 rounding of the matmul's shape


def test_a_transcoder_is_read_at_its_output_site(tiny_tokenizer):
    model, transcoder = _model("llama", tiny_tokenizer), _dictionary(d_out=32)
    with pytest.raises(ConfigError, match="out_site"):
        vocab_projections(model, tiny_tokenizer, transcoder, "mlp_in.1")
    how, got = vocab_projections(model, tiny_tokenizer, transcoder, "mlp_in.1", top=3, out_site="final")
    assert how.startswith("exact at final")
    _assert_same_projections(got, _brute_force_vocab(model, tiny_tokenizer, transcoder, 3))


def test_vocab_projection_refuses_a_dictionary_of_another_width(tiny_tokenizer):
    model = _model("llama", tiny_tokenizer)
    with pytest.raises(ShapeError, match="width 16"):
        vocab_projections(model, tiny_tokenizer, create("topk", d_in=16, n_latents=8, k=2), "final")


# ----------------------------------------------------------------------------- describe
def _loaded(tokenizer):
    from conca.models.load import LoadedModel

    return LoadedModel(make_tiny_model("llama", tokenizer, seed=5), tokenizer, "tiny-llama")


def _generate(loaded, prompt, *edits, dictionary=None, max_new_tokens=6):
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode(), intervene(loaded.model, "resid.1", *edits, dictionary=dictionary):
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    return loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_batched_descriptions_equal_each_latent_clamped_alone(tiny_tokenizer):
    loaded, dictionary = _loaded(tiny_tokenizer), _dictionary(n_latents=24, seed=1)
    latents, values = [3, 11, 20], {3: 40.0, 11: -40.0, 20: 40.0}
    prompts = ("The", "Paris is")
    got = describe_latents(loaded, dictionary, "resid.1", latents, values, prompts=prompts, max_new_tokens=6,
                           batch_size=2)  # two batches per prompt
    assert list(got) == latents
    for j in latents:
        assert got[j]["clamp_value"] == values[j]
        assert [p["prompt"] for p in got[j]["prompts"]] == list(prompts)
        for entry in got[j]["prompts"]:
            assert entry["baseline"] == _generate(loaded, entry["prompt"])
            assert entry["clamped"] == _generate(loaded, entry["prompt"], Clamp([j], values[j]), dictionary=dictionary)
    # A large clamp changes the continuation somewhere (else the equalities above prove little).
    assert any(p["clamped"] != p["baseline"] for j in latents for p in got[j]["prompts"])


def test_describe_takes_values_aligned_with_the_latents_and_refuses_bad_ones(tiny_tokenizer):
    loaded, dictionary = _loaded(tiny_tokenizer), _dictionary()
    got = describe_latents(loaded, dictionary, "resid.1", [2, 5], [1.5, 2.5], prompts=("The",), max_new_tokens=2)
    assert {j: d["clamp_value"] for j, d in got.items()} == {2: 1.5, 5: 2.5}
    with pytest.raises(ConfigError, match="2 latents but 1 clamp values"):
        describe_latents(loaded, dictionary, "resid.1", [2, 5], [1.5])
    with pytest.raises(ConfigError, match="latent 5 is not finite"):
        describe_latents(loaded, dictionary, "resid.1", [2, 5], {2: 1.0, 5: float("nan")})
    with pytest.raises(ConfigError, match="unknown latent index 99"):
        describe_latents(loaded, dictionary, "resid.1", [99], [1.0], prompts=("The",))


def test_describe_is_empty_for_a_transcoder(tiny_tokenizer):
    assert describe_latents(_loaded(tiny_tokenizer), _dictionary(d_out=32), "mlp_in.1", [0, 1], [1.0, 1.0]) == {}


# ----------------------------------------------------------------------------- stability
def _permuted_copy(dictionary, permutation, flip=()):
    """A copy whose latent i is the original's latent permutation[i] (sign flipped for `flip`)."""
    other = create("topk", d_in=dictionary.config.d_in, n_latents=dictionary.config.n_latents, k=4)
    with torch.no_grad():
        other.W_dec.copy_(dictionary.W_dec[permutation])
        other.W_dec[list(flip)] *= -1
    return other


def test_a_permuted_copy_is_found_latent_for_latent(monkeypatch):
    dictionary = _dictionary(n_latents=40)
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    other = _permuted_copy(dictionary, permutation, flip=[0, 7])  # the sign does not matter
    monkeypatch.setattr(stability_module, "_CHUNK_BYTES", 4 * 40 * 6)  # 6 rows per chunk
    result = seed_stability(dictionary, other)
    assert result["cosine"].shape == (40,) and result["cosine"] == pytest.approx(np.ones(40), abs=1e-5)
    assert (permutation[torch.as_tensor(result["partner"])] == torch.arange(40)).all()
    assert result["hungarian_mean"] == pytest.approx(1.0, abs=1e-6) and result["note"] == ""


def test_unrelated_dictionaries_are_not_stable():
    torch.manual_seed(0)
    one, two = (create("topk", d_in=64, n_latents=32, k=4) for _ in range(2))
    result = seed_stability(one, two)
    assert result["cosine"].max() < 0.6 and result["cosine"].mean() < 0.45  # measured: 0.45 and 0.30
    assert result["hungarian_mean"] < result["cosine"].mean()  # one-to-one can only do worse


def test_the_hungarian_mean_is_left_out_above_its_cap_and_says_so():
    dictionary = _dictionary(n_latents=40)
    result = seed_stability(dictionary, dictionary, hungarian_max=39)
    assert result["hungarian_mean"] is None and "40 latents" in result["note"]
    assert result["partner"].tolist() == list(range(40))


def test_stability_refuses_directions_of_another_width():
    with pytest.raises(ShapeError, match="width 32 .* and 16"):
        seed_stability(_dictionary(), create("topk", d_in=16, n_latents=24, k=4))


# ----------------------------------------------------------------------------- concepts
def _results(tmp_path, dictionaries, name="results.json"):
    (tmp_path / name).write_text(json.dumps({"model": "tiny", "dictionaries": dictionaries}))
    return tmp_path / name


PER_CONCEPT = [{"concept": "male-female", "latent": 4, "correlation": 0.61},
               {"concept": "plural", "latent": 4, "correlation": 0.72},  # the same latent: the higher wins
               {"concept": "past", "latent": 9, "correlation": -0.1},
               {"concept": "unmatched", "latent": -1, "correlation": 0.0},
               {"concept": "nan", "latent": 2, "correlation": None}]


def test_concept_matches_are_read_per_latent_from_a_file_or_its_folder(tmp_path):
    path = _results(tmp_path, {"topk": {"mpc": 0.4, "per_concept": PER_CONCEPT}})
    expected = {4: {"concept": "plural", "correlation": 0.72}, 9: {"concept": "past", "correlation": -0.1}}
    assert read_concept_matches(path) == expected
    assert read_concept_matches(tmp_path) == expected
    assert read_concept_matches(str(tmp_path), "topk", n_latents=10) == expected


def test_several_dictionaries_need_a_name(tmp_path):
    path = _results(tmp_path, {"topk": {"per_concept": PER_CONCEPT}, "conca": {"per_concept": PER_CONCEPT[2:3]}})
    with pytest.raises(InputError, match=r"several dictionaries \(conca, topk\): name one"):
        read_concept_matches(path)
    assert read_concept_matches(path, "conca") == {9: {"concept": "past", "correlation": -0.1}}
    with pytest.raises(InputError, match=r"no dictionary 'relu' \(it has conca, topk\)"):
        read_concept_matches(path, "relu")


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read concept results"),
    ("[1, 2]", "no \"dictionaries\" object"),
    (json.dumps({"dictionaries": {}}), "holds no dictionaries"),
    (json.dumps({"dictionaries": {"d": {"mpc": 1}}}), "no \"per_concept\" list"),
    (json.dumps({"dictionaries": {"d": {"per_concept": [{"concept": "x", "latent": "4", "correlation": 1}]}}}),
     "per_concept entry 0 is not"),
    (json.dumps({"dictionaries": {"d": {"per_concept": [{"concept": "x", "latent": True, "correlation": 1}]}}}),
     "per_concept entry 0 is not"),
    (json.dumps({"dictionaries": {"d": {"per_concept": [{"concept": "x", "latent": 1, "correlation": "high"}]}}}),
     "per_concept entry 0 is not"),
    (json.dumps({"dictionaries": {"d": {"per_concept": [{"concept": "x", "latent": -3, "correlation": 1}]}}}),
     "names latent -3"),
])
def test_malformed_concept_results_are_an_input_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as error:
        read_concept_matches(path)
    assert str(path) in str(error.value)


def test_missing_results_and_latents_beyond_the_dictionary_are_refused(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_concept_matches(tmp_path)  # a folder without results.json
    path = _results(tmp_path, {"topk": {"per_concept": PER_CONCEPT}})
    with pytest.raises(InputError, match="names latent 9 but the dictionary has 8 latents"):
        read_concept_matches(path, n_latents=8)
