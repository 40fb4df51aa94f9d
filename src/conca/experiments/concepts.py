"""`conca concepts`: how well trained dictionaries recover supervised concepts (MPC, coverage,
A_s W_s, stability, sufficiency) on counterfactual pairs at one site."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from conca.concepts import load_concepts
from conca.config import save_effective_config
from conca.dictionaries.base import load_dictionary
from conca.dictionaries.provenance import check_model_width, read_recorded, resolve_common_target
from conca.errors import ConfigError
from conca.evaluation.concept_bench import build_bench, model_side, score_dictionary
from conca.evaluation.floors import check_counts
from conca.experiments.options import ConceptsOptions  # noqa: F401  (declared there: no torch)
from conca.fileio import atomic_write_json
from conca.models.load import LoadedModel, load_model
from conca.report.concepts import write_concepts_report


def resolve_concepts_options(opts: ConceptsOptions) -> ConceptsOptions:
    """`opts` with the model and site the dictionaries record (or checked against them), before any
    model is loaded; notes on fallbacks go to stderr."""
    paths = [p.strip() for p in opts.dictionaries.split(",") if p.strip()]
    if not paths:
        raise ConfigError("concepts needs --dictionaries DIR[,DIR...]")
    check_counts(opts.folds, opts.floor_draws)
    target = resolve_common_target([read_recorded(p) for p in paths], opts.site, opts.model)
    for note in target.notes:
        print(f"conca concepts: note: {note}", file=sys.stderr)
    return replace(opts, site=target.site, model=target.model)


def run_concepts(opts: ConceptsOptions, loaded: LoadedModel | None = None, log=print) -> dict:
    opts = resolve_concepts_options(opts)
    paths = [p.strip() for p in opts.dictionaries.split(",") if p.strip()]
    dictionaries = {Path(p).name if Path(p).name != "dictionary" else Path(p).parent.name: load_dictionary(p) for p in paths}
    concepts = load_concepts(opts.pairs, opts.contexts, opts.concepts, opts.max_contexts)
    out = Path(opts.out)
    t0 = time.perf_counter()
    if opts.agreement_tokens > 0:
        from conca.text.splits import check_text

        check_text(opts.text, allow_download=opts.allow_download)
    loaded = loaded or load_model(opts.model, allow_download=opts.allow_download)
    for path in paths:
        check_model_width(read_recorded(path), loaded.d_model, loaded.name)
    out.mkdir(parents=True, exist_ok=True)  # once the inputs and the model are known to be good
    save_effective_config(opts, out)
    log(f"[conca concepts] {len(concepts)} concepts at {opts.site}; representing and probing ...")
    bench = build_bench(loaded, concepts, opts.site, opts.prepend_bos, opts.probe_c, opts.batch_size, opts.progress,
                        folds=opts.folds)
    results = {"model": loaded.name, "site": opts.site, "concepts": bench.names,
               "dictionaries": {name: score_dictionary(d, bench, opts.transform, opts.threshold, opts.rank_k,
                                                       floor_draws=opts.floor_draws)
                                for name, d in dictionaries.items()},
               **model_side(bench, opts.align_c, opts.seeds), "config": asdict(opts)}
    if opts.agreement_tokens > 0:
        from conca.evaluation.downstream import downstream_metrics_many
        from conca.text.splits import contexts_for

        heldout = contexts_for(loaded.tokenizer, opts.text, "heldout", opts.agreement_tokens, 128,
                               allow_download=opts.allow_download)
        spliced = downstream_metrics_many(loaded.model, dictionaries, opts.site, heldout)
        for name, metrics in spliced.items():
            results["dictionaries"][name]["agreement"] = {k: metrics[k] for k in (
                "argmax_agreement", "top10_overlap", "js_divergence", "ce_loss_recovered", "kl_div")}
    results["elapsed_s"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", results)
    write_concepts_report(out / "report.html", results, opts)
    for name, r in results["dictionaries"].items():
        held = f"held-out MPC {r['mpc_heldout']:.3f} ({opts.folds} folds), " if "mpc_heldout" in r else ""
        lift = r.get("lift", {}).get("untrained", {}).get("mpc_heldout" if held else "mpc")
        lift = f", lift over untrained {lift['mean']:+.3f} [{lift['low']:+.3f}, {lift['high']:+.3f}]" if lift else ""
        log(f"[conca concepts] {name}: {held}MPC (in-sample, the papers') {r['mpc']:.3f}, "
            f"coverage@{opts.threshold} {r['coverage']:.2f}{lift}")
    return results


__all__ = ["ConceptsOptions", "run_concepts", "resolve_concepts_options"]
