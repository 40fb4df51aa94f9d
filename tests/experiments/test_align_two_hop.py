"""`conca align`'s 2-hop section: the probe's measures, the swap trials, and a whole tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conca.cli import main
from conca.experiments.align import AlignOptions, run_two_hop
from conca.experiments.align.two_hop import _epoch, probe_binding, swap_trials_two_hop
from conca.synthetic.two_hop import make_two_hop_world

pytestmark = pytest.mark.usefixtures("one_thread")


def test_probe_binding_counts_top1_top3_and_the_row_normalised_diagonal():
    relations = torch.tensor([0, 0, 1, 2])
    scores = torch.tensor([[3.0, 2, 1, 0], [0, 3, 2, 1], [0, 3, 2, 1], [0, 1, 3, 2]])
    got = probe_binding(scores, relations, 4)
    assert got["top1"] == pytest.approx(3 / 4)  # the second row binds slot 1
    assert got["top3"] == pytest.approx(3 / 4)  # its relation 0 is its lowest score
    # Rows of the binding matrix: relation 0 -> half right; 1 -> right; 2 -> right; 3 -> no samples (0).
    assert got["diagonal_strength"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)


def test_swap_trials_ask_for_the_other_relations_of_the_bridge_entity():
    world = make_two_hop_world(6, 4, seed=0)
    _, test = world.split_questions(20, 5, seed=0)
    trials = swap_trials_two_hop(world, test, 3, seed=0)
    assert len(trials) == 3 * 3
    for t in trials:
        q = next(q for q in test if q.bridge_prompt == t.prompt)
        assert t.source == world.relations[q.r2] and t.target != t.source
        assert t.expected == world.names[world.target[q.e2][world.relations.index(t.target)]]


def test_epochs_count_only_question_batches():
    assert _epoch(8, bio_every=4, batch_size=10, n_train=60) == pytest.approx(6 * 10 / 60)
    assert _epoch(8, bio_every=0, batch_size=10, n_train=40) == pytest.approx(2.0)


@pytest.mark.slow  # a whole tiny 2-hop run: LM, dictionaries, swaps, probe
def test_two_hop_run_measures_binding_swaps_and_the_grokking_probe(tmp_path):
    opts = AlignOptions(out=str(tmp_path), quick=True, progress=False, select_fraction=0.1).sized()
    result = run_two_hop(opts, Path(tmp_path), lambda m: None)
    assert set(result["layers"]) == {"resid.0", "resid.1"}
    assert result["n_swap_trials"] == 3 * 3 and 0 <= result["swap_floor"] <= 1
    # --steps 0: the AlignSAE trains --two-hop-epochs passes over its rows (two per training question).
    rows = 2 * result["world"]["questions"]["train"]
    steps = -(-opts.two_hop_epochs * rows // min(opts.batch_size, rows))
    for site, m in result["layers"].items():
        meta = json.loads((tmp_path / "two_hop" / "layers" / site / "alignsae" / "align" / "config.json").read_text())
        assert meta["train_config"]["steps"] == steps
        assert 0 <= m["slot_accuracy_test"] <= 1 and m["checkpoint"]["step"] <= steps
        assert set(m["swap_success"]) == set(m["baseline"]["swap_success"]) == {"latent_decode", "decoder_column"}
    best, base = result["best"], result["best_baseline"]
    if base["swap_success"] > 0:
        assert result["swap_ratio_over_unsupervised"] == pytest.approx(best["swap_success"] / base["swap_success"])
    # One probe point per LM evaluation step (40 steps, every 10), epochs increasing.
    curve = result["grokking"]["curves"]["resid.1"]
    assert [r["step"] for r in curve] == [10, 20, 30, 40]
    assert all(a["epoch"] < b["epoch"] for a, b in zip(curve, curve[1:]))
    assert result["grokking"]["summary"]["resid.1"]["final_top1"] == curve[-1]["top1"]
    # Swap ceilings: at the last layer only the head follows, so patching the counterfactual's activation
    # answers exactly as the counterfactual prompt does.
    ceilings = result["swap_ceilings"]
    assert set(ceilings["layers"]) == {"resid.0", "resid.1"}
    assert ceilings["layers"]["resid.1"]["patch"] == pytest.approx(ceilings["counterfactual_prompts"])
    for c in ceilings["layers"].values():
        assert set(c["relation_step"]) == {"1", "2", "5", "10"} and c["relation_step_best"] == max(c["relation_step"].values())
        v = c["variance_explained"]
        assert 0 <= v["entity"] <= v["additive"] + 1e-9 and v["additive"] <= v["cell"] + 1e-9 <= 1 + 1e-6
    # A rerun reuses the LM, its snapshots and every finished layer.
    lm_info = tmp_path / "two_hop" / "lm" / "training.json"
    stamp = lm_info.stat().st_mtime, (tmp_path / "two_hop" / "layers" / "resid.1" / "metrics.json").stat().st_mtime
    again = run_two_hop(opts, Path(tmp_path), lambda m: None)
    assert again["grokking"] == result["grokking"]
    assert stamp == (lm_info.stat().st_mtime, (tmp_path / "two_hop" / "layers" / "resid.1" / "metrics.json").stat().st_mtime)


@pytest.mark.slow  # whole `conca align --quick`, the 2-hop world only
def test_align_writes_two_hop_results_and_report(tmp_path):
    code = main(["align", "--out", str(tmp_path), "--quick", "true", "--biographies", "false", "--default-model", "false",
                 "--swap-methods", "latent_decode", "--progress", "false"])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    th = results["two_hop"]
    assert {"best", "best_baseline", "swap_ratio_over_unsupervised", "grokking", "paper"} <= set(th)
    assert th["paper"]["grokking_from_epoch"] == 25 and th["paper"]["swap_ratio_over_unsupervised"] == 4.0
    assert any(line.startswith("2-hop world") for line in results["comparison"])
    assert any(line.startswith("Grokking probe") for line in results["comparison"])
    html = (tmp_path / "report.html").read_text()
    assert "2-hop world" in html and "Grokking probe" in html


def test_alpha_profile_reads_alpha_2_and_the_collapse_on_the_best_alpha_2_layer():
    from conca.experiments.align.biographies import alpha_profile

    grid = {"resid.0": {"m": {"1.0": 0.9, "2.0": 0.3, "50.0": 0.2, "100.0": 0.0}},
            "resid.1": {"m": {"1.0": 0.1, "2.0": 0.6, "50.0": 0.1, "100.0": 0.3}}}
    assert alpha_profile(grid) == {"m": {"layer": "resid.1", "alpha_2": 0.6, "alpha_ge_50_mean": pytest.approx(0.2)}}
    no_two = alpha_profile({"resid.0": {"m": {"1.0": 0.4, "10.0": 0.5}}})
    assert no_two["m"] == {"layer": "resid.0", "alpha_2": None, "alpha_ge_50_mean": None}


def test_variance_shares_separate_additive_codes_from_joint_ones():
    from conca.experiments.align.swap_ceilings import variance_shares
    entity = torch.tensor([0, 0, 1, 1] * 5)
    relation = torch.tensor([0, 1, 0, 1] * 5)
    additive = torch.stack([entity * 2.0, relation * -3.0, entity + relation], 1).float()
    got = variance_shares(additive, entity, relation)
    assert got["additive"] == pytest.approx(1.0) and got["cell"] == pytest.approx(1.0)
    assert 0 < got["entity"] < 1 and 0 < got["relation"] < 1
    # XOR of a balanced 2 x 2 design: neither variable nor their sum explains anything, the cell all of it.
    joint = (entity ^ relation).float()[:, None]
    got = variance_shares(joint, entity, relation)
    assert got["entity"] == pytest.approx(0, abs=1e-9) and got["additive"] == pytest.approx(0, abs=1e-9)
    assert got["cell"] == pytest.approx(1.0)


def test_ceiling_sentence_says_joint_coding_only_when_the_relation_step_falls_short():
    from conca.report.swap_ceilings import BIOGRAPHY_LABELS, TWO_HOP_LABELS, ceiling_sentence
    layer = lambda patch, step: {"patch": patch, "relation_step_best": step, "entity_step": 1.0,  # noqa: E731
                                 "relation_step": {"1": step, "2": step / 2},
                                 "variance_explained": {"additive": 0.3, "cell": 0.99}}
    joint = ceiling_sentence({"layers": {"resid.0": layer(1.0, 0.1), "resid.1": layer(0.9, 0.12)}}, 0.04,
                             **TWO_HOP_LABELS)
    assert "relation jointly with the bridge entity" in joint and "0.900-1.000" in joint and "at most 0.120 (resid.1, scale 1" in joint
    shared = ceiling_sentence({"layers": {"resid.0": layer(1.0, 0.8)}}, 0.04, **BIOGRAPHY_LABELS)
    assert "shared by every person does the swap" in shared and "jointly" not in shared
