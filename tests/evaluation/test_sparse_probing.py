"""SAEBench's k-sparse probing: closed-form checks on planted latents, the pooling over real tokens on a
tiny model, the SAEBench results layout, and `conca evaluate --tasks` end to end on the tiny llama."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conca import strict_json
from conca.dictionaries.base import create
from conca.evaluation.sparse_probing import (
    balanced_one_vs_rest, fit_logistic, probe_accuracy, probe_task, saebench_output, tasks_summary,
    top_k_by_mean_difference,
)
from conca.evaluation.task_probing import pooled_activations, task_token_ids
from conca.models.sites import Site, run_to_sites


def planted(n: int = 400, n_latents: int = 20, carrier: int = 3, shift: float = 6.0, n_classes: int = 2, seed: int = 0):
    """Gaussian latents; class c moves latent carrier + c - 1 (class 0 moves none when binary) by `shift`."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    z = rng.normal(size=(n, n_latents))
    for c in range(1 if n_classes == 2 else 0, n_classes):
        z[labels == c, carrier + c - (1 if n_classes == 2 else 0)] += shift
    order = rng.permutation(n)
    train, test = np.sort(order[: int(0.8 * n)]), np.sort(order[int(0.8 * n):])
    return z, labels, train, test


def test_the_carrying_latent_alone_is_picked_and_separates():
    z, labels, train, test = planted()
    result = probe_task(z, labels, train, test, ("neg", "pos"))
    assert result["top_latents"]["pos"][0]["latent"] == 3
    assert result["sae_top_1_test_accuracy"] > 0.95
    assert result["sae_top_1_test_accuracy"] >= result["sae_top_10_test_accuracy"] - 0.03  # more noise adds nothing


def test_latents_that_carry_nothing_probe_at_chance():
    z, labels, train, test = planted(shift=0.0, n=600)
    result = probe_task(z, labels, train, test, ("neg", "pos"))
    for k in (1, 2, 5, 10):
        assert 0.35 < result[f"sae_top_{k}_test_accuracy"] < 0.65, k


def test_signed_latents_are_ranked_by_absolute_mean_difference():
    z, labels, train, test = planted(shift=0.0)
    z[labels == 1, 7] -= 6.0  # a strong negative mover
    z[labels == 1, 2] += 1.0  # a weaker positive one
    result = probe_task(z, labels, train, test, ("neg", "pos"))
    top = result["top_latents"]["pos"]
    assert [t["latent"] for t in top[:2]] == [7, 2]
    assert top[0]["mean_difference"] < -3 and top[1]["mean_difference"] > 0.5
    assert result["sae_top_1_test_accuracy"] > 0.95


def test_top_k_ties_go_to_the_lower_index_and_k_is_capped():
    x = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert top_k_by_mean_difference(x, np.array([1, 0]), 2).tolist() == [0, 2]
    assert top_k_by_mean_difference(x, np.array([1, 0]), 10).tolist() == [0, 2, 1]


def test_k_larger_than_the_latents_uses_them_all():
    z, labels, train, test = planted(n_latents=3, carrier=1)
    result = probe_task(z, labels, train, test, ("neg", "pos"), k_values=(1, 2, 5, 10))
    assert result["sae_top_5_test_accuracy"] == result["sae_top_10_test_accuracy"] == result["sae_test_accuracy"]
    assert len(result["top_latents"]["pos"]) == 3


def test_the_raw_activation_probe_bounds_the_sparse_one():
    # Two weak carriers mixed into 16 raw channels: the raw probe sees both, the top-1 latent only one.
    z, labels, train, test = planted(shift=1.2)
    z[labels == 1, 9] += 1.2
    raw = z @ np.random.default_rng(1).normal(size=(20, 16))
    result = probe_task(z, labels, train, test, ("neg", "pos"), raw=raw)
    assert result["llm_test_accuracy"] > result["sae_top_1_test_accuracy"] + 0.03
    assert {"llm_top_1_test_accuracy", "llm_top_10_test_accuracy"} <= set(result)


def test_multi_class_is_one_vs_rest_per_class_averaged():
    z, labels, train, test = planted(n=600, n_classes=3, carrier=10)
    result = probe_task(z, labels, train, test, ("a", "b", "c"))
    assert [result["top_latents"][c][0]["latent"] for c in "abc"] == [10, 11, 12]
    per_class = result["per_class"]["sae_top_1_test_accuracy"]
    assert set(per_class) == {"a", "b", "c"}
    assert result["sae_top_1_test_accuracy"] == pytest.approx(np.mean(list(per_class.values())))
    assert result["sae_top_1_test_accuracy"] > 0.95


def test_one_vs_rest_draws_balanced_negatives_evenly_from_the_other_classes():
    labels = np.repeat([0, 1, 2, 3], [30, 40, 40, 40])
    rows, targets = balanced_one_vs_rest(labels, 0, np.random.default_rng(0))
    assert targets.sum() == 30 and len(rows) == 60
    assert sorted(labels[rows[targets == 1]]) == [0] * 30
    assert np.bincount(labels[rows[targets == 0]], minlength=4).tolist() == [0, 10, 10, 10]
    again, _ = balanced_one_vs_rest(labels, 0, np.random.default_rng(0))
    assert np.array_equal(rows, again)


def test_results_in_saebench_layout_average_over_tasks():
    z, labels, train, test = planted()
    first = probe_task(z, labels, train, test, ("neg", "pos"), raw=z)
    second = probe_task(*planted(shift=0.0), ("neg", "pos"), raw=z)
    out = saebench_output({"one": first, "two": second}, model="m", site="final", dictionary={"method": "topk"})
    metrics = out["eval_result_metrics"]
    assert metrics["sae"]["sae_top_1_test_accuracy"] == pytest.approx(
        (first["sae_top_1_test_accuracy"] + second["sae_top_1_test_accuracy"]) / 2)
    assert set(metrics["llm"]) == {"llm_test_accuracy"} | {f"llm_top_{k}_test_accuracy" for k in (1, 2, 5, 10)}
    assert [d["dataset_name"] for d in out["eval_result_details"]] == ["one_results", "two_results"]
    assert out["eval_type_id"] == "sparse_probing" and out["eval_config"]["k_values"] == [1, 2, 5, 10]
    assert "sae_top_1_test_accuracy" in out["eval_result_unstructured"]["one_results"]
    json.loads(strict_json.dumps(out))  # plain, finite JSON
    json.loads(strict_json.dumps(tasks_summary({"one": first})))


def residual_like(n: int = 800, d: int = 64, seed: int = 0):
    """Residual-stream-like inputs: three label-free channels near 3000 (massive activations), a weak
    signal spread over the others (each channel alone separates poorly)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d)
    x[:, :3] = 3000.0 + 300.0 * rng.normal(size=(n, 3))
    x[:, 3:] += 0.25 * (2 * y - 1)[:, None]
    return x, y, np.arange(640), np.arange(640, n)


def test_a_probe_on_inputs_scaled_by_1000_has_the_same_accuracy():
    x, y, train, test = residual_like()
    plain = probe_accuracy(x[train], y[train], x[test], y[test])
    scaled = probe_accuracy(1000 * x[train], y[train], 1000 * x[test], y[test])
    assert scaled == plain
    assert plain > 0.97  # converged: unscaled, lbfgs stops at max_iter near 0.98 on these inputs


def test_standardisation_uses_the_training_rows_and_maps_back_to_raw_inputs():
    x, y, train, test = residual_like()
    w, b = fit_logistic(x[train], y[train])
    w_big, b_big = fit_logistic(1000 * x[train] + 5.0, y[train])
    assert np.allclose(1000 * w_big, w, rtol=1e-4, atol=1e-9)  # the same probe in the new units
    assert np.allclose(x[test] @ w + b, (1000 * x[test] + 5.0) @ w_big + b_big, rtol=1e-4, atol=1e-6)
    # The statistics are the training rows' own: shifting only the test rows moves the scores.
    assert not np.allclose(x[test] @ w + b, (x[test] + 1.0) @ w + b)


def test_a_column_constant_on_the_training_rows_does_not_blow_up():
    x, y, train, test = residual_like()
    x[train, 5] = 0.0  # a latent that never fires on the training rows, fires on the test rows
    x[test, 5] = 50.0
    w, _ = fit_logistic(x[train], y[train])
    assert np.isfinite(w).all() and abs(w[5]) < 1e-9
    without = np.delete(x, 5, axis=1)  # the column adds nothing: the same accuracy as without it
    assert probe_accuracy(x[train], y[train], x[test], y[test]) == probe_accuracy(
        without[train], y[train], without[test], y[test])


# --- pooling on a tiny model ---------------------------------------------------------------------------
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "A journey.",
         "Sparse dictionaries find directions.", "Berlin is the capital of Germany; Rome is the capital of Italy."]


def test_pooled_latents_are_the_mean_over_real_tokens_without_bos(tiny, one_thread):
    torch.manual_seed(0)
    dictionary = create("topk", d_in=tiny.d_model, n_latents=48, k=4).eval()
    raw, latents = pooled_activations(tiny, dictionary, "resid.1", TEXTS, ctx_len=64, batch_size=1)
    for i, text in enumerate(TEXTS):
        ids = [tiny.tokenizer.bos_token_id] + tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
        acts = run_to_sites(tiny.model, torch.tensor([ids]), [Site.parse("resid.1")])[Site.parse("resid.1")][0, 1:]
        with torch.no_grad():
            expected = dictionary.encode(acts.float()).mean(0)
        assert torch.allclose(raw[i], acts.float().mean(0), atol=1e-5)
        assert torch.allclose(latents[i], expected, atol=1e-5)
    # Batching by length changes nothing.
    raw_batched, latents_batched = pooled_activations(tiny, dictionary, "resid.1", TEXTS, ctx_len=64, batch_size=8)
    assert torch.allclose(raw, raw_batched, atol=1e-5) and torch.allclose(latents, latents_batched, atol=1e-5)


def test_pooled_latents_are_encoded_in_inference_form(tiny, one_thread):
    # A dictionary handed over in training mode (an untrained floor) must not encode with batch statistics:
    # the pooled latents of a BatchNorm ConCA are those of its eval form, whatever the batching.
    torch.manual_seed(0)
    dictionary = create("conca_batchnorm_softplus", d_in=tiny.d_model, n_latents=24).train()
    _, latents = pooled_activations(tiny, dictionary, "resid.1", TEXTS, ctx_len=64, batch_size=8)
    assert not dictionary.training
    _, alone = pooled_activations(tiny, dictionary, "resid.1", TEXTS[:1], ctx_len=64, batch_size=1)
    assert torch.allclose(latents[0], alone[0], atol=1e-5)


def test_texts_are_cut_at_the_context_length_keeping_the_beginning(tiny):
    ids, masks = task_token_ids(tiny.tokenizer, [TEXTS[0] * 10], ctx_len=8)
    full = tiny.tokenizer(TEXTS[0] * 10, add_special_tokens=False)["input_ids"]
    assert ids[0] == [tiny.tokenizer.bos_token_id] + full[:7] and masks[0] == [False] + [True] * 7


def test_a_text_of_special_tokens_only_is_refused_by_number(tiny):
    from conca.errors import InputError

    with pytest.raises(InputError, match="mine: example 2 .*no tokens besides special ones"):
        task_token_ids(tiny.tokenizer, ["fine", "<eos>"], name="mine")


# --- conca evaluate --tasks ----------------------------------------------------------------------------
@pytest.fixture()
def tiny_dictionary(tmp_path, tiny):
    torch.manual_seed(0)
    path = tmp_path / "dict"
    create("topk", d_in=tiny.d_model, n_latents=64, k=4).save(path, extra={"site": "resid.1"})
    return path


def _evaluate_argv(tiny_model_dirs, text_file, dictionary, out, tasks: str) -> list[str]:
    return ["evaluate", "--dictionary", str(dictionary), "--model", str(tiny_model_dirs["llama"]), "--text",
            str(text_file), "--split", "all", "--tokens", "200", "--ctx-len", "32", "--downstream", "false",
            "--out", str(out), "--tasks", tasks]


def test_evaluate_with_tasks_writes_metrics_and_the_saebench_file(tmp_path, tiny_model_dirs, text_file,
                                                                   tiny_dictionary, one_thread):
    from conca.cli import main

    mine = tmp_path / "mine.jsonl"
    cities = ("Paris", "Rome", "Berlin", "Oslo", "Lima", "Bern", "Kyiv", "Riga", "Baku", "Doha")
    mine.write_text("".join(json.dumps({"text": f"{w} is in {c}.", "label": int(c == "France")}) + "\n"
                            for w in cities for c in ("France", "Italy")), encoding="utf-8")
    assert main(_evaluate_argv(tiny_model_dirs, text_file, tiny_dictionary, tmp_path / "e", f"code,{mine}")) == 0
    written = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert "explained_variance" in written["metrics"]  # the existing metrics are still there
    tasks = written["tasks"]
    assert list(tasks["per_task"]) == ["code", "mine"] and tasks["k_values"] == [1, 2, 5, 10]
    code = tasks["per_task"]["code"]
    assert code["n_train"] == 800 and code["n_test"] == 200
    for key in ("llm_test_accuracy", "sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_10_test_accuracy"):
        assert 0.0 <= code[key] <= 1.0
    # Code vs prose is plain to any model's activations, even a random one's.
    assert code["llm_test_accuracy"] > 0.9
    saebench = json.loads((tmp_path / "e" / "sparse_probing.json").read_text())
    assert saebench["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] == pytest.approx(
        tasks["mean"]["sae_top_1_test_accuracy"])
    assert saebench["sae_cfg_dict"]["method"] == "topk"


@pytest.mark.parametrize("tasks, match", [
    ("sentiment,bogus", "unknown task 'bogus'"),
    ("{bad}", "bad.jsonl: line 2: not valid JSON"),
    ("{single}", "every example has the label 'x'"),
])
def test_bad_tasks_fail_with_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, tiny_dictionary,
                                                             tiny_model_dirs, text_file, tasks, match):
    from conca.cli import main
    from conca.experiments import pipeline

    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": \n', encoding="utf-8")
    (tmp_path / "single.jsonl").write_text('{"text": "a", "label": "x"}\n' * 6, encoding="utf-8")
    tasks = tasks.format(bad=tmp_path / "bad.jsonl", single=tmp_path / "single.jsonl")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tasks were checked")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    code = main(_evaluate_argv(tiny_model_dirs, text_file, tiny_dictionary, tmp_path / "out", tasks))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("conca evaluate: error: ") and match in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # SCR/TPP on 1,600 bios and the first-letter prompts through the tiny model
def test_evaluate_runs_scr_tpp_and_absorption_as_tasks(tmp_path, tiny_model_dirs, text_file, tiny_dictionary,
                                                       one_thread):
    from conca.cli import main

    assert main(_evaluate_argv(tiny_model_dirs, text_file, tiny_dictionary, tmp_path / "e", "scr_tpp,absorption")) == 0
    written = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert "tasks" not in written and "explained_variance" in written["metrics"]  # no probing task was asked for
    assert {"scr_metric_threshold_2", "scr_metric_threshold_50"} <= set(written["scr_tpp"]["scr"])
    assert "tpp_threshold_2_total_metric" in written["scr_tpp"]["tpp"]
    assert "1B" in written["absorption"]["caveat"] and "enough_letters" in written["absorption"]
    # The same results in SAEBench's layout, one file per eval type, beside metrics.json.
    scr_file = json.loads((tmp_path / "e" / "scr.json").read_text())
    tpp_file = json.loads((tmp_path / "e" / "tpp.json").read_text())
    absorption_file = json.loads((tmp_path / "e" / "absorption_first_letter.json").read_text())
    assert scr_file["eval_type_id"] == "scr" and tpp_file["eval_type_id"] == "tpp"
    assert scr_file["eval_result_metrics"]["scr_metrics"]["scr_metric_threshold_2"] == pytest.approx(
        written["scr_tpp"]["scr"]["scr_metric_threshold_2"])
    assert tpp_file["eval_result_metrics"]["tpp_metrics"]["tpp_threshold_2_total_metric"] == pytest.approx(
        written["scr_tpp"]["tpp"]["tpp_threshold_2_total_metric"])
    assert absorption_file["eval_type_id"] == "absorption_first_letter"
    assert absorption_file["sae_cfg_dict"]["method"] == "topk"
