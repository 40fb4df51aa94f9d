"""Replay the 1-hop swap grid of a saved `conca align` run under the released table script's protocol
(1hop/scripts/06_swap_evaluate.py) beside conca's, with the saved LM and AlignSAEs (no training).

  hook1   conca's patch (decode(z') spliced into resid.L at the last prompt token), ONE greedy token
  embed1  the released table script: decode(z') of the layer-L AlignSAE written into the INPUT
          EMBEDDING of the last prompt token, ONE greedy token
Both scored with the released compare_answers (a first token that is a substring of the target counts;
for dates it falls back to the substring rule when the token does not parse as a date), and with
conca's answers_match. Usage: python scripts/align_swap_protocols.py RUN_DIR"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from conca.dictionaries.base import load_dictionary
from conca.experiments.align.biographies import _split_questions, swap_trials
from conca.experiments.lab_options import AlignOptions
from conca.interventions.swap import concept_slots, concept_swap
from conca.models.prompts import group_by_length
from conca.synthetic.biographies import answers_match, make_biography_world


def released_compare(gold: str, gen: str, relation: str) -> bool:
    gold, gen = (gold or "").strip().lower(), (gen or "").strip().lower()
    if not gen:
        return False
    if relation == "birth_date":
        m = re.match(r"(\d{1,2}),\s*([a-z]+),\s*(\d{4})", gen)
        g = re.match(r"(\d{1,2}),\s*([a-z]+),\s*(\d{4})", gold)
        if m and g:
            return m.groups() == g.groups()
    return gold in gen or gen in gold


def main(run: Path) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    opts = AlignOptions(**{k: v for k, v in cfg.items() if k in AlignOptions.__dataclass_fields__})
    world = make_biography_world(opts.persons, opts.world_seed)
    trials = swap_trials(world, _split_questions(world, opts)["id"], opts.swap_questions, opts.seed)
    model = GPT2LMHeadModel.from_pretrained(run / "lm").eval()
    tok = AutoTokenizer.from_pretrained(run / "lm")
    ids = [tok(t.prompt, add_special_tokens=False).input_ids for t in trials]
    batches = group_by_length(ids, 128)
    alphas = [float(a) for a in str(opts.alphas).split(",")]
    emb = model.get_input_embeddings()
    out = {}
    for layer_dir in sorted((run / "layers").iterdir()):
        site, sae = layer_dir.name, load_dictionary(layer_dir / "alignsae" / "align")
        out[site] = {p: {} for p in ("hook1_released", "hook1_conca", "embed1_released", "embed1_conca")}
        for alpha in alphas:
            first = {"hook1": [""] * len(trials), "embed1": [""] * len(trials)}
            for rows in batches:
                x = torch.tensor([ids[i] for i in rows])
                src = [trials[i].source for i in rows]
                tgt = [trials[i].target for i in rows]
                with torch.no_grad():
                    with concept_swap(model, site, sae, src, tgt, alpha):
                        hook = model(x).logits[:, -1].argmax(-1)
                    h = model(x, output_hidden_states=True).hidden_states[int(site.split(".")[1]) + 1][:, -1]
                    z = sae.encode(h)
                    r = torch.arange(len(rows))
                    z[r, concept_slots(sae, src)] = 0.0
                    z[r, concept_slots(sae, tgt)] = alpha
                    e = emb(x).clone()
                    e[:, -1] = sae.decode(z)
                    embed = model(inputs_embeds=e).logits[:, -1].argmax(-1)
                for j, i in enumerate(rows):
                    first["hook1"][i] = tok.decode([int(hook[j])], skip_special_tokens=True).strip()
                    first["embed1"][i] = tok.decode([int(embed[j])], skip_special_tokens=True).strip()
            for p, answers in first.items():
                out[site][p + "_released"][str(alpha)] = round(float(np.mean(
                    [released_compare(t.expected, a, t.target) for a, t in zip(answers, trials)])), 3)
                out[site][p + "_conca"][str(alpha)] = round(float(np.mean(
                    [answers_match(a, t.expected, t.target) for a, t in zip(answers, trials)])), 3)
        out[site]["conca_6tok_saved"] = json.loads((layer_dir / "swaps_latent_decode.json").read_text())["value"]
        print(site, json.dumps(out[site]), flush=True)
    json.dump(out, sys.stdout if len(sys.argv) < 3 else open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
