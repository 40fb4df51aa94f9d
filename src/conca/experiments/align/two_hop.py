"""`conca align` on the 2-hop world (SPEC §4.4; released `2hop/`): a small LM learns to answer
"Who is the r2 of the r1 of e1?" with "e2 e3"; per layer an AlignSAE binds the relation in use at
each answer position (r1 before e2, r2 before e3) to one of 20 slots (cross-entropy alignment, as the
released 2-hop code), beside an unsupervised ReLU-L1 SAE with one matched feature per relation.

Measured: slot binding on held-out compositions; swap success at the bridge position (after e2,
slot r2 suppressed and r' set to alpha, success when the next word is the r' of e2), through both
dictionaries, and their ratio (the paper: about 4x); the grokking probe, the final AlignSAE applied
to the activations of the LM at every evaluation step of its training (top-1 / top-3 binding and
diagonal strength against epochs; the paper: top-1 1.0 from epoch 25).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from conca.dictionaries.base import Dictionary, load_dictionary
from conca.evaluation import alignment
from conca.experiments.align.biographies import _best_over_layers, lm_config
from conca.experiments.align.fitting import (_cached_json, _cached_tensors, _dictionary_options, _value_classes,
                                             alignsae_steps, fit_alignsae, fit_baseline)
from conca.experiments.align.options import _floats, _layers, _names
from conca.experiments.align.swap_ceilings import CeilingTrials, LabelledRows, edit_ceilings
from conca.experiments.lab_options import AlignOptions
from conca.interventions.swap import SwapTrial, generate_swapped
from conca.models.prompts import greedy_generate, last_token_activations
from conca.models.sites import Site
from conca.report import paper_numbers as paper
from conca.synthetic.qa_lm import CHECKPOINT_FILE, TRAINING_FILE, train_qa_lm
from conca.synthetic.two_hop import TwoHopQuestion, TwoHopWorld, make_two_hop_world


def _rows(questions: list[TwoHopQuestion]) -> tuple[list[str], list[int], list[str]]:
    """Two activations per question: the answer position (relation r1, predicts e2) and the bridge
    position after e2 (relation r2, predicts e3)."""
    prompts, relations, values = [], [], []
    for q in questions:
        prompts += [q.prompt, q.bridge_prompt]
        relations += [q.r1, q.r2]
        values += [q.names[q.e2], q.names[q.e3]]
    return prompts, relations, values


def swap_pairs(world: TwoHopWorld, questions: list[TwoHopQuestion], n: int, seed: int) -> list[tuple[TwoHopQuestion, int]]:
    """`n` questions drawn at random, each with every relation r' other than its r2."""
    picked = random.Random(seed).sample(questions, min(n, len(questions)))
    return [(q, r) for q in picked for r in range(len(world.relations)) if r != q.r2]


def swap_trials_two_hop(world: TwoHopWorld, questions: list[TwoHopQuestion], n: int, seed: int) -> list[SwapTrial]:
    """At the bridge position of `n` questions, r2 swapped to every other relation r'; the expected
    next word is the r' of e2 (the released `04_swap_intervention.py`)."""
    return [SwapTrial(q.bridge_prompt, world.relations[q.r2], world.relations[r], world.names[world.target[q.e2][r]])
            for q, r in swap_pairs(world, questions, n, seed)]


def _first_word_is(answer: str, expected: str) -> bool:
    words = answer.split()
    return bool(words) and words[0] == expected


def two_hop_ceilings(model, tokenizer, world: TwoHopWorld, pairs: list[tuple[TwoHopQuestion, int]],
                     train: list[TwoHopQuestion], train_bridge: dict[str, torch.Tensor], sites: list[Site]) -> dict:
    """The swap ceilings (`swap_ceilings.edit_ceilings`) of the trials `pairs` (question, r'); the
    bridge activations of the `train` questions give both the relation means and the cells."""
    expected = [world.names[world.target[q.e2][r]] for q, r in pairs]
    trials = CeilingTrials(prompts=[q.bridge_prompt for q, _ in pairs],
                           counterfactual=[world.question(q.e1, q.r1, r).bridge_prompt for q, r in pairs],
                           entity=[q.e2 for q, _ in pairs], source=[q.r2 for q, _ in pairs], target=[r for _, r in pairs],
                           hits=lambda answers: [_first_word_is(a, e) for a, e in zip(answers, expected)])
    rows = LabelledRows(train_bridge, torch.tensor([q.e2 for q in train]), torch.tensor([q.r2 for q in train]))
    return edit_ceilings(model, tokenizer, trials, sites, rows, rows, len(world.relations))


@torch.no_grad()
def probe_binding(scores: torch.Tensor, relations: torch.Tensor, n: int) -> dict:
    """Top-1 / top-3 binding and the diagonal strength (mean of the row-normalised binding matrix's
    diagonal), the released `06_analyze_grokking.py`."""
    top = scores.topk(min(3, n), dim=-1).indices
    matrix = np.zeros((n, n))
    np.add.at(matrix, (relations.numpy(), top[:, 0].numpy()), 1)
    rows = matrix.sum(1, keepdims=True)
    matrix = matrix / np.where(rows == 0, 1, rows)
    return {"top1": float((top[:, 0] == relations).float().mean()),
            "top3": float((top == relations[:, None]).any(-1).float().mean()),
            "diagonal_strength": float(np.mean(np.diag(matrix)))}


def _epoch(step: int, bio_every: int, batch_size: int, n_train: int) -> float:
    """Passes over the training questions after `step` LM steps (every bio_every-th is a paragraph batch)."""
    qa_steps = step - (step // bio_every if bio_every else 0)
    return qa_steps * batch_size / max(1, n_train)


def run_two_hop(opts: AlignOptions, out: Path, say) -> dict:
    t0 = time.perf_counter()
    out = out / "two_hop"
    world = make_two_hop_world(opts.two_hop_entities, opts.two_hop_relations, opts.world_seed)
    lm_questions, test = world.split_questions(opts.two_hop_train_questions, opts.two_hop_test_questions, opts.world_seed)
    n_select = min(round(opts.select_fraction * len(lm_questions)), len(lm_questions) - 1)
    select, train = lm_questions[:n_select], lm_questions[n_select:]
    n_rel = len(world.relations)
    # No early stop (an accuracy never reaches 2): the grokking probe follows binding past the point where the
    # LM answers its training questions, as the paper's 100 epochs do.
    cfg = replace(lm_config(opts), steps=opts.two_hop_lm_steps, eval_every=opts.two_hop_eval_every, target_accuracy=2.0)
    say(f"2-hop world: {len(world.names)} entities x {n_rel} relations, {len(lm_questions)} training and {len(test)} "
        f"held-out questions; training a {opts.lm_layers}-layer, width-{opts.lm_width} LM for {cfg.steps} steps")
    every_site = [Site("resid", layer) for layer in range(opts.lm_layers)]
    probe_prompts, probe_relations, _ = _rows(test)
    snap_dir = out / "snapshots"
    if not (out / "lm" / TRAINING_FILE).exists() and not (out / "lm" / CHECKPOINT_FILE).exists():
        shutil.rmtree(snap_dir, ignore_errors=True)  # from an LM that no longer exists: never mixed into this one

    def snapshot(step: int, model, tokenizer) -> None:  # the grokking probe reads the LM at every evaluation step
        acts = last_token_activations(model, tokenizer, probe_prompts, every_site)
        snap_dir.mkdir(parents=True, exist_ok=True)
        save_file({str(s): x.contiguous() for s, x in acts.items()}, str(snap_dir / f"step_{step:07d}.safetensors"))

    model, tokenizer, lm_info = train_qa_lm(world, lm_questions, {"id": lm_questions, "test": test}, cfg, out / "lm",
                                            progress=opts.progress, log=say, on_eval=snapshot)
    say(f"2-hop LM accuracy: training questions {lm_info['accuracy']['id']:.3f}, held-out compositions "
        f"{lm_info['accuracy']['test']:.3f}")
    splits = {"train": train, "select": select, "test": test}
    rows_of = {k: _rows(v) for k, v in splits.items()}
    identity = {"lm": lm_info["identity"], "splits": {k: len(v) for k, v in splits.items()}}
    prompts = [p for k in splits for p in rows_of[k][0]]
    acts = _cached_tensors(out / "activations.safetensors", identity, lambda: {
        str(s): x for s, x in last_token_activations(model, tokenizer, prompts, every_site).items()})
    bounds = np.cumsum([0] + [len(rows_of[k][0]) for k in splits])
    sl = {k: slice(int(bounds[i]), int(bounds[i + 1])) for i, k in enumerate(splits)}
    relations = torch.tensor([r for k in splits for r in rows_of[k][1]])
    value_labels, values = _value_classes([v for k in splits for v in rows_of[k][2]])
    trials = swap_trials_two_hop(world, test, opts.two_hop_swap_questions, opts.seed)
    plain = greedy_generate(model, tokenizer, [t.prompt for t in trials], max_new_tokens=1)
    floor = float(np.mean([_first_word_is(a, t.expected) for a, t in zip(plain, trials)]))
    alphas = _floats(opts.alphas, "alphas")
    sae_opts = replace(opts, align_loss="ce")  # the released 2-hop code: cross-entropy on the 20 slots
    steps = alignsae_steps(opts, sl["train"].stop - sl["train"].start, opts.two_hop_epochs)
    per_layer = {}
    for site in [Site("resid", layer) for layer in _layers(opts.layers, opts.lm_layers, "layers")]:
        x = acts[str(site)]
        layer_dir = out / "layers" / str(site)
        layer_identity = {**identity, "site": str(site), "options": _dictionary_options(sae_opts, steps),
                          "alphas": alphas, "swap": [_names(opts.swap_methods), opts.swap_error_term,
                                                     opts.swap_positions, opts.two_hop_swap_questions]}

        def measure(site=site, x=x, layer_dir=layer_dir) -> dict:
            say(f"2-hop {site}: AlignSAE ({opts.n_free} free + {n_rel} slots, {steps} steps), unsupervised SAE, swaps")
            sae, _, choice = fit_alignsae(x[sl["train"]], relations[sl["train"]], values[sl["train"]], list(world.relations),
                                          value_labels, sae_opts, opts.n_free, steps, layer_dir / "alignsae",
                                          str(site), select=(x[sl["select"]], relations[sl["select"]]))
            with torch.no_grad():
                scores = {k: sae.concept_scores(x[sl[k]]) for k in splits}
            m = {f"slot_accuracy_{k}": alignment.slot_accuracy(scores[k], relations[sl[k]]) for k in ("train", "test")}
            m["diagonal_accuracy"] = alignment.diagonal_accuracy(scores["test"], relations[sl["test"]], n_rel)
            m["checkpoint"] = None if choice is None else {k: v for k, v in choice.items() if k != "candidates"}
            base = fit_baseline(x[sl["train"]], opts, layer_dir / "baseline", steps)
            with torch.no_grad():
                z = {k: base.encode(x[sl[k]]) for k in ("train", "test")}
            features = alignment.matched_features(z["train"], relations[sl["train"]], n_rel)
            m["baseline"] = {"matched_features": features,
                             "slot_accuracy_test": alignment.slot_accuracy(z["test"][:, features], relations[sl["test"]]),
                             "diagonal_accuracy": alignment.diagonal_accuracy(z["test"][:, features],
                                                                               relations[sl["test"]], n_rel)}
            m["swap_success"] = _swap_grid(model, tokenizer, site, sae, None, trials, alphas, opts)
            m["baseline"]["swap_success"] = _swap_grid(model, tokenizer, site, base,
                                                       dict(zip(world.relations, features)), trials, alphas, opts)
            return m

        per_layer[str(site)] = _cached_json(layer_dir / "metrics.json", layer_identity, measure)
    say("2-hop: what any edit of the bridge position can do (activation patching, relation mean steps)")
    ceilings = two_hop_ceilings(model, tokenizer, world, swap_pairs(world, test, opts.two_hop_swap_questions, opts.seed),
                             train, {s: acts[s][sl["train"]][1::2] for s in per_layer}, [Site.parse(s) for s in per_layer])
    best = _best_over_layers({s: m["swap_success"] for s, m in per_layer.items()})
    best_base = _best_over_layers({s: m["baseline"]["swap_success"] for s, m in per_layer.items()})
    epoch = lambda step: _epoch(step, cfg.bio_every, cfg.batch_size, len(lm_questions))  # noqa: E731
    grokking = _grokking(snap_dir, per_layer, out, epoch, torch.tensor(probe_relations), n_rel, lm_info["history"])
    ratio = best["swap_success"] / best_base["swap_success"] if best_base["swap_success"] > 0 else None
    return {"world": {"entities": len(world.names), "relations": list(world.relations),
                      "questions": {k: len(v) for k, v in splits.items()}},
            "lm": {k: lm_info[k] for k in ("accuracy", "steps_trained", "n_parameters", "elapsed_s", "history")},
            "layers": per_layer, "alphas": alphas, "n_swap_trials": len(trials), "swap_floor": floor,
            "best": best, "best_baseline": best_base, "swap_ratio_over_unsupervised": ratio,
            "swap_ceilings": ceilings, "grokking": grokking, "paper": dict(paper.ALIGNSAE_TWO_HOP),
            "elapsed_s": time.perf_counter() - t0}


def _swap_grid(model, tokenizer, site: Site, dictionary: Dictionary, slots, trials: list[SwapTrial],
               alphas: list[float], opts: AlignOptions) -> dict[str, dict[str, float]]:
    grid = {}
    for method in _names(opts.swap_methods):
        grid[method] = {}
        for alpha in alphas:
            answers = generate_swapped(model, tokenizer, site, dictionary, trials, alpha, method, opts.swap_error_term,
                                       opts.swap_positions, max_new_tokens=1, slots=slots)
            grid[method][str(alpha)] = float(np.mean([_first_word_is(a, t.expected) for a, t in zip(answers, trials)]))
    return grid


def _grokking(snap_dir: Path, per_layer: dict, out: Path, epoch, relations: torch.Tensor, n_rel: int,
              lm_history: list[dict]) -> dict:
    """The final AlignSAE of each studied layer applied to the LM's activations at every snapshot."""
    files = sorted(snap_dir.glob("step_*.safetensors"))
    accuracy = {h["step"]: h.get("accuracy_test") for h in lm_history}
    curves = {}
    for site in per_layer:
        sae = load_dictionary(out / "layers" / site / "alignsae" / "align")
        rows = []
        for f in files:
            step = int(f.stem.split("_")[1])
            with torch.no_grad():
                scores = sae.concept_scores(load_file(str(f))[site])
            rows.append({"step": step, "epoch": epoch(step), "lm_accuracy_test": accuracy.get(step),
                         **probe_binding(scores, relations, n_rel)})
        curves[site] = rows
    summary = {}
    for site, rows in curves.items():
        if rows:
            top = max(r["top1"] for r in rows)
            # The first snapshot from which top-1 binding never falls below its final level minus 0.01.
            final = rows[-1]["top1"]
            start = next(i for i in range(len(rows)) if all(r["top1"] >= final - 0.01 for r in rows[i:]))
            summary[site] = {"max_top1": top, "final_top1": final, "plateau_from_epoch": rows[start]["epoch"],
                             "first_top1_1_epoch": next((r["epoch"] for r in rows if r["top1"] >= 0.999), None),
                             "first_top1_099_epoch": next((r["epoch"] for r in rows if r["top1"] >= 0.99), None)}
    return {"curves": curves, "summary": summary}
