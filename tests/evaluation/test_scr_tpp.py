"""SCR and TPP on planted activations, where the right answers are known in closed form."""

from __future__ import annotations

import pytest
import torch

from conca.errors import InputError
from conca.evaluation.scr_tpp import (
    Probe,
    ablate,
    latent_effects,
    scr,
    top_latents,
    tpp,
)


class PlantedDictionary:
    """Rows of `decoder` are the latents' directions; codes are relu(x @ decoder.T) (or linear when signed)."""

    def __init__(self, decoder: torch.Tensor, signed: bool = False):
        self.decoder_directions = decoder
        self.signed_latents = signed

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.decoder_directions.T
        return z if self.signed_latents else torch.relu(z)


def _two_attributes(n=1600, d=8, spurious_scale=2.0, noise=0.1, seed=0):
    """x = (2a-1) e0 + spurious_scale (2b-1) e1 + noise: a the target, b the spurious attribute, independent."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 2, (n,), generator=g)
    b = torch.randint(0, 2, (n,), generator=g)
    x = noise * torch.randn(n, d, generator=g)
    x[:, 0] += 2.0 * a - 1.0
    x[:, 1] += spurious_scale * (2.0 * b - 1.0)
    return x, a, b


def _signed_pairs(dims) -> torch.Tensor:
    """For each dimension k, two non-negative latents: +e_k and -e_k (together they reconstruct x_k exactly)."""
    eye = torch.eye(8)
    return torch.cat([torch.stack([eye[k], -eye[k]]) for k in dims])


def test_ablating_the_latents_that_carry_exactly_the_spurious_attribute_gives_scr_one():
    x, a, b = _two_attributes()
    result = scr(x, a, b, PlantedDictionary(_signed_pairs(range(8))), n_values=(2,))
    # The biased probe leans on the stronger spurious direction: the reported direction is dir1 (evaluate a).
    assert result["scr_metric_direction"] == 1
    assert result["dir1"]["accuracy_base"] < 0.8 and result["dir1"]["accuracy_oracle"] > 0.98
    assert result["scr_metric_threshold_2"] == pytest.approx(1.0, abs=0.05)


def test_ablating_a_latent_that_carries_the_spurious_attribute_in_part_of_the_texts_gives_that_share():
    # The spurious attribute (along e1, exact: ±3) is carried by latent 0 in 70 % of the texts and by
    # latent 1 in the other 30 %; the target (along e0, ±1 with noise 1) by latent 2. The biased probe
    # reads e1, so it is right on the aligned cells and wrong on the crossed ones: A_base = 0.5; on e0
    # alone it is right with the oracle's probability p = Φ(1). Ablating latent 0 (the larger mean
    # difference: top-1) leaves e0 alone in 70 % of the texts: A_abl = 0.7 p + 0.3 · 0.5, so
    # SCR = (A_abl − 0.5) / (p − 0.5) = 0.7 in closed form, whatever p. Ablating both (top-2) gives 1.
    g = torch.Generator().manual_seed(3)
    n = 4000
    a, b = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    carried_by_0 = torch.rand(n, generator=g) < 0.7
    x = 0.05 * torch.randn(n, 8, generator=g)
    x[:, 0] += (2.0 * a - 1.0) + torch.randn(n, generator=g)
    x[:, 1] = 3.0 * (2.0 * b - 1.0)
    decoder = torch.zeros(3, 8)
    decoder[0, 1] = decoder[1, 1] = decoder[2, 0] = 1.0
    codes = torch.stack([x[:, 1] * carried_by_0, x[:, 1] * ~carried_by_0, x[:, 0]], dim=1)
    result = scr(x, a, b, PlantedDictionary(decoder, signed=True), codes, n_values=(1, 2))
    assert result["scr_metric_direction"] == 1
    assert result["dir1"]["accuracy_base"] == pytest.approx(0.5, abs=0.03)
    assert result["dir1"]["accuracy_oracle"] == pytest.approx(0.841, abs=0.03)  # Φ(1)
    assert result["scr_metric_threshold_1"] == pytest.approx(0.7, abs=0.08)
    assert result["scr_metric_threshold_2"] == pytest.approx(1.0, abs=0.08)
    # Its standard error: 35 % of the test texts change (the 70 % in half the cells, each right with
    # probability p afterwards), so the per-text change d has mean 0.35 (2p − 1) and E[d²] = 0.35.
    p, n_test = result["dir1"]["accuracy_oracle"], result["test_examples"]
    expected_se = ((0.35 - (0.35 * (2 * p - 1)) ** 2) / n_test) ** 0.5 / (p - 0.5)
    assert result["scr_metric_standard_error_1"] == pytest.approx(expected_se, rel=0.15)
    assert abs(result["scr_metric_threshold_1"] - 0.7) < 3 * result["scr_metric_standard_error_1"]


def test_a_dictionary_without_a_spurious_latent_gives_scr_near_zero():
    x, a, b = _two_attributes()
    result = scr(x, a, b, PlantedDictionary(_signed_pairs(range(2, 8))), n_values=(2, 5))
    assert abs(result["scr_metric_threshold_2"]) < 0.05
    assert abs(result["scr_metric_threshold_5"]) < 0.05


def test_scr_is_zero_when_the_biased_probe_is_already_as_good_as_the_oracle():
    # No spurious signal in x: the biased probe equals the oracle, the denominator is below 0.001.
    x, a, b = _two_attributes(spurious_scale=0.0, noise=0.01)
    result = scr(x, a, b, PlantedDictionary(_signed_pairs(range(8))), n_values=(2,))
    assert result["dir1"]["denominator_guarded"]
    assert result["scr_dir1_threshold_2"] == 0.0


def test_signed_latents_are_ranked_by_the_size_of_their_mean_difference():
    # One signed latent per dimension: the gender latent's codes are -2 / +2, so its mean difference is
    # large only in absolute value once the sign of the probe product is dropped.
    x, a, b = _two_attributes()
    dictionary = PlantedDictionary(-torch.eye(8), signed=True)  # decoder -e_k: code = -x_k, negative for b=1
    result = scr(x, a, b, dictionary, n_values=(1,))
    assert result["signed_latents"] is True
    assert result["scr_metric_threshold_1"] == pytest.approx(1.0, abs=0.05)


def test_tpp_of_planted_class_latents_is_the_accuracy_drop_with_no_side_effects():
    g = torch.Generator().manual_seed(1)
    n, d = 1500, 6
    classes = torch.randint(0, 3, (n,), generator=g)
    x = 0.1 * torch.randn(n, d, generator=g)
    x[torch.arange(n), classes] += 2.0
    result = tpp(x, classes, PlantedDictionary(torch.eye(d)), n_values=(1,))
    # Ablating class i's latent sends its positives to the negative side of a balanced test set:
    # accuracy 1.0 -> 0.5; the other probes still separate their own class.
    for i in "012":
        assert result["per_class"][i]["tpp_threshold_1_intended_diff_only"] == pytest.approx(0.5, abs=0.05)
        assert abs(result["per_class"][i]["tpp_threshold_1_unintended_diff_only"]) < 0.03
    assert result["tpp_threshold_1_total_metric"] == pytest.approx(0.5, abs=0.05)


def test_top_latents_picks_only_non_zero_effects():
    effects = torch.tensor([0.0, 3.0, 0.0, 1.0])
    assert top_latents(effects, 3).tolist() == [1, 3]
    assert top_latents(torch.zeros(4), 2).numel() == 0


def test_ablation_removes_exactly_the_chosen_latents_contributions():
    decoder = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    codes = torch.tensor([[2.0, 3.0, 4.0]])
    x = torch.tensor([[10.0, 20.0]])
    assert ablate(x, codes, decoder, torch.tensor([0, 2])).tolist() == [[4.0, 16.0]]


def test_tpp_effects_ignore_latents_that_fire_more_on_the_negative_class():
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([1, 0])
    probe = Probe(torch.tensor([1.0, 1.0]), 0.0)
    effects = latent_effects(codes, y, probe, torch.eye(2), absolute=False)
    assert effects.tolist() == [1.0, 0.0]


def test_mismatched_codes_are_refused():
    x, a, b = _two_attributes(n=64)
    with pytest.raises(InputError):
        scr(x, a, b, PlantedDictionary(torch.eye(8)), codes=torch.zeros(64, 3))


# --- the dataset and the model side (tiny random model) -------------------------------------------

def test_shipped_dataset_has_balanced_profession_and_gender_cells():
    from collections import Counter

    from conca.evaluation.scr_data import SCR_PAIRS, load_scr_dataset

    rows = load_scr_dataset()
    cells = Counter((r["profession"], r["gender"]) for r in rows)
    assert len(rows) >= 1000
    assert {p for pair in SCR_PAIRS for p in pair} <= {p for p, _ in cells}
    assert {g for _, g in cells} == {"male", "female"}
    assert len(set(cells.values())) == 1  # every cell the same size


def test_the_shipped_dataset_is_what_the_generator_writes_and_stays_small():
    import importlib.util
    import json
    from importlib import resources
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_scr_data.py"
    spec = importlib.util.spec_from_file_location("make_scr_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = resources.files("conca.data").joinpath("tasks", "scr_profession_gender.jsonl").read_text(encoding="utf-8")
    assert shipped == "".join(json.dumps(r) + "\n" for r in module.make_rows(200))
    assert len(shipped.encode()) < 1_000_000
    rows = [json.loads(line) for line in shipped.splitlines()]
    assert len({r["text"] for r in rows}) == len(rows)  # unique texts: none in both train and test


def test_a_dataset_line_without_the_fields_is_refused(tmp_path):
    from conca.evaluation.scr_data import load_scr_dataset

    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a bio", "profession": "nurse"}\n')
    with pytest.raises(InputError, match="line 1"):
        load_scr_dataset(path)


def test_pooled_codes_are_the_mean_of_the_tokens_codes(tiny):
    from conca.dictionaries import create
    from conca.evaluation.scr_data import pooled_text_activations
    from conca.models.sites import Site, run_to_sites

    torch.manual_seed(0)
    dictionary = create("relu_l1", d_in=tiny.d_model, n_latents=20)
    texts = ["The quick brown fox jumps.", "Paris is the capital of France; Berlin too.", "A journey."]
    x, (codes,) = pooled_text_activations(tiny, texts, "resid.1", [dictionary], batch_size=2)
    tok = tiny.tokenizer
    ids = [tok.bos_token_id] + tok(texts[1], add_special_tokens=False).input_ids
    acts = run_to_sites(tiny.model, torch.tensor([ids]), [Site.parse("resid.1")])[Site.parse("resid.1")][0, 1:].float()
    with torch.no_grad():
        assert torch.allclose(x[1], acts.mean(0), atol=1e-5)
        assert torch.allclose(codes[1], dictionary.encode(acts).mean(0), atol=1e-5)


def test_scr_tpp_on_model_reports_saebench_keys_per_dictionary(tiny):
    from conca.dictionaries import create
    from conca.evaluation.scr_data import load_scr_dataset, scr_tpp_on_model

    rows = load_scr_dataset()[:240]
    torch.manual_seed(0)
    result = scr_tpp_on_model(tiny, "resid.1", {"relu": create("relu_l1", d_in=tiny.d_model, n_latents=16)},
                              rows=rows, n_values=(2, 5))
    scr_out, tpp_out = result["relu"]["scr"], result["relu"]["tpp"]
    assert set(scr_out["per_pair"]) == {"professor_nurse", "architect_journalist"}
    assert {"scr_metric_threshold_2", "scr_dir1_threshold_5", "scr_dir2_threshold_5"} <= set(scr_out)
    assert tpp_out["classes"] == ["architect", "journalist", "nurse", "professor"]
    assert -1.0 <= tpp_out["tpp_threshold_5_total_metric"] <= 1.0
    from conca import strict_json

    assert '"scr_metric_threshold_2"' in strict_json.dumps(result)  # plain data, no NaN


# --- SAEBench's results layout ------------------------------------------------------------------------

def test_scr_and_tpp_results_are_written_in_saebench_layout():
    import json

    from conca import strict_json
    from conca.evaluation.saebench_json import scr_tpp_outputs
    from conca.evaluation.scr_data import combine_pairs

    x, a, b = _two_attributes(n=800)
    full, none = PlantedDictionary(_signed_pairs(range(8))), PlantedDictionary(_signed_pairs(range(2, 8)))
    per_pair = {"professor_nurse": scr(x, a, b, full, n_values=(2, 5)),
                "architect_journalist": scr(x, a, b, none, n_values=(2, 5))}
    classes = a + 2 * b  # four classes for TPP
    result = {"scr": combine_pairs(per_pair),
              "tpp": {**tpp(x, classes, full, n_values=(2, 5)), "classes": ["w", "x", "y", "z"]}}
    scr_json, tpp_json = scr_tpp_outputs(result, model="m", site="resid.3", dictionary={"method": "planted"},
                                         n_values=(2, 5))
    assert scr_json["eval_type_id"] == "scr" and tpp_json["eval_type_id"] == "tpp"
    for out in (scr_json, tpp_json):
        assert {"eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics", "eval_result_details",
                "eval_result_unstructured", "sae_lens_id", "sae_cfg_dict"} <= set(out)
        json.loads(strict_json.dumps(out))  # plain, finite JSON
    metrics = scr_json["eval_result_metrics"]["scr_metrics"]
    assert set(metrics) == {f"scr_{kind}_threshold_{n}" for kind in ("dir1", "dir2", "metric") for n in (2, 5)}
    # The headline is the mean over the pairs: ~1 (the spurious latents exist) and ~0 (they do not).
    assert metrics["scr_metric_threshold_2"] == pytest.approx(
        (per_pair["professor_nurse"]["scr_metric_threshold_2"] + per_pair["architect_journalist"]["scr_metric_threshold_2"]) / 2)
    assert 0.4 < metrics["scr_metric_threshold_2"] < 0.6
    # Standard errors combine as those of a mean of two independent estimates, and stay out of SAEBench's metrics.
    se = [per_pair[p]["scr_metric_standard_error_2"] for p in per_pair]
    assert result["scr"]["scr_metric_standard_error_2"] == pytest.approx((se[0] ** 2 + se[1] ** 2) ** 0.5 / 2)
    assert scr_json["eval_result_unstructured"]["standard_errors"]["scr_metric_standard_error_2"] == \
        result["scr"]["scr_metric_standard_error_2"]
    details = {d["dataset_name"]: d for d in scr_json["eval_result_details"]}
    assert set(details) == {"scr_profession_gender_scr_professor_nurse_results",
                            "scr_profession_gender_scr_architect_journalist_results"}
    assert details["scr_profession_gender_scr_professor_nurse_results"]["scr_metric_threshold_2"] == \
        per_pair["professor_nurse"]["scr_metric_threshold_2"]
    assert scr_json["eval_config"]["perform_scr"] is True and scr_json["eval_config"]["n_values"] == [2, 5]
    assert scr_json["eval_config"]["column1_vals_lookup"]["scr_profession_gender"] == [
        ["professor", "nurse"], ["architect", "journalist"]]
    tpp_metrics = tpp_json["eval_result_metrics"]["tpp_metrics"]
    assert tpp_metrics["tpp_threshold_2_total_metric"] == result["tpp"]["tpp_threshold_2_total_metric"]
    assert {"tpp_threshold_5_intended_diff_only", "tpp_threshold_5_unintended_diff_only"} <= set(tpp_metrics)
    assert [d["dataset_name"] for d in tpp_json["eval_result_details"]] == ["scr_profession_gender_tpp_results"]
    assert set(tpp_json["eval_result_unstructured"]["scr_profession_gender"]) == {"w", "x", "y", "z"}
    assert tpp_json["eval_config"]["perform_scr"] is False
