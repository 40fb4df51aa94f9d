"""Alpha scale of AlignSAE swaps on a saved `conca align` run (no training): per layer, the bound
slot's value on its own relation's questions, the decoder column norms, and the latent-decode
coefficient alpha* that would move a question of relation a onto the mean activation of relation b
along the target slot's decoder column. Usage: python scripts/align_alpha_scale.py RUN_DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from conca.dictionaries.base import load_dictionary
from conca.experiments.align.biographies import SPLITS, _split_questions
from conca.experiments.lab_options import AlignOptions
from conca.synthetic.biographies import RELATIONS, make_biography_world


def main(run: Path) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    opts = AlignOptions(**{k: v for k, v in cfg.items() if k in AlignOptions.__dataclass_fields__})
    world = make_biography_world(opts.persons, opts.world_seed)
    splits = _split_questions(world, opts)
    qs = [q for k in SPLITS for q in splits[k]]
    bounds = np.cumsum([0] + [len(splits[k]) for k in SPLITS])
    idrows = slice(int(bounds[2]), int(bounds[3]))
    concepts = torch.tensor([q.concept for q in qs])[idrows]
    from safetensors.torch import load_file
    acts = load_file(str(run / "activations.safetensors"))
    out = {}
    for layer_dir in sorted((run / "layers").iterdir()):
        site = layer_dir.name
        x = acts[site][idrows].float()
        sae = load_dictionary(layer_dir / "alignsae" / "align")
        with torch.no_grad():
            z = sae.encode(x)
            zc = z[:, sae.concept_slots]
            own = zc[torch.arange(len(x)), concepts]
            other = zc.clone(); other[torch.arange(len(x)), concepts] = float("nan")
            W = sae.W_dec[sae.concept_slots]  # (6, d)
            col = W.norm(dim=1)
            means = torch.stack([x[concepts == c].mean(0) for c in range(len(RELATIONS))])
            xnorm = x.norm(dim=1)
            # alpha* for swap a->b: decode(z') - decode(z) = (alpha - z_b) W_b - z_a W_a; choose alpha so
            # that the step's projection on W_b equals that of (mu_b - mu_a) + z_a W_a ... least squares.
            stars = []
            for c in range(len(RELATIONS)):
                rows = concepts == c
                for b in range(len(RELATIONS)):
                    if b == c:
                        continue
                    need = means[b] - x[rows] + zc[rows, c:c + 1] * W[c]  # what the W_b term must supply
                    stars.append(((need @ W[b]) / W[b].pow(2).sum() + zc[rows, b]).numpy())
            stars = np.concatenate(stars)
            # Share of each relation-mean difference that a full one-hot slot swap a -> b supplies along it.
            carried = [float((W[b] - W[a]) @ (means[b] - means[a]) / (means[b] - means[a]).pow(2).sum())
                       for a in range(len(RELATIONS)) for b in range(len(RELATIONS)) if a != b]
        q = lambda t: [round(float(v), 3) for v in np.nanquantile(np.asarray(t), [0.1, 0.5, 0.9])]
        out[site] = {"own_slot_q10_50_90": q(own), "own_slot_mean": round(float(own.mean()), 3),
                     "other_slots_q10_50_90": q(other.flatten()[~torch.isnan(other.flatten())]),
                     "decoder_col_norm": [round(float(v), 3) for v in col],
                     "x_norm_median": round(float(xnorm.median()), 3),
                     "class_mean_dist_median": round(float(torch.pdist(means).median()), 3),
                     "alpha_star_q10_50_90": q(stars),
                     "mean_dist_over_col_norm": round(float(torch.pdist(means).median() / col.median()), 2),
                     "slot_swap_share_of_mean_diff_q10_50_90": q(carried)}
        swaps = json.loads((layer_dir / "swaps_latent_decode.json").read_text())["value"]
        out[site]["swap"] = swaps
        print(site, json.dumps(out[site]), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
