"""`conca align` on the biography world: train the QA language model, read its activations, fit and
measure an AlignSAE per layer, and swap concepts over the alpha grid."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from conca.dictionaries.base import Dictionary, load_dictionary
from conca.evaluation import alignment
from conca.experiments.align.fitting import (_baseline_metrics, _binding_metrics, _cached_json, _cached_tensors,
                                             _dictionary_options, _value_accuracy, _value_classes, alignsae_steps,
                                             fit_alignsae)
from conca.experiments.align.options import _floats, _layers, _names
from conca.experiments.align.swap_ceilings import CeilingTrials, LabelledRows, edit_ceilings
from conca.experiments.lab_options import AlignOptions
from conca.interventions.swap import SwapTrial, generate_swapped
from conca.models.prompts import greedy_generate, last_token_activations
from conca.models.sites import Site
from conca.synthetic.biographies import (ID_TEMPLATES, OOD_TEMPLATES, RELATIONS, BiographyWorld, Question,
                                         answers_match, make_biography_world)
from conca.synthetic.qa_lm import QALMConfig, train_qa_lm
from conca.training.trainer import evaluate_batch

SPLITS = ("train", "select", "id", "ood")


def _split_questions(world: BiographyWorld, opts: AlignOptions) -> dict[str, list[Question]]:
    """train: the dictionary's rows; select: held-out persons' ID questions that pick its checkpoint;
    id: the other held-out persons' ID questions (test-ID); ood: every person's OOD phrasings."""
    train_persons, test_persons = world.split_persons(opts.dict_train_fraction, seed=opts.world_seed)
    n_select = round(opts.select_fraction * len(train_persons))
    n_select = min(n_select, len(train_persons) - 1) if opts.select_fraction > 0 else 0
    select_persons = sorted(random.Random(opts.world_seed + 1).sample(train_persons, max(0, n_select)))
    train_persons = [p for p in train_persons if p not in set(select_persons)]
    return {"train": world.questions(ID_TEMPLATES, train_persons), "select": world.questions(ID_TEMPLATES, select_persons),
            "id": world.questions(ID_TEMPLATES, test_persons), "ood": world.questions(OOD_TEMPLATES)}


def lm_config(opts: AlignOptions) -> QALMConfig:
    return QALMConfig(n_layer=opts.lm_layers, n_embd=opts.lm_width, n_head=opts.lm_heads, steps=opts.lm_steps,
                      batch_size=opts.lm_batch_size, lr=opts.lm_lr, target_accuracy=opts.lm_target_accuracy,
                      eval_every=opts.lm_eval_every, warmup_steps=min(100, opts.lm_steps // 10), seed=opts.seed)


def swap_pairs(questions: list[Question], n_questions: int, seed: int) -> list[tuple[Question, str]]:
    """`n_questions` sampled questions, each with every other relation."""
    picked = random.Random(seed).sample(questions, min(n_questions, len(questions)))
    return [(q, target) for q in picked for target in RELATIONS if target != q.relation]


def swap_trials(world: BiographyWorld, questions: list[Question], n_questions: int, seed: int) -> list[SwapTrial]:
    """`n_questions` sampled questions, each swapped to every other relation of the same person."""
    return [SwapTrial(q.prompt, q.relation, target, world.persons[q.person].attributes[target])
            for q, target in swap_pairs(questions, n_questions, seed)]


def biography_ceilings(model, tokenizer, world: BiographyWorld, pairs: list[tuple[Question, str]],
                       means_from: LabelledRows, cells_from: LabelledRows, sites: list[Site]) -> dict:
    """The swap ceilings (`swap_ceilings.edit_ceilings`) of the trials `pairs` (question, target relation):
    relation means from the dictionary's training persons, cells from the trials' own persons."""
    counterfactual = [next(c for c in world.questions((q.template,), [q.person]) if c.relation == target).prompt
                      for q, target in pairs]
    expected = [(world.persons[q.person].attributes[t], t) for q, t in pairs]
    trials = CeilingTrials(prompts=[q.prompt for q, _ in pairs], counterfactual=counterfactual,
                           entity=[q.person for q, _ in pairs], source=[q.concept for q, _ in pairs],
                           target=[RELATIONS.index(t) for _, t in pairs], max_new_tokens=6,
                           hits=lambda answers: [answers_match(a, e, t) for a, (e, t) in zip(answers, expected)])
    return edit_ceilings(model, tokenizer, trials, sites, means_from, cells_from, len(RELATIONS))


def run_biographies(opts: AlignOptions, out: Path, say) -> dict:
    t0 = time.perf_counter()
    world = make_biography_world(opts.persons, opts.world_seed)
    splits = _split_questions(world, opts)
    every_id = world.questions(ID_TEMPLATES)
    lm_cfg = lm_config(opts)
    say(f"biography world: {opts.persons} persons, {len(every_id)} ID and {len(splits['ood'])} OOD questions; "
        f"training a {opts.lm_layers}-layer, width-{opts.lm_width} LM")
    model, tokenizer, lm_info = train_qa_lm(world, every_id, {"id": every_id, "ood": splits["ood"]}, lm_cfg,
                                            out / "lm", progress=opts.progress, log=say)
    say(f"LM accuracy: ID {lm_info['accuracy']['id']:.3f}, OOD {lm_info['accuracy']['ood']:.3f}")
    sites = [Site("resid", layer) for layer in _layers(opts.layers, opts.lm_layers, "layers")]
    all_questions = [q for k in SPLITS for q in splits[k]]
    identity = {"lm": lm_info["identity"], "persons": opts.persons, "world_seed": opts.world_seed,
                "dict_train_fraction": opts.dict_train_fraction, "select_fraction": opts.select_fraction}
    # Every layer is read (one cheap pass), so that studying other layers later reuses the file.
    every_site = [Site("resid", layer) for layer in range(opts.lm_layers)]
    acts = _cached_tensors(out / "activations.safetensors", identity, lambda: {
        str(site): x for site, x in last_token_activations(model, tokenizer, [q.prompt for q in all_questions],
                                                            every_site, progress=opts.progress).items()})
    bounds = np.cumsum([0] + [len(splits[k]) for k in SPLITS])
    rows = {k: slice(int(bounds[i]), int(bounds[i + 1])) for i, k in enumerate(SPLITS)}
    concepts = torch.tensor([q.concept for q in all_questions])
    value_labels, values = _value_classes([q.answer for q in all_questions])
    alphas = _floats(opts.alphas, "alphas")
    trials = swap_trials(world, splits["id"], opts.swap_questions, opts.seed)
    baseline_answers = greedy_generate(model, tokenizer, [t.prompt for t in trials], max_new_tokens=6)
    floor = float(np.mean([answers_match(a, t.expected, t.target) for a, t in zip(baseline_answers, trials)]))
    per_layer = {}
    steps = alignsae_steps(opts, rows["train"].stop - rows["train"].start, opts.epochs)
    for site in sites:
        x = acts[str(site)]
        layer_dir = out / "layers" / str(site)
        layer_identity = {**identity, "site": str(site), "options": _dictionary_options(opts, steps)}

        def measure_layer() -> dict:
            say(f"{site}: training AlignSAE ({opts.n_free} free + {len(RELATIONS)} concept slots, {steps} steps)")
            sae, history, choice = fit_alignsae(x[rows["train"]], concepts[rows["train"]], values[rows["train"]],
                                                list(RELATIONS), value_labels, opts, opts.n_free, steps,
                                                layer_dir / "alignsae", str(site), eval_x=x[rows["id"]],
                                                select=(x[rows["select"]], concepts[rows["select"]]))
            split_xc = {k: (x[rows[k]], concepts[rows[k]]) for k in ("train", "id", "ood")}
            metrics = _binding_metrics(sae, split_xc, len(RELATIONS), "id")
            metrics["value_accuracy_id"] = _value_accuracy(sae, x[rows["id"]], concepts[rows["id"]], values[rows["id"]])
            metrics["fvu_id"] = evaluate_batch(sae, x[rows["id"]])["fvu"]
            with torch.no_grad():
                z_id = sae.encode(x[rows["id"]])
            metrics["fragmentation"] = alignment.fragmentation(z_id[:, sae.concept_slots], concepts[rows["id"]],
                                                               len(RELATIONS))
            metrics["history"] = history[-1] if history else {}
            # Which checkpoint was kept (None: no selection rows, the last step).
            metrics["checkpoint"] = None if choice is None else {k: v for k, v in choice.items() if k != "candidates"}
            metrics["checkpoint_candidates"] = [] if choice is None else choice["candidates"]
            if opts.baseline:
                metrics["baseline"] = _baseline_metrics(x, rows, concepts, opts, layer_dir, steps)
            return metrics

        metrics = _cached_json(layer_dir / "metrics.json", layer_identity, measure_layer)
        sae = load_dictionary(layer_dir / "alignsae" / "align")

        def swap_grid(dictionary: Dictionary, method: str, slots: dict[str, int] | None, label: str):
            def measure() -> dict:
                say(f"{site}: swapping {len(trials)} questions at {len(alphas)} alphas ({label}, {method})")
                success = {}
                for alpha in alphas:
                    answers = generate_swapped(model, tokenizer, site, dictionary, trials, alpha, method,
                                               opts.swap_error_term, opts.swap_positions, max_new_tokens=6, slots=slots)
                    success[str(alpha)] = float(np.mean([answers_match(a, t.expected, t.target)
                                                         for a, t in zip(answers, trials)]))
                return success
            return measure

        swap_through = {"": (sae, None, "AlignSAE", metrics)}
        if "baseline" in metrics and opts.baseline_swaps:
            # The same swaps through the unsupervised SAE: each relation's slot is its matched feature.
            swap_through["baseline_"] = (load_dictionary(layer_dir / "baseline" / "relu_l1"),
                                         dict(zip(RELATIONS, metrics["baseline"]["matched_features"])),
                                         "unsupervised SAE", metrics["baseline"])
        for prefix, (dictionary, slots, label, into) in swap_through.items():
            into["swap_success"] = {}
            for method in _names(opts.swap_methods):
                swap_identity = {**layer_identity, "alphas": alphas, "swap": [method, opts.swap_error_term,
                                                                              opts.swap_positions, opts.swap_questions]}
                into["swap_success"][method] = _cached_json(layer_dir / f"{prefix}swaps_{method}.json", swap_identity,
                                                            swap_grid(dictionary, method, slots, label))
        method, alpha, value = _best_swap(metrics["swap_success"])
        say(f"{site}: slot accuracy train {metrics['slot_accuracy_train']:.3f}, ID {metrics['slot_accuracy_id']:.3f}, "
            f"OOD {metrics['slot_accuracy_ood']:.3f}, diagonal {metrics['diagonal_accuracy']:.3f}; best swap "
            f"{value:.3f} at alpha {alpha} ({method})")
        per_layer[str(site)] = metrics
    label = lambda k: LabelledRows({s: acts[s][rows[k]] for s in map(str, sites)},  # noqa: E731
                                   torch.tensor([q.person for q in splits[k]]), concepts[rows[k]])
    ceilings = _cached_json(out / "swap_ceilings.json", {**identity, "sites": [str(s) for s in sites],
                                                         "swap_questions": opts.swap_questions, "seed": opts.seed},
                            lambda: biography_ceilings(model, tokenizer, world, swap_pairs(
                                splits["id"], opts.swap_questions, opts.seed), label("train"), label("id"), sites))
    return {
        "swap_ceilings": ceilings,
        "lm": {k: lm_info[k] for k in ("accuracy", "steps_trained", "reached_target", "n_parameters", "vocab_size",
                                       "elapsed_s", "history")},
        "n_questions": {k: len(v) for k, v in splits.items()}, "n_swap_trials": len(trials),
        "swap_floor": floor, "alphas": alphas, "layers": per_layer,
        "best": _best_over_layers({site: m["swap_success"] for site, m in per_layer.items()}),
        "best_baseline": _best_over_layers({site: m["baseline"]["swap_success"] for site, m in per_layer.items()
                                            if "swap_success" in m.get("baseline", {})}),
        "alpha_profile": alpha_profile({site: m["swap_success"] for site, m in per_layer.items()}),
        "elapsed_s": time.perf_counter() - t0,
    }


def alpha_profile(by_layer: dict[str, dict[str, dict[str, float]]]) -> dict:
    """The paper's two landmarks of the alpha x layer grid, per method: the best layer at alpha = 2
    (AlignSAE: 0.846, layer 6) and, on that layer, the mean success over alpha >= 50 (the collapse:
    AlignSAE about 0.09); None where the grid lacks those alphas."""
    out = {}
    for method in next(iter(by_layer.values()), {}):
        rows = {site: by[method] for site, by in by_layer.items() if method in by}
        at2 = {site: row["2.0"] for site, row in rows.items() if "2.0" in row}
        layer = max(at2, key=at2.get) if at2 else max(rows, key=lambda s: max(rows[s].values()))
        high = [v for a, v in rows[layer].items() if float(a) >= 50]
        out[method] = {"layer": layer, "alpha_2": at2.get(layer), "alpha_ge_50_mean": float(np.mean(high)) if high else None}
    return out


def _best_swap(success: dict[str, dict[str, float]]) -> tuple[str, str, float]:
    """(method, alpha, success) of the best cell of {method: {alpha: success}}."""
    return max(((m, a, v) for m, row in success.items() for a, v in row.items()), key=lambda t: t[2])


def _best_over_layers(by_layer: dict[str, dict[str, dict[str, float]]]) -> dict | None:
    """The best cell of {layer: {method: {alpha: success}}} as {swap_success, alpha, layer, method}."""
    if not by_layer:
        return None
    layer = max(by_layer, key=lambda s: _best_swap(by_layer[s])[2])
    method, alpha, value = _best_swap(by_layer[layer])
    return {"swap_success": value, "alpha": float(alpha), "layer": layer, "method": method}
