"""Does the swap's alpha scale follow the share of the relation difference that the slots' decoder
columns carry? Refit one layer's AlignSAE on a saved `conca align` run's activations (the LM is not
retrained) with a different ortho_coeff, then measure that share and the 1-hop swap grid (conca's
latent_decode, 6 tokens). Usage: python scripts/align_ortho_probe.py RUN_DIR SITE ORTHO OUT_DIR [N_FREE]
[OPTION=VALUE ...] (further AlignOptions overrides, e.g. sparse_coeff=0.1 activation=relu)"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from conca.experiments.align.biographies import SPLITS, _split_questions, swap_trials
from conca.experiments.align.fitting import _value_classes, alignsae_steps, fit_alignsae
from conca.experiments.lab_options import AlignOptions
from conca.interventions.swap import generate_swapped
from conca.synthetic.biographies import RELATIONS, answers_match, make_biography_world


def main(run: Path, site: str, ortho: float, out: Path, n_free: int | None = None, **overrides) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    opts = AlignOptions(**{k: v for k, v in cfg.items() if k in AlignOptions.__dataclass_fields__})
    opts = dataclasses.replace(opts, ortho_coeff=ortho, n_free=n_free or opts.n_free, **{
        k: type(getattr(opts, k))(v) for k, v in overrides.items()})
    world = make_biography_world(opts.persons, opts.world_seed)
    splits = _split_questions(world, opts)
    qs = [q for k in SPLITS for q in splits[k]]
    b = np.cumsum([0] + [len(splits[k]) for k in SPLITS])
    rows = {k: slice(int(b[i]), int(b[i + 1])) for i, k in enumerate(SPLITS)}
    concepts = torch.tensor([q.concept for q in qs])
    value_labels, values = _value_classes([q.answer for q in qs])
    x = load_file(str(run / "activations.safetensors"))[site].float()
    sae, _, _ = fit_alignsae(x[rows["train"]], concepts[rows["train"]], values[rows["train"]], list(RELATIONS),
                             value_labels, opts, opts.n_free,
                             alignsae_steps(opts, rows["train"].stop - rows["train"].start, opts.epochs), out / "alignsae", site,
                             eval_x=x[rows["id"]], select=(x[rows["select"]], concepts[rows["select"]]))
    xi, ci = x[rows["id"]], concepts[rows["id"]]
    with torch.no_grad():
        zc = sae.encode(xi)[:, sae.concept_slots]
        W = sae.W_dec[sae.concept_slots]
        means = torch.stack([xi[ci == c].mean(0) for c in range(len(RELATIONS))])
        share = [float((W[j] - W[i]) @ (means[j] - means[i]) / (means[j] - means[i]).pow(2).sum())
                 for i in range(len(RELATIONS)) for j in range(len(RELATIONS)) if i != j]
        acc = float((zc.argmax(1) == ci).float().mean())
    model = GPT2LMHeadModel.from_pretrained(run / "lm").eval()
    tok = AutoTokenizer.from_pretrained(run / "lm")
    trials = swap_trials(world, splits["id"], opts.swap_questions, opts.seed)
    grid = {}
    for alpha in (1.0, 2.0, 5.0, 10.0, 20.0, 50.0):
        answers = generate_swapped(model, tok, site, sae, trials, alpha, "latent_decode", max_new_tokens=6)
        grid[str(alpha)] = round(float(np.mean([answers_match(a, t.expected, t.target)
                                                for a, t in zip(answers, trials)])), 3)
    result = {"site": site, "ortho_coeff": ortho, "n_free": opts.n_free, **overrides, "slot_accuracy_id": round(acc, 3),
              "own_slot_median": round(float(zc[torch.arange(len(ci)), ci].median()), 3),
              "slot_swap_share_median": round(float(np.median(share)), 3), "swap_latent_decode": grid}
    print(json.dumps(result), flush=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    extra = dict(a.split("=", 1) for a in sys.argv[5:] if "=" in a)
    positional = [a for a in sys.argv[5:] if "=" not in a]
    main(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), Path(sys.argv[4]),
         int(positional[0]) if positional else None, **extra)
