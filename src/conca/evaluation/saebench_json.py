"""SCR, TPP and absorption results laid out as SAEBench's results JSON (as `sparse_probing.saebench_output`).

Field names follow SAEBench 0.6.0's output schemas (``sae_bench/evals/*/eval_output.py`` and the
``run_eval`` functions that fill them): every file has ``eval_type_id``, ``eval_config``, ``eval_id``,
``datetime_epoch_millis``, ``eval_result_metrics`` (one category of means), ``eval_result_details`` (one
row per dataset or letter), ``eval_result_unstructured``, the SAELens fields (None here: conca's
dictionaries are not SAELens releases) and ``sae_cfg_dict`` (conca's description of the dictionary).

* ``scr``: metrics category ``scr_metrics`` with ``scr_dir1_threshold_N``, ``scr_dir2_threshold_N`` and
  ``scr_metric_threshold_N`` averaged over the profession pairs; one detail per pair, named
  ``<dataset>_scr_<profession>_<profession>_results`` as SAEBench names its runs.
* ``tpp``: category ``tpp_metrics`` with ``tpp_threshold_N_total_metric``, ``..._intended_diff_only``,
  ``..._unintended_diff_only``; one detail ``<dataset>_tpp_results``; the per-class metrics under
  ``eval_result_unstructured[<dataset>]``.
* ``absorption_first_letter``: category ``mean`` with ``mean_absorption_fraction_score``,
  ``mean_full_absorption_score``, ``mean_num_split_features`` and their ``std_dev_*``; one detail per
  scored letter (``first_letter``, ``mean_absorption_fraction``, ``full_absorption_rate``,
  ``num_full_absorption``, ``num_probe_true_positives``, ``num_split_features``).
conca's extra context (accuracies behind each SCR score, skipped letters, the caveat) goes under
``eval_result_unstructured``; nothing in SAEBench's named fields changes meaning."""

from __future__ import annotations

import time
import uuid

from conca.evaluation.scr_tpp import N_VALUES

SCR_DATASET_NAME = "scr_profession_gender"
EVAL_TYPE_SCR, EVAL_TYPE_TPP, EVAL_TYPE_ABSORPTION = "scr", "tpp", "absorption_first_letter"
_SAELENS_FIELDS = {"sae_bench_commit_hash": None, "sae_lens_id": None, "sae_lens_release_id": None,
                   "sae_lens_version": None}


def _envelope(eval_type: str, config: dict, metrics: dict, details: list, unstructured, dictionary: dict,
              conca_version: str) -> dict:
    return {"eval_type_id": eval_type, "eval_config": config, "eval_id": str(uuid.uuid4()),
            "datetime_epoch_millis": int(time.time() * 1000), "eval_result_metrics": metrics,
            "eval_result_details": details, "eval_result_unstructured": unstructured, **_SAELENS_FIELDS,
            "sae_cfg_dict": dictionary, "conca_version": conca_version}


def _scr_keys(result: dict) -> list[str]:
    return [k for k in result if k.startswith(("scr_dir1_threshold_", "scr_dir2_threshold_", "scr_metric_threshold_"))]


def scr_tpp_outputs(result: dict, *, model: str, site: str, dictionary: dict, seed: int = 0,
                    n_values=N_VALUES, context_length: int = 128, dataset: str = SCR_DATASET_NAME,
                    conca_version: str = "") -> tuple[dict, dict]:
    """(SAEBench's scr results JSON, its tpp results JSON) of one dictionary's `scr_tpp_on_model` result
    ({"scr": ..., "tpp": ...})."""
    scr, tpp = result["scr"], result["tpp"]
    pairs = list(scr["per_pair"])
    common = {"random_seed": seed, "dataset_names": [dataset], "context_length": context_length,
              "model_name": model, "hook_point": site, "n_values": list(n_values)}
    scr_config = {**common, "perform_scr": True,
                  "column1_vals_lookup": {dataset: [pair.split("_", 1) for pair in pairs]},
                  "notes": "conca: sklearn logistic-regression probes on standardised mean-pooled activations "
                           "(SAEBench: a torch probe with an L1 penalty); cells cut to the smallest cell's size; "
                           "50/50 seeded split (a small set: half held out for tighter test accuracies); signed latents ranked by |effect|"}
    scr_details = [{"dataset_name": f"{dataset}_scr_{pair}_results", **{k: r[k] for k in _scr_keys(r)}}
                   for pair, r in scr["per_pair"].items()]
    scr_unstructured = {f"{dataset}_scr_{pair}_results": {key: r[key] for key in ("dir1", "dir2", "scr_metric_direction",
                                                                                   "train_per_cell", "test_per_cell")}
                        for pair, r in scr["per_pair"].items()}
    scr_unstructured["standard_errors"] = {k: v for k, v in scr.items() if k.startswith("scr_metric_standard_error_")}
    scr_json = _envelope(EVAL_TYPE_SCR, scr_config, {"scr_metrics": {k: scr[k] for k in _scr_keys(scr)}},
                         scr_details, scr_unstructured, dictionary, conca_version)
    tpp_keys = [k for k in tpp if k.startswith("tpp_threshold_")]
    tpp_config = {**common, "perform_scr": False, "classes": list(tpp.get("classes", [])),
                  "notes": "conca: sklearn logistic-regression probes on standardised mean-pooled activations; "
                           "one-vs-rest with balanced negatives; signed latents ranked by |effect|"}
    names = tpp.get("classes")
    per_class = {(names[int(i)] if names else i): metrics for i, metrics in tpp["per_class"].items()}
    tpp_json = _envelope(EVAL_TYPE_TPP, tpp_config, {"tpp_metrics": {k: tpp[k] for k in tpp_keys}},
                         [{"dataset_name": f"{dataset}_tpp_results", **{k: tpp[k] for k in tpp_keys}}],
                         {dataset: per_class}, dictionary, conca_version)
    return scr_json, tpp_json


_ABSORPTION_MEANS = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
                     "std_dev_absorption_fraction_score", "std_dev_full_absorption_score", "std_dev_num_split_features")
_LETTER_FIELDS = ("mean_absorption_fraction", "full_absorption_rate", "num_full_absorption", "num_probe_true_positives",
                  "num_split_features")


def absorption_output(result: dict, *, model: str, site: str, dictionary: dict, seed: int = 0,
                      conca_version: str = "") -> dict:
    """SAEBench's absorption_first_letter results JSON of one dictionary's `absorption` result."""
    config = {"model_name": model, "hook_point": site, "random_seed": seed, "f1_jump_threshold": 0.03,
              "max_k_value": 10, "prompt_template": "{word} has the first letter:", "k_sparse_probe_l1_decay": 0.01,
              "k_sparse_probe_num_epochs": 50, "max_tokens_per_letter": result.get("max_tokens_per_letter"),
              "notes": "conca: activations at the word token of each in-context prompt; letters scored when the "
                       "ground-truth probe's F1 > 0.6"}
    details = [{"first_letter": letter, **{k: row[k] for k in _LETTER_FIELDS}}
               for letter, row in result["per_letter"].items() if "mean_absorption_fraction" in row]
    unstructured = {key: result[key] for key in ("caveat", "letters_evaluated", "enough_letters", "min_letters",
                                                 "n_tokens", "n_test_tokens", "signed_latents") if key in result}
    unstructured["skipped_letters"] = {letter: row["skipped"] for letter, row in result["per_letter"].items()
                                       if "skipped" in row}
    return _envelope(EVAL_TYPE_ABSORPTION, config, {"mean": {k: result.get(k) for k in _ABSORPTION_MEANS}},
                     details, unstructured, dictionary, conca_version)


def metric_task_files(payload: dict, *, model: str, site: str, dictionary, dictionary_path: str = "",
                      conca_version: str = "") -> dict[str, dict]:
    """{file name: SAEBench results JSON} for the metric tasks in an evaluate payload ("scr_tpp" gives
    scr.json and tpp.json, "absorption" gives absorption_first_letter.json)."""
    from dataclasses import asdict

    described = {"method": dictionary.name, "config": asdict(dictionary.config),
                 "signed_latents": dictionary.signed_latents, "path": dictionary_path}
    files = {}
    if "scr_tpp" in payload:
        files["scr.json"], files["tpp.json"] = scr_tpp_outputs(payload["scr_tpp"], model=model, site=site,
                                                               dictionary=described, conca_version=conca_version)
    if "absorption" in payload:
        files["absorption_first_letter.json"] = absorption_output(payload["absorption"], model=model, site=site,
                                                                  dictionary=described, conca_version=conca_version)
    return files


__all__ = ["scr_tpp_outputs", "absorption_output", "metric_task_files", "EVAL_TYPE_SCR", "EVAL_TYPE_TPP", "EVAL_TYPE_ABSORPTION"]
