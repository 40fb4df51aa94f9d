"""`conca align`: AlignSAE (SPEC §4) on the biography world and on the default model.

Biography world: persons with six relations; a small GPT-2-style model is trained here from
scratch until it answers the in-distribution questions; its activations at the last prompt
token are read at every layer; per layer an AlignSAE is pre-trained (reconstruction) then
post-trained with the supervised terms, beside an unsupervised ReLU-L1 SAE on the same
activations. Measured: slot binding accuracy (dictionary-train / test-ID / test-OOD), diagonal
accuracy, concept fragmentation against the unsupervised SAE, and swap success over an alpha grid
x layer with hook-based patching at the studied layer, greedy answers scored by the released
matching rule.

Splits: the language model learns the in-distribution (ID) questions of every person; the
dictionary trains on the ID questions of `dict_train_fraction` of the persons; "test-ID" are the
ID questions of the other persons, "test-OOD" the out-of-distribution phrasings of every person.

Default model: an ontology shipped with conca (question types) is read at a few layers of the
embedded model, an AlignSAE is trained per layer, binding accuracy is measured on held-out
prompts, and swaps are shown on generated text.

Writes OUT/results.json, OUT/report.html and OUT/config.yaml; re-running on the same OUT reuses
the trained language model, activations and finished layers.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from conca.config import save_effective_config
from conca.experiments.align.biographies import lm_config, run_biographies, swap_trials
from conca.experiments.align.default_model import run_default_model
from conca.experiments.align.fitting import fit_alignsae, fit_baseline
from conca.experiments.align.options import validate
from conca.experiments.align.two_hop import run_two_hop
from conca.experiments.lab_options import AlignOptions  # declared there: no torch
from conca.fileio import atomic_write_json
from conca.report import paper_numbers as paper
from conca.report.align import comparison_sentences, write_report
from conca.runtime.threads import thread_limits

__all__ = ["AlignOptions", "validate", "run_align", "run_biographies", "run_default_model", "fit_alignsae",
           "fit_baseline", "lm_config", "swap_trials", "comparison_sentences", "write_report", "run_two_hop"]


def run_align(opts: AlignOptions, log=print) -> dict:
    validate(opts)  # the values given, even those --quick replaces
    opts = opts.sized()
    validate(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    save_effective_config(opts, out)
    t0 = time.perf_counter()
    say = (lambda m: log(f"[conca align {time.perf_counter() - t0:5.0f}s] {m}")) if opts.progress else (lambda m: None)
    results: dict = {"config": asdict(opts)}
    with thread_limits(opts.threads):
        if opts.biographies:
            bio = run_biographies(opts, out, say)
            best = bio["layers"][bio["best"]["layer"]]
            results.update({"slot_accuracy_ood": best["slot_accuracy_ood"], "diagonal_accuracy": best["diagonal_accuracy"],
                            "layer": bio["best"]["layer"], "swap_success": bio["best"], "biographies": bio,
                            "swap_alpha_profile": bio["alpha_profile"]})
        if opts.two_hop:
            results["two_hop"] = run_two_hop(opts, out, say)
        if opts.default_model:
            results["default_model"] = run_default_model(opts, out, say)
    results["paper"] = {"best_swap": paper.ALIGNSAE_BEST_SWAP, "binding": paper.ALIGNSAE_BINDING,
                        "swap": paper.ALIGNSAE_SWAP, "alphas": paper.ALIGNSAE_ALPHAS,
                        "base_model_accuracy": paper.ALIGNSAE_BASE_MODEL_ACCURACY,
                        "traditional_diagonal": paper.ALIGNSAE_TRADITIONAL_DIAGONAL,
                        "fragmentation": paper.ALIGNSAE_FRAGMENTATION,
                        "alpha_profile": {"layer": 6, "alpha_2": paper.ALIGNSAE_SWAP[6][paper.ALIGNSAE_ALPHAS.index(2)],
                                          "alpha_ge_50_mean": float(sum(v for a, v in zip(paper.ALIGNSAE_ALPHAS,
                                                                                          paper.ALIGNSAE_SWAP[6]) if a >= 50)
                                                                    / sum(a >= 50 for a in paper.ALIGNSAE_ALPHAS))}}
    results["comparison"] = comparison_sentences(results)
    results["elapsed_s"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", results)
    write_report(out / "report.html", results, opts)
    say(f"done in {results['elapsed_s']:.0f}s: {out / 'report.html'}")
    return results
