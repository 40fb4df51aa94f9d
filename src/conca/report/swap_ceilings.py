"""The swap ceilings in the `conca align` report: what any edit of the swapped position can do without a
dictionary (activation patching, relation mean steps), beside the dictionaries' best swaps."""

from __future__ import annotations

# Words for the sentence, and short column names (entity_col, relation_col) for the table.
TWO_HOP_LABELS = {"position": "bridge position", "entity": "bridge entity", "relation": "relation",
                  "entity_col": "e2", "relation_col": "r2"}
BIOGRAPHY_LABELS = {"position": "question's last token", "entity": "person", "relation": "relation",
                    "entity_col": "person", "relation_col": "relation"}


def _span(low: float, high: float, digits: int = 3) -> str:
    return f"{low:.{digits}f}" if f"{low:.{digits}f}" == f"{high:.{digits}f}" else f"{low:.{digits}f}-{high:.{digits}f}"


def ceiling_sentence(ceilings: dict, floor: float, position: str, entity: str, relation: str, **_columns) -> str:
    """What any edit of the swapped position can do, and what that says about slot swaps."""
    layers = ceilings["layers"]
    span = lambda key: (min(key(m) for m in layers.values()), max(key(m) for m in layers.values()))  # noqa: E731
    patch, step = span(lambda m: m["patch"]), span(lambda m: m["relation_step_best"])
    additive, cell = span(lambda m: m["variance_explained"]["additive"]), span(lambda m: m["variance_explained"]["cell"])
    entity_steps = [m["entity_step"] for m in layers.values() if m["entity_step"] is not None]
    best_site = max(layers, key=lambda s: layers[s]["relation_step_best"])
    best_scale = max(layers[best_site]["relation_step"], key=layers[best_site]["relation_step"].get)
    text = (f"Ceilings of the swap without a dictionary: the counterfactual prompt's activation patched into the "
            f"{position} flips {_span(*patch)} of the trials (per layer); adding the difference of {relation} means "
            f"(one step per pair of {relation}s, the same for every {entity}, as a slot swap's; scales 1-10) at most "
            f"{step[1]:.3f} ({best_site}, scale {best_scale}; floor {floor:.3f})"
            + (f"; the same difference within the {entity} {_span(min(entity_steps), max(entity_steps))}"
               if entity_steps else "")
            + f". One-hot {entity} and {relation} added explain {_span(*additive, 2)} of the activations' variance, "
            f"the ({entity}, {relation}) cells {_span(*cell, 2)}. ")
    if step[1] < 0.5 * patch[0]:
        return text + (f"The LM codes the {relation} jointly with the {entity}, so a swap through one slot per "
                       f"{relation} is bounded by the {relation} step, whatever the dictionary.")
    return text + (f"A step shared by every {entity} does the swap here, so where a dictionary's swap falls short of "
                   "it, the dictionary's slots do not supply that step.")


def ceiling_table(report, ceilings: dict, layers: dict, floor: float, labels: dict) -> None:
    """Per layer: the ceilings beside the dictionary's best swap (any method and alpha)."""
    rows = []
    for site, c in ceilings["layers"].items():
        swaps = layers.get(site, {}).get("swap_success", {})
        rows.append({"site": site, "patch": c["patch"], **{f"{labels['relation_col']} step x{k}": v
                                                            for k, v in c["relation_step"].items()},
                     f"within-{labels['entity_col']} step": c["entity_step"],
                     "AlignSAE best swap": max((max(g.values()) for g in swaps.values()), default=None),
                     f"variance: {labels['entity_col']} + {labels['relation_col']}": c["variance_explained"]["additive"],
                     "variance: cell": c["variance_explained"]["cell"]})
    report.table(rows, caption=ceiling_sentence(ceilings, floor, **labels))
