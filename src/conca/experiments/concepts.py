"""`conca concepts`: how well trained dictionaries recover supervised concepts (MPC, coverage,
A_s W_s, stability, sufficiency) on counterfactual pairs at one site."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from conca.concepts import BUILTIN, load_concepts
from conca.config import option, save_effective_config
from conca.dictionaries.base import load_dictionary
from conca.dictionaries.provenance import check_model_width, read_recorded, resolve_common_target
from conca.errors import ConfigError
from conca.evaluation.concept_bench import build_bench, model_side, score_dictionary
from conca.fileio import atomic_write_json
from conca.models.load import LoadedModel, load_model
from conca.report.concepts import write_concepts_report


@dataclass
class ConceptsOptions:
    dictionaries: str = option("", "comma-separated dictionary folders to score (trained on --site)")
    out: str = option("concepts_out", "output directory (report.html, results.json)", path="out_dir")
    model: str | None = option(None, "model: 'smollm2' (embedded default), a .gguf file, a local HF directory or a cached "
                                     "HF id (default: the one the dictionaries were trained on, else smollm2)")
    site: str | None = option(None, "site the dictionaries read (default: the one they were trained on, else 'final', "
                                    "the papers' final hidden state after the final norm)")
    pairs: str = option(BUILTIN, "concept sets: 'builtin' (conca's own), a folder of A<TAB>B files, or a file; comma-separate several")
    concepts: str = option("", "only these concept names (comma-separated; default all)")
    contexts: str = option("", "paired-context JSONL files (comma-separated): in-context concepts instead of word pairs")
    max_contexts: int = option(20, "paired contexts: at most this many contexts per side per record", min=1)
    prepend_bos: bool = option(True, "put BOS before each word; off = the word alone at position 0 as in the papers "
                                     "(SmolLM2 adds no BOS of its own and treats position 0 as an attention sink)")
    probe_c: float = option(1.0, "inverse L2 strength of the reference probes (the papers: sklearn default 1.0)", gt=0)
    align_c: float = option(1e-4, "inverse L2 strength of the A_s W_s probes (I-Predict: 1e-4)", gt=0)
    transform: str = option("exp", "latent transform before Pearson: 'exp' (the papers) or 'identity'",
                            choices=("exp", "identity"))
    threshold: float = option(0.5, "coverage threshold on the matched correlation", min=-1, max=1)
    seeds: int = option(3, "seeds for the A_s W_s hold-out splits and the sufficiency splits", min=1)
    rank_k: int = option(32, "latents per pair in the rank-based significance (ConCA Alg. 2)", min=1)
    batch_size: int = option(64, "words per forward pass", min=1)
    text: str = option("pydoc", "held-out text for the splice-to-logits agreement")
    agreement_tokens: int = option(1024, "held-out tokens on which each dictionary is spliced in at --site and the "
                                         "next-token distributions compared with the clean model's (0: skip)", min=0)
    progress: bool = option(True, "show progress bars")
    allow_download: bool = option(False, "download a hub model or hf: dataset when not in the local cache (off: offline, no network request)")


def resolve_concepts_options(opts: ConceptsOptions) -> ConceptsOptions:
    """`opts` with the model and site the dictionaries record (or checked against them), before any
    model is loaded; notes on fallbacks go to stderr."""
    paths = [p.strip() for p in opts.dictionaries.split(",") if p.strip()]
    if not paths:
        raise ConfigError("concepts needs --dictionaries DIR[,DIR...]")
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
    bench = build_bench(loaded, concepts, opts.site, opts.prepend_bos, opts.probe_c, opts.batch_size, opts.progress)
    results = {"model": loaded.name, "site": opts.site, "concepts": bench.names,
               "dictionaries": {name: score_dictionary(d, bench, opts.transform, opts.threshold, opts.rank_k)
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
        log(f"[conca concepts] {name}: MPC {r['mpc']:.3f}, coverage@{opts.threshold} {r['coverage']:.2f}")
    return results


__all__ = ["ConceptsOptions", "run_concepts", "resolve_concepts_options"]
