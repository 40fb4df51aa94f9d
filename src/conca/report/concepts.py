"""Report pieces of the concept evaluation: the A_s W_s figure, the supervised-reference section,
the MPC bars and the whole `conca concepts` report (shared with `conca reproduce concepts`)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from conca.report.html import Report


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


HELDOUT_TEXT = (
    "Held-out MPC: each concept's pairs are split by pair into folds; on all but one fold the probe is fitted and "
    "each concept matched to a distinct latent (Hungarian on Pearson(probe log-odds, exp(latent))); the matched "
    "latent's correlation with that probe is then measured on the held-out fold's words, and averaged over folds and "
    "concepts. Held-out coverage: the share of concepts whose held-out correlation exceeds the threshold. MPC "
    "(in-sample) is the papers' metric: probe, matching and score on the same words, so with many latents the best "
    "of them correlates with any concept by chance (about 0.31 on pure noise at 1,152 latents).")
FLOORS_TEXT = (
    "Chance floors, each scored with the same procedure as the trained dictionary: the permutation null shuffles each "
    "concept's words against its latents (the probe scores shuffled within the concept); the untrained floor scores "
    "fresh random initialisations of the same method and width. Floors: mean and 95% interval (percentiles 2.5-97.5 "
    "of the draws). Lift = trained - floor, with the 95% percentile interval of trained minus each draw; a lift "
    "whose interval excludes 0 is beyond chance.")


def _interval(entry: dict, signed: bool = False) -> str:
    f = "+.3f" if signed else ".3f"
    return f"{entry['mean']:{f}} [{entry['low']:{f}}, {entry['high']:{f}}]"


def floor_rows(name: str, scores: dict) -> list[dict]:
    """One row per floor kind of a dictionary's (or method's) scores: floor and lift, held-out and in-sample."""
    rows = []
    for kind, floor in scores.get("floors", {}).items():
        lift = scores.get("lift", {}).get(kind, {})
        rows.append({"dictionary": name, "floor": kind, "draws": len(floor["mpc"]["draws"]),
                     **({"floor held-out MPC [95%]": _interval(floor["mpc_heldout"]),
                         "lift held-out [95%]": _interval(lift["mpc_heldout"], True)} if "mpc_heldout" in floor else {}),
                     "floor MPC in-sample [95%]": _interval(floor["mpc"]),
                     "lift in-sample [95%]": _interval(lift["mpc"], True),
                     **({"floor direction recovery [95%]": _interval(floor["direction_recovery"]),
                         "lift direction [95%]": _interval(lift["direction_recovery"], True)}
                        if "direction_recovery" in floor and "direction_recovery" in lift else {})})
    return rows


def write_concepts_report(path: Path, results: dict, opts) -> Path:
    """`opts`: the run's ConceptsOptions (its threshold labels the coverage column; all of it is shown)."""
    report = Report("conca concepts", subtitle=f"{len(results['concepts'])} concepts at site {results['site']} of "
                                              f"{Path(results['model']).name}")
    rows = [{"dictionary": n, **({"held-out MPC": r["mpc_heldout"], f"held-out coverage@{opts.threshold}":
                                  r["coverage_heldout"]} if "mpc_heldout" in r else {}),
             "MPC (in-sample)": r["mpc"], f"coverage@{opts.threshold} (in-sample)": r["coverage"],
             **({"direction recovery": r["direction_recovery"]} if "direction_recovery" in r else {}),
             "MSE (concept words)": r["mse_concept_words"], "rank significance": r["rank_significance"],
             **{k.replace("_", " "): v for k, v in r.get("agreement", {}).items()}}
            for n, r in results["dictionaries"].items()]
    report.heading("Concept recovery")
    report.paragraph(HELDOUT_TEXT + " Rank significance (ConCA Alg. 2): lower is "
                     "more stable. Agreement (ConCA App. O): the dictionary spliced in at the site on held-out text; "
                     "argmax match and top-10 overlap with the clean next-token distribution, Jensen-Shannon divergence (nats).")
    report.table(rows)
    floors = [row for n, r in results["dictionaries"].items() for row in floor_rows(n, r)]
    if floors:
        report.heading("Chance floors and lift")
        report.paragraph(FLOORS_TEXT)
        report.table(floors)
    per = {n: {p["concept"]: p["correlation"] for p in r["per_concept"]} for n, r in results["dictionaries"].items()}
    held = {n: {p["concept"]: p["correlation"] for p in r.get("per_concept_heldout", [])}
            for n, r in results["dictionaries"].items()}
    report.table([{"concept": c, **{f"{n} (held-out)": held[n][c] for n in held if c in held[n]},
                   **{f"{n} (in-sample)": per[n][c] for n in per}} for c in results["concepts"]])
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
    held = any("mpc_heldout" in methods[n] for n in names)
    width = 0.27 if held else 0.4
    ax.bar(xs - width / 2 - (width / 2 if held else 0), [methods[n]["mpc"] for n in names], width,
           yerr=[methods[n].get("mpc_std", 0) for n in names], label="ours, in-sample", color="#3b6ea8", capsize=3)
    if held:
        ax.bar(xs, [methods[n].get("mpc_heldout", np.nan) for n in names], width,
               yerr=[methods[n].get("mpc_heldout_std", 0) for n in names], label="ours, held-out", color="#5aa05a",
               capsize=3)
    if paper:
        ax.bar(xs + width / 2 + (width / 2 if held else 0), [paper.get(n, np.nan) for n in names], width,
               label="paper (Pythia-70M, in-sample)", color="#c8884a")
    ax.set_xticks(xs, [n.replace("conca_", "ConCA ").replace("_softplus", "") for n in names], rotation=30, ha="right")
    ax.set_ylabel("MPC")
    ax.set_ylim(min(0.0, *[methods[n].get("mpc_heldout", 0.0) for n in names]), 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
