"""Is a question-type swap reachable on the default model? (issue 18, AlignSAE item 4)

`conca align`'s default-model section swaps one question type's slot for another's at the last prompt
token and reports whether the generated answer is of the target type. This script sweeps where and how
the swap is made -- layer x method (latent_decode with / without the error term, decoder_column) x
positions (last prompt token; last + generated tokens; the whole prompt) x alpha -- on held-out prompts
(two per source type, each swapped to the next type), and reports per cell the share of generations
that changed and the share that answer with a word of the target type (and of the source type).

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python scripts/align_question_swap_sweep.py OUT_DIR \
        [--model smollm2] [--layers 6,12,18,24] [--alphas 5,20,50,100]

Writes OUT_DIR/question_swap_sweep.json. The AlignSAEs are trained (or reused) in OUT_DIR/default_model/<site>,
as `conca align` does, with its default options.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from conca.concepts.ontology import load_ontology
from conca.experiments.align.fitting import _value_classes, fit_alignsae
from conca.experiments.lab_options import AlignOptions
from conca.interventions.swap import SwapTrial, generate_swapped
from conca.models.load import load_model
from conca.models.prompts import greedy_generate, last_token_activations
from conca.models.sites import Site

VARIANTS = (("latent_decode", False), ("latent_decode", True), ("decoder_column", True))
POSITIONS = ("last", "last,new", "prompt")


def _has_word(text: str, words: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", text.lower()) for w in words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", default="6,12,18,24")
    parser.add_argument("--alphas", default="5,20,50,100")
    parser.add_argument("--per-type", type=int, default=2, help="held-out prompts per source type")
    parser.add_argument("--new-tokens", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    opts = AlignOptions(out=str(out), model=args.model, progress=False)
    t0 = time.perf_counter()
    ontology = load_ontology(opts.ontology)
    loaded = load_model(opts.model)
    train_rows, heldout = ontology.split(opts.heldout_fraction, seed=opts.seed)
    examples = train_rows + heldout
    n_train = len(train_rows)
    concepts = ontology.concept_indices(examples)
    value_labels, values = _value_classes([e.answer for e in examples])
    sites = [Site("resid", int(v)) for v in args.layers.split(",")]
    acts = last_token_activations(loaded.model, loaded.tokenizer, [ontology.text(e, loaded.tokenizer) for e in examples],
                                  sites, batch_size=16)
    chosen = []
    for i, concept in enumerate(ontology.concepts):
        rows = [e for e in heldout if e.concept == concept][:args.per_type]
        chosen += [(e, ontology.concepts[(i + 1) % len(ontology.concepts)]) for e in rows]
    prompts = [ontology.text(e, loaded.tokenizer) for e, _ in chosen]
    answers = {c: sorted({e.answer.lower() for e in ontology.examples if e.concept == c and e.answer})
               for c in ontology.concepts}
    plain = greedy_generate(loaded.model, loaded.tokenizer, prompts, args.new_tokens, batch_size=len(prompts))
    base = {"source_type": float(np.mean([_has_word(t, answers[e.concept]) for t, (e, _) in zip(plain, chosen)])),
            "target_type": float(np.mean([_has_word(t, answers[tg]) for t, (_, tg) in zip(plain, chosen)]))}
    print(f"unedited: source-type answers {base['source_type']:.2f}, target-type {base['target_type']:.2f}")
    cells = []
    for site in sites:
        x = acts[site]
        sae, _, _ = fit_alignsae(x[:n_train], concepts[:n_train], values[:n_train], ontology.concepts, value_labels,
                                 opts, opts.model_n_free, opts.model_steps, out / "default_model" / str(site), str(site))
        trials = [SwapTrial(p, e.concept, t) for p, (e, t) in zip(prompts, chosen)]
        for method, error_term in VARIANTS:
            for positions in POSITIONS:
                for alpha in [float(a) for a in args.alphas.split(",")]:
                    texts = generate_swapped(loaded.model, loaded.tokenizer, site, sae, trials, alpha, method, error_term,
                                             positions, args.new_tokens, batch_size=len(trials))
                    cell = {"site": str(site), "method": method, "error_term": error_term, "positions": positions,
                            "alpha": alpha,
                            "changed": float(np.mean([a != b for a, b in zip(texts, plain)])),
                            "target_type": float(np.mean([_has_word(t, answers[tg]) for t, (_, tg) in zip(texts, chosen)])),
                            "source_type": float(np.mean([_has_word(t, answers[e.concept])
                                                          for t, (e, _) in zip(texts, chosen)])),
                            "examples": [{"prompt": e.prompt, "target": tg, "plain": p, "swapped": t}
                                         for (e, tg), p, t in list(zip(chosen, plain, texts))[:3]]}
                    cells.append(cell)
                    print(f"{site} {method:14s} err={error_term!s:5s} pos={positions:8s} alpha={alpha:5g}: changed "
                          f"{cell['changed']:.2f}, target type {cell['target_type']:.2f}, source type "
                          f"{cell['source_type']:.2f}", flush=True)
    best = max(cells, key=lambda c: (c["target_type"], -c["changed"]))
    result = {"model": loaded.name, "n_prompts": len(prompts), "unedited": base, "cells": cells, "best": best,
              "elapsed_s": time.perf_counter() - t0}
    (out / "question_swap_sweep.json").write_text(json.dumps(result, indent=1))
    print(f"best: {best['site']} {best['method']} err={best['error_term']} pos={best['positions']} "
          f"alpha={best['alpha']:g}: target type {best['target_type']:.2f} (changed {best['changed']:.2f}); "
          f"{result['elapsed_s']:.0f}s")


if __name__ == "__main__":
    main()
