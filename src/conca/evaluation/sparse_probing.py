"""k-sparse probing as SAEBench defines it (``sae_bench/evals/sparse_probing``), on plain arrays.

The inputs are one row per example: the dictionary's latents and the model's activations, each
mean-pooled over the example's real tokens (conca.evaluation.task_probing builds them). What this
follows from SAEBench (probe_training.py and main.py of adamkarvonen/SAEBench):

- **one-vs-rest per class**: for each class, its examples against as many drawn from the other
  classes (ceil(n / (classes - 1)) from each, then cut to n, seeded), on the train and on the test
  split alike (SAEBench's ``prepare_probe_data``); a task's accuracy is the mean over its classes.
  A 2-class task is probed once (class 1 against class 0): SAEBench probes both mirrored problems,
  which have the same data, the same top-k and the same accuracy, and averages them.
- **top-k by |Δμ|**: the k latents with the largest |mean(positive) − mean(negative)| on the train
  problem (SAEBench's ``get_top_k_mean_diff_mask`` takes the absolute value too, so signed ConCA
  latents and non-negative SAE latents are ranked alike; ties go to the lower latent index).
- **the probe**: sklearn ``LogisticRegression`` (L2, C = 1, max_iter = 1000) on those k columns,
  standardised with the training split's per-feature mean and standard deviation (SAEBench: unscaled;
  see `fit_logistic`); test accuracy. k larger than the number of columns uses all of them.
- **beside it**: the same on the raw activations, all channels (``llm_test_accuracy``, the upper
  bound) and top-k channels (``llm_top_k_test_accuracy``), and on all latents (``sae_test_accuracy``).
  SAEBench fits the all-channel probes with a GPU torch probe that keeps its best *test* epoch; conca
  fits them with the same sklearn probe as the top-k ones, so no test-set selection enters.

k ∈ {1, 2, 5, 10} here (SAEBench's default is {1, 2, 5}; its output schema has fields up to 100).
The result keys are SAEBench's (``sae_top_1_test_accuracy``, ...; eval_output.py there), and
`saebench_output` lays a run out as SAEBench's results JSON."""

from __future__ import annotations

import math
import time
import uuid
import warnings

import numpy as np

K_VALUES = (1, 2, 5, 10)
SEED = 42  # SAEBench's default random_seed
EVAL_TYPE_ID = "sparse_probing"


def top_k_by_mean_difference(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest |mean(x | y = 1) − mean(x | y = 0)|, largest first (ties: lower
    index first); all columns when k exceeds their number."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    if not y.any() or y.all():
        raise ValueError("the mean difference needs examples of both classes")
    diff = np.abs(x[y].mean(axis=0) - x[~y].mean(axis=0))
    return np.argsort(-diff, kind="stable")[:max(0, min(int(k), x.shape[1]))]


def mean_difference(x: np.ndarray, y: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Signed mean(x | y = 1) − mean(x | y = 0) of the given columns."""
    x = np.asarray(x, dtype=np.float64)[:, columns]
    y = np.asarray(y).astype(bool)
    return x[y].mean(axis=0) - x[~y].mean(axis=0)


def balanced_one_vs_rest(labels: np.ndarray, positive: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, 0/1 targets), shuffled: every example of `positive` against as many drawn from the
    other classes, an equal share from each (SAEBench's prepare_probe_data); with fewer negatives than
    positives, the positives are cut to match."""
    labels = np.asarray(labels)
    positives = np.flatnonzero(labels == positive)
    others = [c for c in np.unique(labels) if c != positive]
    if len(positives) == 0 or not others:
        raise ValueError(f"class {positive} needs examples of its own and of another class")
    per_class = math.ceil(len(positives) / len(others))
    negatives = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in others])
    negatives = rng.permutation(negatives)
    n = min(len(positives), len(negatives))
    rows = np.concatenate([rng.permutation(positives)[:n], negatives[:n]])
    targets = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    order = rng.permutation(len(rows))
    return rows[order], targets[order]


def fit_logistic(train_x: np.ndarray, train_y: np.ndarray, *, max_iter: int = 1000,
                 seed: int = 0) -> tuple[np.ndarray, float]:
    """sklearn's LogisticRegression (L2, C = 1) on per-feature standardised inputs, returned as (w, b) on
    the raw inputs: predict 1 where x @ w + b > 0.

    The mean and standard deviation come from the training rows only (a column constant there is
    divided by 1). Why: residual streams have large and uneven norms (Gemma's reach the thousands);
    unscaled, lbfgs stops at max_iter far from the optimum and the accuracy depends on the units. With
    standardisation the probe is the same for x and for x scaled or shifted per feature. C = 1 then
    means one penalty in units of each feature's spread (SAEBench fits on unscaled inputs)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(train_x, dtype=np.float64)
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 1e-12 * np.maximum(1.0, np.abs(mu)), sd, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # separable data: the optimum is at infinity
        probe = LogisticRegression(C=1.0, max_iter=max_iter, random_state=seed).fit((x - mu) / sd, train_y)
    w = probe.coef_[0] / sd
    return w, float(probe.intercept_[0] - (w * mu).sum())


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of `fit_logistic` (L2, C = 1, max_iter = 1000 as SAEBench; standardised inputs)."""
    w, b = fit_logistic(train_x, train_y)
    predicted = (np.asarray(test_x, dtype=np.float64) @ w + b > 0).astype(np.int64)
    return float((predicted == np.asarray(test_y)).mean())


def _problems(n_classes: int) -> list[int]:
    return [1] if n_classes == 2 else list(range(n_classes))


def probe_task(latents: np.ndarray, labels: "np.ndarray | list[int]", train: np.ndarray, test: np.ndarray,
               classes: "tuple[str, ...] | list[str]", raw: np.ndarray | None = None,
               k_values: "tuple[int, ...]" = K_VALUES, seed: int = SEED, all_latents: bool = True) -> dict:
    """SAEBench's sparse-probing metrics of one task: ``sae_top_{k}_test_accuracy`` on the latents (and
    ``sae_test_accuracy`` on all of them), ``llm_*`` on `raw` when given; each the mean over the task's
    one-vs-rest problems. Also per class: the accuracies, and the top latents with their signed Δμ."""
    labels = np.asarray(labels)
    latents = np.asarray(latents)
    if len(latents) != len(labels) or (raw is not None and len(raw) != len(labels)):
        raise ValueError("latents, raw activations and labels must have one row per example")
    k_values = tuple(sorted({int(k) for k in k_values}))
    features = ([("llm", np.asarray(raw))] if raw is not None else []) + [("sae", latents)]
    per_class: dict[str, dict[str, float]] = {}
    top_latents: dict[str, list[dict]] = {}
    for c in _problems(len(classes)):
        rng = np.random.default_rng([seed, c])
        train_rows, train_y = balanced_one_vs_rest(labels[train], c, rng)
        test_rows, test_y = balanced_one_vs_rest(labels[test], c, rng)
        train_rows, test_rows = train[train_rows], test[test_rows]
        for prefix, x in features:
            x_train, x_test = x[train_rows], x[test_rows]
            if prefix == "llm" or all_latents:
                per_class.setdefault(f"{prefix}_test_accuracy", {})[classes[c]] = probe_accuracy(
                    x_train, train_y, x_test, test_y)
            ranked = top_k_by_mean_difference(x_train, train_y, max(k_values))
            for k in k_values:
                per_class.setdefault(f"{prefix}_top_{k}_test_accuracy", {})[classes[c]] = probe_accuracy(
                    x_train[:, ranked[:k]], train_y, x_test[:, ranked[:k]], test_y)
            if prefix == "sae":
                deltas = mean_difference(x_train, train_y, ranked)
                top_latents[classes[c]] = [{"latent": int(j), "mean_difference": float(d)} for j, d in zip(ranked, deltas)]
    result: dict = {key: float(np.mean(list(values.values()))) for key, values in per_class.items()}
    result.update({
        "classes": list(classes), "n_train": int(len(train)), "n_test": int(len(test)),
        "problems": ("one problem: class 1 vs class 0 (SAEBench's two mirrored problems give the same accuracy)"
                     if len(classes) == 2 else f"{len(classes)} one-vs-rest problems, accuracies averaged"),
        "per_class": per_class, "top_latents": top_latents,
    })
    return result


def metric_keys(result: dict) -> list[str]:
    """The SAEBench metric keys of a probe_task result (llm_* then sae_*)."""
    return [k for k in result if k.startswith(("llm_", "sae_")) and isinstance(result[k], float)]


def average_over_tasks(per_task: dict[str, dict]) -> dict[str, float]:
    """Each metric's mean over the tasks that have it (SAEBench averages its datasets the same way)."""
    keys = [k for k in dict.fromkeys(k for r in per_task.values() for k in metric_keys(r))]
    return {k: float(np.mean([r[k] for r in per_task.values() if k in r])) for k in keys}


def tasks_summary(per_task: dict[str, dict], *, k_values=K_VALUES, seed: int = SEED, context_length: int = 128,
                  test_fraction: float = 0.2, signed_latents: bool = False) -> dict:
    """What `conca evaluate --tasks` writes under "tasks" in metrics.json: the settings, the means over
    tasks, and every task's result (probe_task)."""
    return {
        "definition": "SAEBench sparse probing: mean-pooled latents over real tokens, top-k latents by |mean(class) - "
                      "mean(rest)| on the train split, logistic regression on them, test accuracy; one-vs-rest "
                      "per class, averaged; llm_*: the same on the raw activations",
        "ranking": "|Δμ|" + (" (signed latents: either sign counts)" if signed_latents else ""),
        "k_values": list(k_values), "seed": seed, "test_fraction": test_fraction, "context_length": context_length,
        "mean": average_over_tasks(per_task), "per_task": per_task,
    }


def brief_summary(summary: dict) -> dict:
    """A tasks_summary without the per-class details: the means and each task's metrics (for printing)."""
    return {"mean": summary["mean"],
            "per_task": {name: {k: r[k] for k in metric_keys(r)} for name, r in summary["per_task"].items()}}


def saebench_output(per_task: dict[str, dict], *, model: str, site: str, dictionary: dict, k_values=K_VALUES,
                    seed: int = SEED, context_length: int = 128, test_fraction: float = 0.2,
                    conca_version: str = "") -> dict:
    """A run laid out as SAEBench's sparse-probing results JSON (SparseProbingEvalOutput): eval_config,
    eval_result_metrics {llm, sae} (means over tasks), eval_result_details (one per task, named
    "<task>_results" as SAEBench names its datasets) and eval_result_unstructured (per class).
    Fields SAEBench fills from SAELens are None; `dictionary` goes into sae_cfg_dict."""
    averaged = average_over_tasks(per_task)
    return {
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": {
            "random_seed": seed, "dataset_names": list(per_task), "probe_train_set_size": None,
            "probe_test_set_size": None, "probe_test_fraction": test_fraction, "context_length": context_length,
            "k_values": list(k_values), "model_name": model, "hook_point": site,
            "notes": "conca: splits are 80/20 of each task, stratified and seeded (SAEBench: 4000/1000); all-"
                     "channel probes are sklearn LogisticRegression, not SAEBench's GPU probe; every probe's inputs are "
                     "standardised with the training split's mean and std; latents ranked by |Δμ|",
        },
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {
            "llm": {k: v for k, v in averaged.items() if k.startswith("llm_")},
            "sae": {k: v for k, v in averaged.items() if k.startswith("sae_")},
        },
        "eval_result_details": [{"dataset_name": f"{name}_results", **{k: r[k] for k in metric_keys(r)}}
                                for name, r in per_task.items()],
        "eval_result_unstructured": {f"{name}_results": r["per_class"] for name, r in per_task.items()},
        "sae_bench_commit_hash": None, "sae_lens_id": None, "sae_lens_release_id": None, "sae_lens_version": None,
        "sae_cfg_dict": dictionary, "conca_version": conca_version,
    }


__all__ = ["K_VALUES", "SEED", "top_k_by_mean_difference", "mean_difference", "balanced_one_vs_rest",
           "fit_logistic", "probe_accuracy", "probe_task", "average_over_tasks", "tasks_summary", "brief_summary", "saebench_output"]
