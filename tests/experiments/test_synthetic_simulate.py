"""`run_simulate`: the files it writes, and that every option of SimulateOptions changes something."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from conca.errors import ConfigError
from conca.experiments.simulate import (SimulateOptions, build_world, effective_options, evaluation_set,
                                        parse_method_options, plan, run_simulate, run_trial)
from conca.runtime.threads import thread_limits
from conca.synthetic.posterior import masked_visibility, posterior

# One changed value per option; each must change the planned work (and the world-level ones the world).
CHANGES = {
    "n_latents": 4, "cardinality": 3, "graph": "chain", "expected_edges": 5.0, "prob_low": 0.1, "prob_high": 0.9,
    "observed": 10, "observed_order": "sequential", "flip_prob": 0.1, "representation_dim": 16, "compare_dim": 0,
    "hidden": 128, "samples": 5000, "steps": 100, "batch_size": 128, "lr": 3e-3, "eval_pairs": 100,
    "objectives": "app_m", "target_vocab": 16, "target_scale": 1.0, "targets": 4, "app_m_flip_prob": 0.05,
    "app_m_steps": 100, "app_m_lr": 1e-3,
    "counterfactual": False, "log_eps": 1e-3, "methods": "topk", "method_options": "topk:k=2", "dict_latents": 20,
    "dict_steps": 50, "dict_batch_size": 64, "dict_lr": 1e-2, "seeds": 2, "seed": 5, "sweep_observed": "3,6",
    "sweep_chain": 4, "graph_types": "er1", "graph_sizes": "5", "graph_observed_per_latent": 4, "sweep_steps": 0,
    "token_world": False, "token_length": 8, "token_vocab": 8, "token_steps": 100, "quick": True,
}
BEHAVIOUR_TESTED = {"out", "threads", "progress"}  # below, each with its own test
WORLD_KNOBS = ("n_latents", "cardinality", "graph", "expected_edges", "prob_low", "prob_high", "observed",
               "observed_order", "flip_prob", "seed")
TINY = dict(quick=True, methods="none", compare_dim=0, sweep_observed="", graph_types="", token_world=False, seeds=1)

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a small shared machine run far faster single-threaded (see thread_limits)."""
    from conca.runtime.threads import thread_limits

    with thread_limits(1):
        yield



def test_every_option_is_covered():
    names = {f.name for f in dataclasses.fields(SimulateOptions)}
    assert names == set(CHANGES) | BEHAVIOUR_TESTED


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_option_changes_the_plan(name):
    base = SimulateOptions()
    assert getattr(base, name) != CHANGES[name]
    assert plan(dataclasses.replace(base, **{name: CHANGES[name]})) != plan(base)


def _first_spec(opts: SimulateOptions):
    return next(iter(plan(opts).table.values()))[0]


def _signature(world):
    return (world.latent.dag.edges, world.latent.cardinalities, [t.round(6).tolist() for t in world.latent.cpts],
            world.mixing.table.tolist(), world.mixing.flip_prob)


@pytest.mark.parametrize("name", WORLD_KNOBS)
def test_world_options_change_the_world(name):
    base = SimulateOptions(graph="er", expected_edges=2.0)  # a sparse ER graph, so edge counts can move
    changed = dataclasses.replace(base, **{name: {"expected_edges": 9.0}.get(name, CHANGES[name])})
    worlds = [build_world(_first_spec(o)) for o in (base, changed)]
    assert _signature(worlds[0]) != _signature(worlds[1])


def test_counterfactual_pairs_differ_in_one_concept_and_log_eps_clamps():
    spec = _first_spec(SimulateOptions(eval_pairs=50))
    world = build_world(spec)
    ev = evaluation_set(world, 50, True, np.random.default_rng(0))
    assert len(ev.z) == 2 * 50 * 5
    for i in range(5):
        rows = np.flatnonzero(ev.concept == i)
        a, b = ev.z[rows[:50]], ev.z[rows[50:]]
        assert (a[:, i] != b[:, i]).all() and (np.delete(a, i, 1) == np.delete(b, i, 1)).all()
        assert np.array_equal(ev.masked[rows[:50]], ev.masked[rows[50:]])
    obs = evaluation_set(world, 50, False, np.random.default_rng(0))
    assert (obs.concept == -1).all() and len(np.unique(obs.groups)) == len(obs.z)
    post = posterior(world, ev.x, masked_visibility(world.mixing.n_observed, ev.masked))
    assert post.log_joint(1e-3).min() > post.log_joint(1e-6).min()


def test_quick_caps_sizes_and_bad_values_are_config_errors():
    eff = effective_options(SimulateOptions(quick=True, steps=10))
    assert eff.steps == 10 and eff.samples <= 1500 and eff.graph_types == "er1"
    assert parse_method_options("topk:k=3;p_anneal:l1_coeff=0.01,p_end=0.5") == {
        "topk": {"k": 3}, "p_anneal": {"l1_coeff": 0.01, "p_end": 0.5}}
    for bad in ({"methods": "nope"}, {"sweep_observed": "2,x"}, {"graph_types": "star"}, {"seeds": 0},
                {"method_options": "topk"}, {"log_eps": 0.0}, {"sweep_observed": "40"}):
        with pytest.raises(ConfigError):
            opts = SimulateOptions(**bad)
            [build_world(s[0]) for s in plan(opts).observed.values()]


def test_threads_option_limits_and_restores():
    before = torch.get_num_threads()
    with thread_limits(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_progress_option_controls_logging(tmp_path):
    lines: list[str] = []
    run_simulate(SimulateOptions(out=str(tmp_path / "a"), progress=True, **TINY), log=lines.append)
    assert lines and all(line.startswith("[conca simulate") for line in lines)
    quiet: list[str] = []
    run_simulate(SimulateOptions(out=str(tmp_path / "b"), progress=False, **TINY), log=quiet.append)
    assert quiet == []


@pytest.mark.slow  # a whole `simulate` run
def test_run_simulate_quick_writes_report_and_results(tmp_path):
    out = tmp_path / "sim"
    methods = "topk,p_anneal"
    from conca.dictionaries import methods as registered

    if "conca_layernorm_softplus" in registered():
        methods += ",conca_layernorm_softplus"
    results = run_simulate(SimulateOptions(out=str(out), quick=True, methods=methods, progress=False))
    data = json.loads((out / "results.json").read_text())
    for key in ("probe_accuracy", "r2_marginal_logposterior", "r2_joint_logposterior", "pcc", "pcc_std", "mcc"):
        assert key in data, key
    assert set(data["pcc"]) == set(methods.split(","))
    assert all(-1 <= v <= 1 for v in data["pcc"].values())
    assert set(data["pcc_heldout"]) == set(methods.split(",")) and all(-1 <= v <= 1 for v in data["pcc_heldout"].values())
    assert 0 <= data["probe_accuracy"] <= 1 and len(data["table"]["diverse_10"]["seeds"]) == 2
    assert data["observed_sweep"] and data["graph_sweep"] and data["token_world"]["per_position"]
    assert data["differences"] and results["probe_accuracy"] == data["probe_accuracy"]
    html = (out / "report.html").read_text()
    assert "0.923" in html and "Where we differ" in html and "PCC held out" in html and html.count("data:image/png;base64,") == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["quick"] is True


def test_run_trial_steps_change_the_training():
    spec = _first_spec(SimulateOptions(**TINY))
    short, longer = run_trial(dataclasses.replace(spec, steps=5)), run_trial(dataclasses.replace(spec, steps=40))
    assert longer["loss_last"] < short["loss_last"]


def test_k_valued_observational_trial_scores_every_value():
    spec = plan(SimulateOptions(**{**TINY, "methods": "topk", "cardinality": 3, "n_latents": 3, "counterfactual": False,
                                   "observed": 10})).table["diverse_10"][0]
    result = run_trial(spec)
    assert result["n_states"] == 27
    assert len(result["pcc_per_concept"]["topk"]) == 3 * 2  # values 1..k-1 of each concept
    assert 0 <= result["control_probe_accuracy"] <= 1 and result["pcc_supervised_linear"] is not None


def test_default_plan_puts_the_diverse_objective_first_and_app_m_literally_beside_it():
    table = plan(SimulateOptions()).table
    assert list(table) == ["diverse_10", "app_m_10", "app_m_256"]
    diverse, app_m, wide = (rows[0] for rows in table.values())
    assert diverse.objective == "diverse" and diverse.flip_prob > 0 and diverse.n_targets > 1
    # App. M as the paper states it: deterministic mixing, Adam 1e-4, the masked single bit, width 10.
    assert (app_m.objective, app_m.flip_prob, app_m.lr, app_m.representation_dim) == ("app_m", 0.0, 1e-4, 10)
    assert app_m.observed == diverse.observed and app_m.methods == diverse.methods and diverse.controls and app_m.controls
    assert wide.methods == () and wide.representation_dim == 256
    # The Fig. 2 sweeps stay on I-Predict's masked-prediction objective.
    assert all(rows[0].objective == "app_m" and rows[0].lr == 1e-4 for rows in plan(SimulateOptions()).observed.values())
    assert list(plan(SimulateOptions(objectives="app_m,diverse")).table)[0] == "app_m_10"
    for bad in ("", "diverse,diverse", "masked"):
        with pytest.raises(ConfigError):
            plan(SimulateOptions(objectives=bad))


def test_results_and_report_carry_controls_and_the_checked_conditions(tmp_path):
    out = tmp_path / "sim"
    run_simulate(SimulateOptions(out=str(out), progress=False, **{**TINY, "methods": "topk"}))
    data = json.loads((out / "results.json").read_text())
    assert data["objective"] == "diverse" and data["headline_row"] == "diverse_10"
    assert set(data["table"]) == {"diverse_10", "app_m_10"}
    for key in ("probe_accuracy", "r2_marginal_logposterior", "control_probe_accuracy", "control_r2_marginal_logposterior"):
        assert 0 <= data[key] <= 1 or key.startswith(("r2", "control_r2")), key
    assert set(data["control_pcc"]) == {"topk"} and set(data["table"]["app_m_10"]["control_pcc"]) == {"topk"}
    diverse, app_m = data["table"]["diverse_10"]["diversity"], data["table"]["app_m_10"]["diversity"]
    assert diverse["L_hat"]["full_rank"] and diverse["directions_per_context"] == 31
    assert app_m["directions_per_context"] == 1 and not app_m["L_hat"]["full_rank"] and app_m["tv_max"] == 1.0
    assert data["diversity"] == diverse
    html = (out / "report.html").read_text()
    assert "conditions, checked" in html and "[untrained: " in html and "App. M literal" in html
    statement = next(line for line in data["differences"] if line.startswith("App. M literal, width 10 ("))
    assert "diversity: each context constrains f along 1 direction" in statement
