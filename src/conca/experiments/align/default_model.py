"""`conca align` on the default model: a shipped ontology's concepts bound at a few layers, binding
accuracy on held-out prompts, and swaps shown on generated text."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from conca.dictionaries.align import AlignSAE
from conca.experiments.align.fitting import _binding_metrics, _value_classes, fit_alignsae
from conca.experiments.align.options import _floats, _layers
from conca.experiments.lab_options import AlignOptions
from conca.interventions.swap import SwapTrial, generate_swapped
from conca.models.prompts import greedy_generate, last_token_activations
from conca.models.sites import Site
from conca.training.trainer import evaluate_batch


def run_default_model(opts: AlignOptions, out: Path, say) -> dict:
    from conca.concepts.ontology import load_ontology
    from conca.models.load import load_model

    t0 = time.perf_counter()
    ontology = load_ontology(opts.ontology)
    say(f"default model: loading {opts.model}")
    loaded = load_model(opts.model, allow_download=opts.allow_download)
    layers = _layers(opts.model_layers, loaded.n_layers, "model_layers")
    train_rows, heldout_rows = ontology.split(opts.heldout_fraction, seed=opts.seed)
    examples = train_rows + heldout_rows
    prompts = [ontology.text(e, loaded.tokenizer) for e in examples]
    n_train = len(train_rows)
    concepts = ontology.concept_indices(examples)
    value_labels, values = _value_classes([e.answer for e in examples])
    sites = [Site("resid", layer) for layer in layers]
    acts = last_token_activations(loaded.model, loaded.tokenizer, prompts, sites, batch_size=16, progress=opts.progress)
    answers = greedy_generate(loaded.model, loaded.tokenizer, [ontology.text(e, loaded.tokenizer) for e in heldout_rows],
                              opts.model_new_tokens, batch_size=16)
    model_accuracy = float(np.mean([bool(e.answer) and e.answer.lower() in a.lower() for a, e in zip(answers, heldout_rows)]))
    per_layer, saes = {}, {}
    for site in sites:
        x = acts[site]
        say(f"default model {site}: AlignSAE on {n_train} prompts ({len(ontology.concepts)} concepts)")
        sae, _, _ = fit_alignsae(x[:n_train], concepts[:n_train], values[:n_train], ontology.concepts, value_labels, opts,
                              opts.model_n_free, opts.model_steps, out / "default_model" / str(site), str(site))
        splits = {"train": (x[:n_train], concepts[:n_train]), "heldout": (x[n_train:], concepts[n_train:])}
        per_layer[str(site)] = _binding_metrics(sae, splits, len(ontology.concepts), "heldout")
        per_layer[str(site)]["fvu_heldout"] = evaluate_batch(sae, x[n_train:])["fvu"]
        saes[str(site)] = sae
    best_site = max(per_layer, key=lambda s: (per_layer[s]["slot_accuracy_heldout"], -int(s.split(".")[1])))
    say(f"default model: best binding at {best_site} "
        f"(held-out slot accuracy {per_layer[best_site]['slot_accuracy_heldout']:.3f}); generating swaps")
    examples_out = _swap_examples(loaded, ontology, heldout_rows, saes[best_site], best_site, opts)
    return {"model": loaded.name, "ontology": ontology.name, "concepts": ontology.concepts,
            "n_train": n_train, "n_heldout": len(heldout_rows), "model_answer_accuracy_heldout": model_accuracy,
            "layers": per_layer, "best_layer": best_site, "swap_examples": examples_out,
            "elapsed_s": time.perf_counter() - t0}


def _swap_examples(loaded, ontology, heldout_rows, sae: AlignSAE, site: str, opts: AlignOptions) -> list[dict]:
    """One held-out prompt per source concept, swapped to the next concept: baseline vs swapped text."""
    chosen = []
    for i, concept in enumerate(ontology.concepts[:opts.swap_examples]):
        example = next(e for e in heldout_rows if e.concept == concept)
        target = ontology.concepts[(i + 1) % len(ontology.concepts)]
        chosen.append((example, target))
    prompts = [ontology.text(e, loaded.tokenizer) for e, _ in chosen]
    baseline = greedy_generate(loaded.model, loaded.tokenizer, prompts, opts.model_new_tokens, batch_size=1)
    target_answers = {c: sorted({e.answer.lower() for e in ontology.examples if e.concept == c and e.answer})
                      for c in ontology.concepts}
    rows = []
    for alpha in _floats(opts.model_alphas, "model_alphas"):
        trials = [SwapTrial(p, e.concept, t) for p, (e, t) in zip(prompts, chosen)]
        swapped = generate_swapped(loaded.model, loaded.tokenizer, site, sae, trials, alpha, opts.model_swap_method,
                                   opts.swap_error_term, opts.swap_positions, opts.model_new_tokens, batch_size=1)
        for (example, target), base, text in zip(chosen, baseline, swapped):
            rows.append({"prompt": example.prompt, "source": example.concept, "target": target, "alpha": alpha,
                         "baseline": base, "swapped": text, "changed": text != base,
                         "target_type_answer": any(re.search(rf"\b{re.escape(a)}\b", text.lower())
                                                   for a in target_answers[target])})
    return rows
