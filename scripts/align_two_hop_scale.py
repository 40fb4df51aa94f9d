"""Alpha scale of the 2-hop AlignSAE swaps on a saved `conca align --two-hop` run (no training): per layer,
the bound slot's value (cross-entropy-aligned slots are logits) at the bridge position of the held-out
questions, the other slots, the decoder column norms, the median distance between relation means and the
saved swap grid. Usage: python scripts/align_two_hop_scale.py RUN_DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from conca.dictionaries.base import load_dictionary
from conca.experiments.align.two_hop import _rows
from conca.experiments.lab_options import AlignOptions
from conca.synthetic.two_hop import make_two_hop_world


def main(run: Path) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    opts = AlignOptions(**{k: v for k, v in cfg.items() if k in AlignOptions.__dataclass_fields__})
    world = make_two_hop_world(opts.two_hop_entities, opts.two_hop_relations, opts.world_seed)
    lm_questions, test = world.split_questions(opts.two_hop_train_questions, opts.two_hop_test_questions,
                                               opts.world_seed)
    n_test_rows = 2 * len(test)
    _, rel, _ = _rows(test)
    rel = torch.tensor(rel)[1::2]  # bridge rows (relation r2): where the swaps act
    acts = load_file(str(run / "two_hop" / "activations.safetensors"))
    q = lambda t: [round(float(v), 3) for v in np.quantile(np.asarray(t), [0.1, 0.5, 0.9])]
    out = {}
    for layer_dir in sorted((run / "two_hop" / "layers").iterdir()):
        site = layer_dir.name
        x = acts[site][-n_test_rows:][1::2].float()
        sae = load_dictionary(layer_dir / "alignsae" / "align")
        with torch.no_grad():
            zc = sae.encode(x)[:, sae.concept_slots]
            own = zc[torch.arange(len(x)), rel]
            mask = torch.ones_like(zc, dtype=torch.bool)
            mask[torch.arange(len(x)), rel] = False
            col = sae.W_dec[sae.concept_slots].norm(dim=1)
            present = [c for c in range(zc.shape[1]) if (rel == c).sum() >= 2]
            means = torch.stack([x[rel == c].mean(0) for c in present])
        metrics = json.loads((layer_dir / "metrics.json").read_text())["value"]
        out[site] = {"own_slot_q10_50_90": q(own), "other_slots_q10_50_90": q(zc[mask]),
                     "own_minus_best_other_median": round(float((own - zc.masked_fill(~mask, -1e9).max(1).values)
                                                                .median()), 3),
                     "decoder_col_norm_q10_50_90": q(col), "x_norm_median": round(float(x.norm(dim=1).median()), 3),
                     "relation_mean_dist_median": round(float(torch.pdist(means).median()), 3),
                     "swap_latent_decode": {a: round(v, 3) for a, v in metrics["swap_success"]["latent_decode"].items()}}
        print(site, json.dumps(out[site]), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
