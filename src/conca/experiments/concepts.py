"""`conca concepts`: how well trained dictionaries recover supervised concepts (MPC, coverage,
A_s W_s, stability, sufficiency) on counterfactual pairs at one site."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from conca.activations.store import atomic_write_json
from conca.concepts import BUILTIN, load_concept_sets, load_paired_contexts
from conca.config import save_effective_config
from conca.dictionaries.base import Dictionary, load_dictionary
from conca.dictionaries.provenance import check_model_width, read_recorded, resolve_common_target
from conca.errors import ConfigError
from conca.evaluation.concepts import (
    ConceptData,
    ProbeResult,
    concept_matching,
    concept_representations,
    direction_alignment,
    fit_probes,
    rank_significance,
    reconstruction_mse,
    sufficiency,
)
from conca.experiments.options import ConceptsOptions  # noqa: F401  (declared there: no torch)
from conca.models.load import LoadedModel, load_model
from conca.report.html import Report


def load_concepts(pairs: str, contexts: str = "", names: str = "", max_contexts: int = 20) -> list:
    """Word-pair sets (builtin, folders, files) or, with `contexts`, paired-context files."""
    if contexts:
        sets = [load_paired_contexts(p.strip(), max_contexts) for p in contexts.split(",") if p.strip()]
    else:
        sources = [p.strip() for p in pairs.split(",") if p.strip()] or [BUILTIN]
        sets = load_concept_sets(sources if len(sources) > 1 else sources[0])
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        known = {s.name for s in sets}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise ConfigError(f"unknown concepts {missing}; available: {', '.join(sorted(known))}")
        sets = [s for s in sets if s.name in wanted]
    return sets


@dataclass
class ConceptBench:
    """Everything model-side that scoring a dictionary needs, computed once."""

    data: list[ConceptData]
    probes: list[ProbeResult]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.data]


def build_bench(loaded: LoadedModel, concepts: list, site: str, prepend_bos: bool = True, probe_c: float = 1.0,
                batch_size: int = 64, progress: bool = False) -> ConceptBench:
    data = concept_representations(loaded, concepts, site, batch_size=batch_size, prepend_bos=prepend_bos, progress=progress)
    return ConceptBench(data, fit_probes(data, C=probe_c))


def score_dictionary(dictionary: Dictionary, bench: ConceptBench, transform: str = "exp", threshold: float = 0.5,
                     rank_k: int = 32) -> dict:
    """MPC, coverage, per-concept matches, MSE on the concept words, and Alg. 2 stability."""
    import torch

    dictionary.check_input(bench.data[0].x_a)
    match = concept_matching(dictionary, bench.data, bench.probes, transform, threshold)
    words = torch.cat([c.x for c in bench.data])
    return {"mpc": match.mpc, "coverage": match.coverage, "per_concept": match.per_concept(),
            "mse_concept_words": reconstruction_mse(dictionary, words),
            "rank_significance": rank_significance(dictionary, bench.data, k=rank_k)}


def model_side(bench: ConceptBench, align_c: float, seeds: int) -> dict:
    """Dictionary-free diagnostics: probe accuracy, A_s W_s, informational sufficiency."""
    alignment = direction_alignment(bench.data, C=align_c, seeds=seeds)
    return {"probe_accuracy": {p.name: p.accuracy for p in bench.probes},
            "alignment": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in alignment.items()},
            "sufficiency": sufficiency(bench.data, seeds=seeds)}


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
        from conca.experiments.pipeline import check_text

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
        from conca.experiments.pipeline import contexts_for

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


# --- report pieces shared with `conca reproduce concepts` ---------------------------------
def alignment_figure(alignment: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(alignment["matrix"])
    names = alignment["names"]
    size = max(4.0, 0.28 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(matrix, cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("probe direction W_s (column)")
    ax.set_ylabel("mean-difference direction A_s (row)")
    ax.set_title(f"A_s W_s: diagonal {alignment['diagonal_mean']:.2f}, |off-diagonal| {alignment['off_diagonal_mean_abs']:.2f}, "
                 f"||A W - P_S||_F = {alignment['fro_to_projector']:.2f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def model_side_section(report: Report, results: dict) -> None:
    acc = results["probe_accuracy"]
    suff = results["sufficiency"]
    report.heading("The supervised reference")
    report.paragraph(
        f"Per-concept logistic probes (in-sample, as in the papers) separate the two sides with mean accuracy "
        f"{np.mean(list(acc.values())):.3f}; on held-out 30% splits their accuracy is "
        f"{np.nanmean([r['heldout_accuracy'] for r in suff]):.3f} and the entropy of their posteriors "
        f"{np.nanmean([r['entropy_bits'] for r in suff]):.3f} bits (ConCA App. L reports 0.1-0.3 bits for Pythia-70M): "
        "low entropy means the representation pins each concept down, the theorem's informational-sufficiency assumption.")
    report.figure(alignment_figure(results["alignment"]),
                  caption="I-Predict Fig. 3: unit mean-difference directions (rows) against unit probe directions "
                          "(columns) trained on the other half of the pairs; the theory predicts a near-identity pattern.")
    report.table([{"concept": r["concept"], "probe accuracy (in-sample)": acc[r["concept"]],
                   "held-out accuracy": r["heldout_accuracy"], "posterior entropy (bits)": r["entropy_bits"]} for r in suff])


def write_concepts_report(path: Path, results: dict, opts: ConceptsOptions) -> Path:
    report = Report("conca concepts", subtitle=f"{len(results['concepts'])} concepts at site {results['site']} of "
                                              f"{Path(results['model']).name}")
    rows = [{"dictionary": n, "MPC": r["mpc"], f"coverage@{opts.threshold}": r["coverage"],
             "MSE (concept words)": r["mse_concept_words"], "rank significance": r["rank_significance"],
             **{k.replace("_", " "): v for k, v in r.get("agreement", {}).items()}}
            for n, r in results["dictionaries"].items()]
    report.heading("Concept recovery")
    report.paragraph("MPC: mean over concepts of the Pearson correlation between the probe's log-odds and exp(latent), "
                     "each concept matched to a distinct latent (Hungarian). Rank significance (ConCA Alg. 2): lower is "
                     "more stable. Agreement (ConCA App. O): the dictionary spliced in at the site on held-out text; "
                     "argmax match and top-10 overlap with the clean next-token distribution, Jensen-Shannon divergence (nats).")
    report.table(rows)
    per = {n: {p["concept"]: p["correlation"] for p in r["per_concept"]} for n, r in results["dictionaries"].items()}
    report.table([{"concept": c, **{n: per[n][c] for n in per}} for c in results["concepts"]])
    model_side_section(report, results)
    report.heading("Configuration")
    report.code(yaml.safe_dump(asdict(opts), sort_keys=False))
    return report.write(path)


def mpc_bar_figure(methods: dict[str, dict], paper: dict[str, float] | None = None, title: str = ""):
    """Our MPC (mean +- std over seeds) per method, beside the paper's where it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names)), 4))
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [methods[n]["mpc"] for n in names], 0.4, yerr=[methods[n].get("mpc_std", 0) for n in names],
           label="ours", color="#3b6ea8", capsize=3)
    if paper:
        ax.bar(xs + 0.2, [paper.get(n, np.nan) for n in names], 0.4, label="paper (Pythia-70M)", color="#c8884a")
    ax.set_xticks(xs, [n.replace("conca_", "ConCA ").replace("_softplus", "") for n in names], rotation=30, ha="right")
    ax.set_ylabel("MPC")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


__all__ = ["ConceptsOptions", "run_concepts", "resolve_concepts_options", "build_bench", "score_dictionary", "model_side", "load_concepts",
           "mpc_bar_figure", "alignment_figure", "model_side_section"]
