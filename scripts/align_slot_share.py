"""Where an AlignSAE puts the relation step, on a saved `conca align` (biographies) run, no training: per
layer, the cosine between a slot swap's decoder step W_d[t] - W_d[s] and the relation-mean step
mu_t - mu_s, the share of the relation-mean step a unit slot step supplies along it, and the shares of
that step the dictionary reconstructs through its concept slots and through its free bank (from the
mean latents of each relation's training questions). Usage: python scripts/align_slot_share.py RUN_DIR"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from conca.dictionaries.base import load_dictionary
from conca.experiments.align.biographies import _split_questions
from conca.experiments.lab_options import AlignOptions
from conca.synthetic.biographies import RELATIONS, make_biography_world

run = Path(sys.argv[1])
cfg = yaml.safe_load((run / "config.yaml").read_text())
opts = AlignOptions(**{k: v for k, v in cfg.items() if k in AlignOptions.__dataclass_fields__})
world = make_biography_world(opts.persons, opts.world_seed)
splits = _split_questions(world, opts)
acts = load_file(str(run / "activations.safetensors"))
n_train = len(splits["train"])
rel = torch.tensor([q.concept for q in splits["train"]])
for site in sorted(acts):
    x = acts[site][:n_train].float()
    mu = torch.stack([x[rel == r].mean(0) for r in range(len(RELATIONS))])
    sae = load_dictionary(run / "layers" / site / "alignsae" / "align")
    W = sae.W_dec[sae.concept_slots].detach()
    cos, ratio = [], []
    for s, t in itertools.permutations(range(len(RELATIONS)), 2):
        d, w = mu[t] - mu[s], W[t] - W[s]
        cos.append(float(torch.nn.functional.cosine_similarity(d, w, dim=0)))
        ratio.append(float((w @ d) / (d @ d)))  # share of the step a unit swap supplies along d
    print(site, f"cos(slot step, relation-mean step) median {torch.tensor(cos).median():.3f}",
          f"projection share median {torch.tensor(ratio).median():.3f}")
print("free bank share")
for site in sorted(acts):
    x = acts[site][:n_train].float()
    sae = load_dictionary(run / "layers" / site / "alignsae" / "align")
    with torch.no_grad():
        z = sae.encode(x)
    slots = torch.tensor(sae.concept_slots)
    free = torch.ones(z.shape[1], dtype=torch.bool)
    free[slots] = False
    W = sae.W_dec.detach()
    mu = torch.stack([x[rel == r].mean(0) for r in range(len(RELATIONS))])
    zm = torch.stack([z[rel == r].mean(0) for r in range(len(RELATIONS))])
    fs, ss = [], []
    for s, t in itertools.permutations(range(len(RELATIONS)), 2):
        d = mu[t] - mu[s]
        dz = zm[t] - zm[s]
        ss.append(float(((dz[slots] @ W[slots]) @ d) / (d @ d)))
        fs.append(float(((dz[free] @ W[free]) @ d) / (d @ d)))
    print(site, f"relation-mean step reconstructed: slots {torch.tensor(ss).median():.3f} "
          f"free bank {torch.tensor(fs).median():.3f}")
