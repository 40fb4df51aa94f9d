"""The 2-hop part of the `conca align` report: binding, swaps through AlignSAE and through an
unsupervised SAE (the paper's "about 4x"), and the grokking probe (the paper's "top-1 1.0 from epoch 25")."""

from __future__ import annotations

import numpy as np

from conca.report import paper_numbers as paper
from conca.report.swap_ceilings import TWO_HOP_LABELS, ceiling_sentence, ceiling_table


def two_hop_sentences(th: dict) -> list[str]:
    p = paper.ALIGNSAE_TWO_HOP
    n_rel = len(th["world"]["relations"])
    best, base = th["best"], th["best_baseline"]
    lm = th["lm"]["accuracy"]
    lines = [
        f"2-hop world ({th['world']['entities']} entities x {n_rel} relations; the paper: {p['entities']} x "
        f"{p['relations']}): our LM answers {lm['id']:.3f} of its training questions and {lm['test']:.3f} of held-out "
        f"compositions (both entities right). Best AlignSAE swap success {best['swap_success']:.3f} ({best['method']}, "
        f"alpha {best['alpha']:g}, {best['layer']}) against {base['swap_success']:.3f} through the unsupervised SAE's "
        f"matched features ({base['method']}, alpha {base['alpha']:g}, {base['layer']}): "
        + (f"{th['swap_ratio_over_unsupervised']:.1f}x" if th["swap_ratio_over_unsupervised"] is not None else
           "the unsupervised SAE never succeeds")
        + f" (the paper: about {p['swap_ratio_over_unsupervised']:g}x). Without any edit the next word is already the "
        f"swapped relation's entity in {th['swap_floor']:.3f} of the {th['n_swap_trials']} trials (the floor)."]
    if th.get("swap_ceilings"):
        lines.append(ceiling_sentence(th["swap_ceilings"], th["swap_floor"], **TWO_HOP_LABELS))
    summary = th["grokking"]["summary"]
    if summary:
        site = best["layer"] if best["layer"] in summary else next(iter(summary))
        s = summary[site]
        reached = (f"reaches 1.0 first at epoch {s['first_top1_1_epoch']:.1f}" if s["first_top1_1_epoch"] is not None
                   else f"never reaches 1.0 (at most {s['max_top1']:.3f})")
        if s.get("first_top1_099_epoch") is not None:
            reached += f", 0.99 first at epoch {s['first_top1_099_epoch']:.1f}"
        lines.append(
            f"Grokking probe at {site} (the final AlignSAE applied to the LM's activations at each of its "
            f"{len(th['grokking']['curves'][site])} evaluation steps): top-1 binding {reached}; it stays within 0.01 "
            f"of its final {s['final_top1']:.3f} from epoch {s['plateau_from_epoch']:.1f} on (chance "
            f"{1 / n_rel:.3f}). The paper: top-1 {p['grokking_top1']:.1f} from epoch {p['grokking_from_epoch']} of "
            f"{p['grokking_epochs']}.")
    return lines


def write_two_hop_section(report, th: dict) -> None:
    from conca.report.align import _heatmap  # shared heat-map style (imported late: no cycle at import)

    p = paper.ALIGNSAE_TWO_HOP
    report.heading("2-hop world")
    best, base = th["best"], th["best_baseline"]
    summary = th["grokking"]["summary"]
    site = best["layer"] if best["layer"] in summary else next(iter(summary), None)
    report.table([
        {"metric": "swap success, AlignSAE (best cell)", "ours": best["swap_success"],
         "ours at": f"{best['layer']}, alpha {best['alpha']:g}, {best['method']}", "paper": None,
         "control": th["swap_floor"], "control is": "no edit (floor)"},
        {"metric": "swap success, unsupervised SAE (best cell)", "ours": base["swap_success"],
         "ours at": f"{base['layer']}, alpha {base['alpha']:g}, {base['method']}", "paper": None,
         "control": th["swap_floor"], "control is": "no edit (floor)"},
        {"metric": "ratio AlignSAE / unsupervised", "ours": th["swap_ratio_over_unsupervised"], "ours at": "best cells",
         "paper": p["swap_ratio_over_unsupervised"], "control": None, "control is": ""},
        *([{"metric": "grokking: top-1 binding, final", "ours": summary[site]["final_top1"], "ours at": site,
            "paper": p["grokking_top1"], "control": 1 / len(th["world"]["relations"]), "control is": "chance"},
           {"metric": "grokking: first epoch with top-1 = 1.0", "ours": summary[site]["first_top1_1_epoch"],
            "ours at": site, "paper": p["grokking_from_epoch"], "control": None, "control is": ""},
           {"metric": "grokking: first epoch with top-1 >= 0.99", "ours": summary[site].get("first_top1_099_epoch"),
            "ours at": site, "paper": None, "control": None, "control is": ""}] if site else []),
        {"metric": "LM accuracy, held-out compositions", "ours": th["lm"]["accuracy"]["test"], "ours at": "greedy",
         "paper": None, "control": None, "control is": ""},
    ], caption="The paper publishes the ratio and the grokking epoch, not the absolute swap numbers of its 2-hop runs.")
    report.table([{"site": s, "slot accuracy train": m["slot_accuracy_train"], "slot accuracy held-out":
                   m["slot_accuracy_test"], "diagonal (held-out)": m["diagonal_accuracy"],
                   "kept step": (m.get("checkpoint") or {}).get("step"),
                   "SAE diagonal (matched)": m["baseline"]["diagonal_accuracy"]} for s, m in th["layers"].items()],
                 caption="Binding of the relation in use at each answer position (r1 before e2, r2 before e3), "
                         f"argmax over {len(th['world']['relations'])} slots; chance {1 / len(th['world']['relations']):.3f}.")
    if th.get("swap_ceilings"):
        ceiling_table(report, th["swap_ceilings"], th["layers"], th["swap_floor"], TWO_HOP_LABELS)
    alphas = [str(a) for a in th["alphas"]]
    first = next(iter(th["layers"].values()))
    for method in first["swap_success"]:
        for label, get in (("AlignSAE", lambda m: m["swap_success"]), ("unsupervised SAE", lambda m: m["baseline"]["swap_success"])):
            grid = np.array([[get(m)[method][a] for a in alphas] for m in th["layers"].values()])
            report.figure(_heatmap(grid, list(th["layers"]), [f"{float(a):g}" for a in alphas],
                                   f"2-hop, {label}: {method}"),
                          caption=f"{th['n_swap_trials']} swaps per cell at the bridge position; floor "
                                  f"{th['swap_floor']:.3f}.")
    if site:
        rows = th["grokking"]["curves"][site]
        report.table([{"step": r["step"], "epoch": round(r["epoch"], 2), "top-1": r["top1"], "top-3": r["top3"],
                       "diagonal strength": r["diagonal_strength"], "LM accuracy (held-out)": r["lm_accuracy_test"]}
                      for r in rows], caption=f"Grokking probe at {site}: the final AlignSAE on the LM at each "
                                              "evaluation step of its training.")
