"""Task metrics in `conca reproduce concepts`: SAEBench's k-sparse probing of every method's trained
dictionaries (all seeds) beside untrained dictionaries of the same method and width, and beside a
probe on the raw activations.

One pass of the model per task feeds every dictionary (pooled_activations_many). The untrained
dictionaries are fresh initialisations of the same method and width (seeds 0..UNTRAINED_DRAWS-1), so
`lift` says what training added to the task accuracy, with a percentile interval over every
(trained seed, untrained draw) difference. Cached in OUT/runs/tasks.json, keyed by what it depends on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from conca.dictionaries.base import Dictionary, load_dictionary
from conca.evaluation.floors import lift
from conca.evaluation.sparse_probing import K_VALUES, SEED, average_over_tasks, probe_task
from conca.evaluation.task_probing import pooled_activations_many
from conca.evaluation.tasks import TEST_FRACTION, load_tasks
from conca.fileio import atomic_write_json

UNTRAINED_DRAWS = 5
# Pooled latents of one group of dictionaries held at once: n_texts x n_latents floats each.
GROUP_BYTES = 512 * 2 ** 20


def _groups(dictionaries: dict[str, Dictionary], n_texts: int) -> list[dict[str, Dictionary]]:
    groups, current, size = [], {}, 0
    for key, dictionary in dictionaries.items():
        need = 4 * n_texts * dictionary.config.n_latents
        if current and size + need > GROUP_BYTES:
            groups.append(current)
            current, size = {}, 0
        current[key] = dictionary
        size += need
    return groups + ([current] if current else [])


def probe_dictionaries(loaded, site: str, tasks: list, dictionaries: dict[str, Dictionary], ctx_len: int = 128,
                       k_values: "tuple[int, ...]" = K_VALUES) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """({dictionary key: SAEBench sparse-probing means over the tasks}, the raw-activation probe's means).
    The all-latents probe is left out (the k-sparse ones are the metric; it costs most)."""
    per_key: dict[str, dict[str, dict]] = {key: {} for key in dictionaries}
    raw_per_task: dict[str, dict] = {}
    for task in tasks:
        train, test = task.split(TEST_FRACTION, SEED)
        labels = np.asarray(task.labels)
        for index, group in enumerate(_groups(dictionaries, len(task))):
            raw, latents = pooled_activations_many(loaded, group, site, task.texts, ctx_len, name=task.name)
            for key, z in latents.items():
                result = probe_task(z.numpy(), labels, train, test, task.classes,
                                    raw=raw.numpy() if index == 0 and task.name not in raw_per_task else None,
                                    k_values=k_values, all_latents=False)
                if "llm_test_accuracy" in result:
                    raw_per_task[task.name] = {k: v for k, v in result.items() if k.startswith("llm_")}
                per_key[key][task.name] = {k: v for k, v in result.items() if k.startswith("sae_")}
    means = {key: average_over_tasks(per_task) for key, per_task in per_key.items()}
    return means, average_over_tasks(raw_per_task)


def task_metrics(loaded, site: str, names: list[str], seeds: int, run_dir: Path,
                 fresh: Callable[[str, int], Dictionary], spec: str, log=print,
                 untrained_draws: int = UNTRAINED_DRAWS) -> dict | None:
    """Per method: each k's top-k accuracy (mean over tasks) per trained seed and per untrained draw,
    their means, and the lift with its interval; plus the raw probe. None when `spec` is empty."""
    if not spec:
        return None
    path = run_dir / "tasks.json"
    draws = max(untrained_draws, seeds)
    key = {"tasks": spec, "seeds": seeds, "methods": names, "untrained_draws": draws, "k_values": list(K_VALUES),
           "untrained_calibrated": True, "inference_mode": True}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            log("[conca reproduce] task metrics: already measured, reusing")
            return saved["results"]
    tasks = load_tasks(spec)
    log(f"[conca reproduce] task metrics: {len(tasks)} tasks x {len(names)} methods x ({seeds} seeds + {draws} "
        "untrained) ...")
    dictionaries = {f"{name}@{seed}": load_dictionary(run_dir / f"seed{seed}" / name) for name in names
                    for seed in range(seeds)}
    dictionaries.update({f"untrained {name}@{seed}": fresh(name, seed) for name in names for seed in range(draws)})
    means, raw = probe_dictionaries(loaded, site, tasks, dictionaries)
    methods = {}
    for name in names:
        entry = {}
        for k in K_VALUES:
            metric = f"sae_top_{k}_test_accuracy"
            trained = [means[f"{name}@{s}"][metric] for s in range(seeds)]
            untrained = [means[f"untrained {name}@{s}"][metric] for s in range(draws)]
            entry[f"top_{k}"] = {"trained": float(np.mean(trained)), "trained_std": float(np.std(trained)),
                                 "untrained": float(np.mean(untrained)), "per_seed": trained, "untrained_draws": untrained,
                                 "lift": lift(trained, untrained)}
        methods[name] = entry
    results = {"tasks": [t.name for t in tasks], "k_values": list(K_VALUES), "llm": raw, "methods": methods,
               "definition": "SAEBench sparse probing (mean-pooled latents, top-k by |Δμ| on the train split, logistic "
                             "regression, test accuracy), averaged over the tasks; untrained: fresh initialisations of the "
                             "same method and width (seeds 0..)"}
    atomic_write_json(path, {"key": key, "results": results})
    return results


__all__ = ["task_metrics", "probe_dictionaries", "UNTRAINED_DRAWS"]
