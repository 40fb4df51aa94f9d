"""What any edit of the swapped position can do, without a dictionary: the ceilings a relation swap is
measured against (2-hop: the bridge position "... A: e2", r2 -> r'; biographies: the question's last
token, one relation of a person -> another).

A slot swap moves the activation along directions of one relation shared by every entity. Here, per
layer, on the run's own swap trials:

  patch            the activation replaced by the counterfactual prompt's (the same question asking for
                   the target relation): the most an edit of this one position at this layer can carry
  relation_step    x + s * (mean of the target relation's rows - mean of the source's), s in 1, 2, 5, 10:
                   an entity-independent relation step, what a relation slot's swap supplies
  entity_step      the same difference taken within the trial's entity only (trials whose two cells
                   have rows)

and the share of the activations' variance that one-hot entity, one-hot relation, both additively and
the (entity, relation) cell explain. When `patch` is high but `relation_step` stays near the floor, the position codes
the relation jointly with the entity, and a swap through one slot per relation cannot work at any alpha.
World-free: each runner states its trials as `CeilingTrials` (two_hop.py, biographies.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from conca.interventions.hooks import intervene
from conca.interventions.rows import SetRows
from conca.models.prompts import greedy_generate, last_token_activations
from conca.models.sites import Site

STEP_SCALES = (1.0, 2.0, 5.0, 10.0)


def variance_shares(x: torch.Tensor, entity: torch.Tensor, relation: torch.Tensor) -> dict[str, float]:
    """Share of x's variance explained by least squares on one-hot entity, one-hot relation, both
    additively, and the (entity, relation) cell. Cells of a few rows also fit noise: an upper bound."""
    xc = x.double() - x.double().mean(0)
    total = float((xc ** 2).sum())

    def explained(design: torch.Tensor) -> float:
        fit = design @ torch.linalg.lstsq(design, xc).solution
        return float((fit ** 2).sum()) / total if total > 0 else 0.0

    def one_hot(v: torch.Tensor) -> torch.Tensor:
        m = nn.functional.one_hot(v).double()
        return m[:, m.sum(0) > 0]

    cell = entity * (int(relation.max()) + 1) + relation
    return {"entity": explained(one_hot(entity)), "relation": explained(one_hot(relation)),
            "additive": explained(torch.cat([one_hot(entity), one_hot(relation)], 1)), "cell": explained(one_hot(cell))}


@dataclass
class CeilingTrials:
    """Swap trials for the ceilings: row i moves `prompts[i]` (entity[i], relation source[i]) to relation
    target[i]; `counterfactual[i]` is the prompt that asks for the target; `hits(answers)` scores answers."""
    prompts: list[str]
    counterfactual: list[str]
    entity: list[int]
    source: list[int]
    target: list[int]
    hits: Callable[[list[str]], list[bool]]
    max_new_tokens: int = 1


@dataclass
class LabelledRows:
    """Activations per site with each row's entity and relation."""
    x: dict[str, torch.Tensor]
    entity: torch.Tensor
    relation: torch.Tensor


def _hits(model, tokenizer, trials: CeilingTrials, prompts: list[str], site: Site | None = None,
          vectors: torch.Tensor | None = None, add: bool = False) -> list[bool]:
    def intervention(indices: list[int]):
        return intervene(model, site, SetRows(vectors[torch.tensor(indices)], add), positions="last")

    return trials.hits(greedy_generate(model, tokenizer, prompts, max_new_tokens=trials.max_new_tokens,
                                       intervention=None if site is None else intervention))


def _cell_means(rows: LabelledRows, site: str, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    x = rows.x[site].float()
    cells = {}
    for e, r in wanted:
        chosen = x[(rows.entity == e) & (rows.relation == r)]
        if len(chosen):
            cells[e, r] = chosen.mean(0)
    return cells


@torch.no_grad()
def edit_ceilings(model: nn.Module, tokenizer, trials: CeilingTrials, sites: list[Site], means_from: LabelledRows,
                  cells_from: LabelledRows, n_relations: int) -> dict:
    """Per site, the dictionary-free edits of the module docstring: relation means from `means_from`
    (other entities than the trials' may be better: the step must not know the entity), the
    within-entity cells from `cells_from`."""
    donor = last_token_activations(model, tokenizer, trials.counterfactual, sites)
    out = {"n_trials": len(trials.prompts),
           "counterfactual_prompts": float(np.mean(_hits(model, tokenizer, trials, trials.counterfactual))),
           "layers": {}}
    pairs = list(zip(trials.entity, trials.source, trials.target))
    for site in sites:
        x = means_from.x[str(site)].float()
        relation = means_from.relation
        means = torch.stack([x[relation == r].mean(0) if (relation == r).any() else torch.zeros(x.shape[1])
                             for r in range(n_relations)])
        step = torch.stack([means[t] - means[s] for _, s, t in pairs])
        cells = _cell_means(cells_from, str(site), {(e, r) for e, s, t in pairs for r in (s, t)})
        have = [(e, t) in cells and (e, s) in cells for e, s, t in pairs]
        entity_step = torch.stack([cells[e, t] - cells[e, s] if ok else torch.zeros(x.shape[1])
                                   for (e, s, t), ok in zip(pairs, have)])
        run = lambda v, add: _hits(model, tokenizer, trials, trials.prompts, site, v, add)  # noqa: E731
        relation_step = {f"{s:g}": float(np.mean(run(s * step, True))) for s in STEP_SCALES}
        entity_hits = [h for h, ok in zip(run(entity_step, True), have) if ok]
        out["layers"][str(site)] = {
            "patch": float(np.mean(run(donor[site], False))),
            "relation_step": relation_step, "relation_step_best": max(relation_step.values()),
            "entity_step": float(np.mean(entity_hits)) if entity_hits else None,
            "entity_step_trials": len(entity_hits),
            "variance_explained": variance_shares(x, means_from.entity, relation)}
    return out

