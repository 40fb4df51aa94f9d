"""The report of `conca reproduce concepts`: ConCA and the SAEs beside the papers' tables, the
ordering claims, the ConCA ablation grid and the per-concept scores."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml

from conca.report import paper_numbers as paper
from conca.report.concepts import FLOORS_TEXT, HELDOUT_TEXT, floor_rows, model_side_section, mpc_bar_figure
from conca.report.html import Report

LABELS = {"topk": "TopK", "batchtopk": "BatchTopK", "p_anneal": "P-anneal", "structured": "Structured SAE",
          "conca_layernorm_softplus": "ConCA LayerNorm", "conca_groupnorm_softplus": "ConCA GroupNorm(4)",
          "conca_batchnorm_softplus": "ConCA BatchNorm"}


DIRECTIONS_TEXT = (
    "Direction recovery: per concept, the largest |cos| between the concept's mean-difference direction (mean "
    "representation of side B minus side A, the A_s row) and any decoder direction, averaged over concepts. MPC asks "
    "whether a latent's activation tracks the concept across its words; this asks whether some latent writes along "
    "the concept's direction, which a sparse latent can do while firing on few of the words.")


def _fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _paper_mpc(name: str) -> dict[str, str]:
    t5 = paper.CONCA_TABLE5.get(name)
    t3 = paper.CONCA_TABLE3.get(name)
    return {"paper MPC (ConCA T5)": _fmt(t5[0], t5[1], 4) if t5 else (_fmt(t3[0], t3[1], 4) + " (T3)" if t3 else "—"),
            "paper MSE (ConCA T5)": _fmt(t5[2], t5[3], 2) if t5 else (_fmt(t3[2], t3[3], 2) + " (T3)" if t3 else "—"),
            "paper MPC (I-Predict T2)": _fmt(paper.IPREDICT_AVERAGE[name]) if name in paper.IPREDICT_AVERAGE else "—",
            "paper coverage (I-Predict T2)": _fmt(paper.IPREDICT_COVERAGE[name]) if name in paper.IPREDICT_COVERAGE else "—"}


def _heatmap(ablation: dict[str, dict], key: str, title: str):
    """The ablation grid: a row per normalisation, a column per g (in the order the runs were made)."""
    import numpy as np

    from conca.report.plots import annotated_heatmap  # imports matplotlib: only when a report is drawn

    rows = list(dict.fromkeys(name.split("/")[0] for name in ablation))
    cols = list(dict.fromkeys(name.split("/")[1] for name in ablation))
    grid = np.array([[ablation[f"{r}/{g}"][key] for g in cols] for r in rows])
    return annotated_heatmap(grid, rows, cols, title, figsize=(4.8, 4.6), cmap="viridis" if key == "mpc" else "viridis_r",
                             digits=3, fontsize=8)


def _iv(entry: dict) -> str:
    return f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def chance_sentences(results: dict) -> list[str]:
    """The lead: per method, held-out MPC and its lift over the untrained floor (else the permutation one)."""
    lines = []
    for name, m in results["methods"].items():
        if "mpc_heldout" not in m:
            continue
        text = (f"{LABELS.get(name, name)}: held-out MPC {m['mpc_heldout']:.3f} ± {m['mpc_heldout_std']:.3f} "
                f"(in-sample, the papers' metric: {m['mpc']:.3f})")
        for kind in ("untrained", "permutation"):
            up = m.get("lift", {}).get(kind, {}).get("mpc_heldout")
            if up:
                verdict = "beyond chance" if up["low"] > 0 else ("below chance" if up["high"] < 0 else "within chance")
                text += (f"; {kind} floor {m['floors'][kind]['mpc_heldout']['mean']:.3f}, lift {_iv(up)} "
                         f"({verdict})")
        up = m.get("lift", {}).get("untrained", {}).get("direction_recovery")
        if up:
            verdict = "beyond chance" if up["low"] > 0 else ("below chance" if up["high"] < 0 else "within chance")
            text += (f". Decoder direction recovery {m['direction_recovery']:.3f} vs untrained "
                     f"{m['floors']['untrained']['direction_recovery']['mean']:.3f}, lift {_iv(up)} ({verdict})")
        lines.append(text + ".")
    return lines


def _verdict(claim: dict) -> str:
    return claim.get("verdict", "held" if claim["clear"] else "within noise" if claim["held"] else "failed")


def summary_sentences(results: dict) -> list[str]:
    lines = []
    base = results.get("baselines") or {}
    beaten = [n for n in base if n.removeprefix("untrained ") in results["methods"]
              and results["methods"][n.removeprefix("untrained ")]["mpc"] <= base[n]["mpc"]]
    if beaten:
        lines.append("Caution: " + "; ".join(
            f"{LABELS.get(n.removeprefix('untrained '), n)} trained scores MPC "
            f"{results['methods'][n.removeprefix('untrained ')]['mpc']:.3f}, no better than the same dictionary untrained "
            f"({base[n]['mpc']:.3f})" for n in beaten) + ". At this scale MPC is dominated by what random projections "
        "matched to concepts give by chance; differences between methods reflect their architectures (dense linear "
        "latents vs sparse ones) more than what training found.")
    claims = results["orderings"]
    by_verdict = {v: [c for c in claims if _verdict(c) == v] for v in ("held", "within noise", "failed")}
    lines.append(f"Of the papers' ordering claims we check ({len(claims)}, MPC claims judged on held-out and on in-sample "
                 f"MPC), {len(by_verdict['held'])} held by more than the seed-to-seed spread, "
                 f"{len(by_verdict['within noise'])} are within noise and {len(by_verdict['failed'])} failed.")
    for verdict, group in by_verdict.items():
        if group:
            lines.append(f"{verdict.capitalize()}: " + "; ".join(f"{c['claim']} ({c['ours']})" for c in group) + ".")
    return lines


def _tasks_section(report: Report, tasks: dict) -> None:
    report.heading("Task metrics: SAEBench sparse probing")
    llm = tasks.get("llm", {})
    report.paragraph(
        f"Tasks: {', '.join(tasks['tasks'])}. {tasks['definition']}. Trained: mean ± std over seeds; lift = trained - "
        "untrained with the 95% percentile interval of every (seed, draw) difference. The probe on the raw activations "
        "(all dimensions): " + ", ".join(f"top-{k} {llm[f'llm_top_{k}_test_accuracy']:.3f}" for k in tasks["k_values"]
                                          if f"llm_top_{k}_test_accuracy" in llm)
        + (f", all {llm['llm_test_accuracy']:.3f}" if "llm_test_accuracy" in llm else "") + ".")
    rows = []
    for name, m in tasks["methods"].items():
        row = {"method": LABELS.get(name, name)}
        for k in tasks["k_values"]:
            e = m[f"top_{k}"]
            row[f"top-{k} trained"] = _fmt(e["trained"], e["trained_std"])
            row[f"top-{k} untrained"] = _fmt(e["untrained"])
            row[f"top-{k} lift"] = _iv(e["lift"])
        rows.append(row)
    report.table(rows)


def write_report(path: Path, results: dict, opts) -> Path:
    """`opts`: the run's ReproduceConceptsOptions."""
    methods = results["methods"]
    report = Report("conca reproduce concepts",
                    subtitle=f"ConCA vs SAEs on {Path(results['model']).name}, site {results['site']}, "
                             f"{len(results['concepts'])} concepts")
    report.heading("Summary")
    report.paragraph(
        f"Every method has {results['n_latents']} latents (d = {results['d_model']}) and was trained for {opts.steps} steps "
        f"of {opts.batch_size} tokens on the same batches, {opts.seeds} seeds each; the papers used Pythia-70M, "
        f"32,768 latents and 20,000 steps of 10,000 tokens. Our scale is far smaller, so absolute numbers are not "
        f"comparable; the orderings are what we test.")
    chance = chance_sentences(results)
    if chance:
        report.paragraph(f"Held-out concept recovery ({results.get('folds')} folds by pair) against chance floors "
                         f"({results.get('floor_draws')} draws each; lift with its 95% percentile interval):")
        for line in chance:
            report.paragraph(line)
    for line in summary_sentences(results):
        report.paragraph(line)
    report.heading("Main comparison (ConCA Table 5, I-Predict Table 2)")
    rows = []
    for name, m in methods.items():
        d = m.get("downstream", {})
        rows.append({"method": LABELS.get(name, name),
                     **({"held-out MPC": _fmt(m["mpc_heldout"], m["mpc_heldout_std"]),
                         "held-out coverage@0.5": _fmt(m["coverage_heldout"], m["coverage_heldout_std"])}
                        if "mpc_heldout" in m else {}),
                     "MPC (in-sample)": _fmt(m["mpc"], m["mpc_std"]),
                     "coverage@0.5": _fmt(m["coverage"], m["coverage_std"]),
                     **({"direction recovery": _fmt(m["direction_recovery"], m["direction_recovery_std"])}
                        if "direction_recovery" in m else {}),
                     "MSE (held-out)": _fmt(m["mse"], m["mse_std"]),
                     "FVU": _fmt(m["fvu"]), "L0": f"{m['l0']:.1f}", "rank signif.": _fmt(m["rank_significance"]),
                     **_paper_mpc(name),
                     "argmax agree": _fmt(d["argmax_agreement"]) if d else "—",
                     "top-10 overlap": _fmt(d["top10_overlap"]) if d else "—",
                     "JS": _fmt(d["js_divergence"], digits=4) if d else "—"})
    for name, b in results.get("baselines", {}).items():
        rows.append({"method": name + " (random init)",
                     **({"held-out MPC": _fmt(b["mpc_heldout"]), "held-out coverage@0.5": _fmt(b["coverage_heldout"])}
                        if "mpc_heldout" in b else {}),
                     "MPC (in-sample)": _fmt(b["mpc"]), "coverage@0.5": _fmt(b["coverage"]),
                     "MSE (held-out)": _fmt(b["mse"]), "rank signif.": _fmt(b["rank_significance"])})
    report.table(rows)
    report.paragraph(
        HELDOUT_TEXT + " " + DIRECTIONS_TEXT + " "
        "MPC (in-sample): mean over concepts of the Pearson correlation between a per-concept probe's log-odds and exp(latent), with a "
        "Hungarian matching of concepts to distinct latents (SPEC §1.1). MSE: squared error summed over dimensions, averaged "
        "over held-out tokens, on this model's scale (the papers' MSE is on Pythia-70M's scale, so compare orderings). "
        "Rank significance (ConCA Alg. 2): lower = more stable latents. The random-init rows score untrained "
        "dictionaries of the same shape: the floor that matching many latents to few concepts gives by chance. Agreement columns (ConCA App. O): the seed-0 "
        "dictionary spliced in at the site, next-token distributions compared with the clean model's.")
    paper_mpc = {**{k: v[0] for k, v in paper.CONCA_TABLE5.items()},
                 **{k: v for k, v in paper.IPREDICT_AVERAGE.items() if k not in paper.CONCA_TABLE5},
                 **{k: v[0] for k, v in paper.CONCA_TABLE3.items() if k.startswith("exp")}}
    report.figure(mpc_bar_figure(methods, paper_mpc, "MPC: ours (mean ± std over seeds) vs the papers"))
    if results.get("stability"):
        report.heading("Stability across seeds")
        report.paragraph(
            "Each method trained from several seeds; decoder directions matched one-to-one (Hungarian on |cos|): the mean "
            "matched |cos| and the share above 0.7; and the activation MCC on held-out tokens (Pearson r of the latents, "
            "matched by Hungarian on |r|). The untrained rows are the same dictionaries at their initialisation: the floor "
            "each number has to clear (random directions of real activations already correlate). 'chance' is the matched "
            "|cos| of random Gaussian directions of the same shapes.")
        report.table([{"method": LABELS.get(row["family"], row["family"]) if not row["family"].startswith("untrained ")
                       else "untrained " + LABELS.get(row["family"][10:], row["family"][10:]),
                       "seeds": row["seeds"], "matched |cos|": row["matched_cosine"], "share > 0.7": row["share_above"],
                       "chance |cos|": row["chance_matched_cosine"], "MCC": row["mcc"], "MCC (alive)": row["mcc_alive"]}
                      for row in results["stability"]["table"]])
    if results.get("tasks"):
        _tasks_section(report, results["tasks"])
    floors = [row for name, m in methods.items() for row in floor_rows(LABELS.get(name, name), m)]
    if floors:
        report.heading("Chance floors and lift")
        report.paragraph(FLOORS_TEXT + " Here the permutation floor is drawn for each seed's trained dictionary and "
                         "pooled over seeds (its lift pairs each seed with its own draws); the untrained floor is drawn "
                         "once per method and its lift compares every seed with every draw.")
        report.table(floors)
    report.heading("Ordering claims")
    report.paragraph("Each claim judged on our means: held (by more than the seeds' combined standard deviation), "
                     "failed (the other way by more than that) or within noise. An MPC claim is judged on held-out MPC "
                     "first, then on the papers' in-sample MPC.")
    report.table([{"claim": c["claim"], "source": c["source"], "ours": c["ours"],
                   "verdict": _verdict(c)}
                  for c in results["orderings"]])
    if results.get("ablation"):
        report.heading("ConCA ablation: 7 normalisations x 3 g (ConCA Fig. 2)")
        report.paragraph(f"{opts.ablation_seeds} seed(s), {opts.ablation_steps} steps each, alpha = {opts.alpha:g}. The paper "
                         f"finds MPC 0.72-0.74 for every non-BatchNorm configuration on Pythia-70M, LayerNorm with the lowest "
                         "MSE, and lower MSE with fewer GroupNorm groups.")
        report.figure(_heatmap(results["ablation"], "mpc", "MPC"), caption="MPC per configuration (higher is better).")
        report.figure(_heatmap(results["ablation"], "mse", "MSE (held-out)"), caption="MSE per configuration (lower is better).")
    per_names = results["concepts"]
    ip = paper.IPREDICT_TABLE2
    if any(c in ip for c in per_names):
        report.heading("Per concept, beside I-Predict Table 2")
        cols = [m for m in ("topk", "batchtopk", "p_anneal", "structured") if m in methods]
        report.table([{"concept": c, **{f"{LABELS[m]} (ours)": _fmt(methods[m]["per_concept"][c]) for m in cols},
                       **{f"{LABELS[m]} (paper)": _fmt(ip[c][paper.IPREDICT_METHODS.index(m)]) for m in cols if c in ip},
                       **{f"{LABELS[m]} (ours)": _fmt(methods[m]["per_concept"][c]) for m in methods
                          if m.startswith("conca_")}} for c in per_names])
    else:
        report.heading("Per concept")
        report.table([{"concept": c, **{LABELS.get(m, m): _fmt(methods[m]["per_concept"][c]) for m in methods}}
                      for c in per_names])
    if any("per_concept_heldout" in m for m in methods.values()):
        report.heading("Per concept, held out")
        report.table([{"concept": c, **{LABELS.get(m, m): _fmt(methods[m]["per_concept_heldout"][c]) for m in methods
                                        if "per_concept_heldout" in methods[m]}} for c in per_names])
    model_side_section(report, results)
    report.heading("Configuration")
    report.paragraph(f"Total wall time {results['elapsed_s'] / 60:.1f} min; training throughput "
                     f"{results['tokens_per_s']:.0f} tokens/s for all {len(methods)} dictionaries together.")
    report.code(yaml.safe_dump(asdict(opts), sort_keys=False))
    return report.write(path)
