"""`conca simulate`: the synthetic identifiability lab, with ground-truth concepts.

Worlds of discrete latent concepts on a DAG are mixed into binary observables (SPEC §2.3); a
masked-prediction MLP is trained on them by next-token prediction; then, against the exact
posteriors p(z|x):

1. ConCA's synthetic table (App. M): 5 binary latents, ER DAG with 10 expected edges, predictor
   representation of width 10; linear-probe accuracy on counterfactual pairs, and every requested
   dictionary (ConCA variants, SAEs) scored against the true log-posteriors (PCC, MCC), each beside
   the untrained network's. One row per objective (`objectives`, the first is the headline): the
   diverse objective, where the theorem's diversity condition holds (one shared f predicting
   many-outcome targets, `conca.synthetic.diversity`), and App. M's literal masked single bit, where
   it does not; the condition is checked numerically for both. App. M's row is also run at a wide
   representation (`compare_dim`, probes only), where capacity alone decodes the concepts.
2. I-Predict Fig. 2 left: probe accuracy vs the number of observed variables (chain of 3).
3. I-Predict Fig. 2 right: probe accuracy across ER1/ER2/ER3 graphs and latent sizes.
4. A token-sequence world and a small causal transformer: R² of f(prefix) -> log-posteriors along
   the prefix.

Every configuration runs for `seeds` seeds (a seed draws the graph, conditionals, permutations,
data and initialisation); means and standard deviations (numpy's default ddof = 0) are reported.
Writes OUT/results.json, OUT/report.html and OUT/config.yaml.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from conca.config import save_effective_config
from conca.errors import ConfigError
from conca.experiments.lab_options import SimulateOptions  # noqa: F401  (declared there: no torch)
from conca.fileio import atomic_write_json
from conca.report.simulate import PAPER_TABLE, differences, jsonable, write_report
from conca.runtime.threads import thread_limits
from conca.synthetic.trials import (OBJECTIVES, TokenSpec, TrialSpec, build_world, evaluation_set, run_token_trial,
                                    run_trial)
from conca.synthetic.world import make_dag

# Re-exported: the trial machinery lives in conca.synthetic.trials.
__all__ = ["SimulateOptions", "run_simulate", "plan", "effective_options", "parse_method_options", "validate",
           "aggregate", "TrialSpec", "TokenSpec", "build_world", "evaluation_set", "run_trial", "run_token_trial"]


# -------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    table: dict[str, list[TrialSpec]]  # row "OBJECTIVE_WIDTH" (e.g. "diverse_10") -> one spec per seed; headline first
    observed: dict[int, list[TrialSpec]]  # observed count -> seeds
    graphs: dict[tuple[str, int], list[TrialSpec]]  # (graph, n_latents) -> seeds
    token: list[TokenSpec]


QUICK_CAPS = {"samples": 1500, "steps": 40, "app_m_steps": 40, "eval_pairs": 30, "dict_steps": 40, "dict_batch_size": 128,
              "batch_size": 128, "sweep_steps": 30, "token_steps": 20, "token_length": 5, "seeds": 2,
              "compare_dim": 32, "hidden": 32}


def effective_options(opts: SimulateOptions) -> SimulateOptions:
    """`quick` caps every size (QUICK_CAPS) and shortens the sweeps; other options are kept."""
    if not opts.quick:
        return opts
    capped = {k: min(getattr(opts, k), v) for k, v in QUICK_CAPS.items()}
    capped["sweep_observed"] = ",".join(str(n) for n in _ints(opts.sweep_observed, "sweep_observed")[:2])
    capped["graph_types"] = ",".join(_names(opts.graph_types)[:1])
    capped["graph_sizes"] = ",".join(str(n) for n in _ints(opts.graph_sizes, "graph_sizes")[:1])
    return dataclasses.replace(opts, **capped)


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{name} values must be >= 1, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def parse_method_options(text: str) -> dict[str, dict]:
    """'topk:k=3;p_anneal:l1_coeff=0.01,p_end=0.5' -> {'topk': {'k': 3}, 'p_anneal': {...}}."""
    from conca.config import parse_key_values

    out: dict[str, dict] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        method, sep, rest = item.partition(":")
        if not sep or not method.strip():
            raise ConfigError(f"bad method options {item!r}: expected METHOD:key=value,key=value")
        out.setdefault(method.strip(), {}).update(parse_key_values(rest))
    return out


def resolve_methods(text: str) -> tuple[str, ...]:
    """'all' -> every registered method; 'none' or '' -> no dictionaries; names are checked."""
    from conca.dictionaries.base import methods as registered

    known = registered()
    if text.strip().lower() in ("", "none"):
        return ()
    if text.strip().lower() == "all":
        return tuple(known)
    chosen = tuple(_names(text))
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise ConfigError(f"unknown dictionary method(s) {', '.join(unknown)}: registered are {', '.join(known)}")
    return chosen


def objectives(opts: SimulateOptions) -> list[str]:
    names = _names(opts.objectives)
    bad = [n for n in names if n not in OBJECTIVES]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(f"objectives must name each of {', '.join(OBJECTIVES)} at most once, got {opts.objectives!r}")
    return names


def row_name(objective: str, dim: int) -> str:
    return f"{objective}_{dim}"


def validate(opts: SimulateOptions) -> None:
    objectives(opts)
    if opts.seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {opts.seeds}")
    for name in ("n_latents", "observed", "representation_dim", "hidden", "samples", "steps", "batch_size",
                 "eval_pairs", "dict_steps", "dict_batch_size", "sweep_chain", "graph_observed_per_latent",
                 "token_length", "token_vocab", "token_steps", "app_m_steps", "target_vocab", "targets"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(opts, name)}")
    for name in ("compare_dim", "dict_latents", "sweep_steps", "threads"):
        if getattr(opts, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(opts, name)}")
    if opts.lr <= 0 or opts.dict_lr <= 0 or opts.app_m_lr <= 0:
        raise ConfigError(f"learning rates must be > 0, got lr={opts.lr}, app_m_lr={opts.app_m_lr}, dict_lr={opts.dict_lr}")
    if not opts.target_scale > 0:
        raise ConfigError(f"target_scale must be > 0, got {opts.target_scale}")
    for name in ("flip_prob", "app_m_flip_prob"):
        if not 0 <= getattr(opts, name) < 0.5:
            raise ConfigError(f"{name} must be in [0, 0.5), got {getattr(opts, name)}")
    if not opts.log_eps > 0:
        raise ConfigError(f"log_eps must be > 0, got {opts.log_eps}")
    if opts.samples < opts.dict_batch_size:
        raise ConfigError(f"samples ({opts.samples}) must be at least one dictionary batch ({opts.dict_batch_size})")
    make_dag(opts.graph, opts.n_latents, opts.expected_edges, seed=0)  # a bad --graph fails before any work


def plan(opts: SimulateOptions) -> Plan:
    """Every trial the run will do, as specs (after `quick`); cheap, so tests can inspect it."""
    opts = effective_options(opts)
    validate(opts)
    seeds = [opts.seed + s for s in range(opts.seeds)]
    methods = resolve_methods(opts.methods)
    table_base = TrialSpec(
        n_latents=opts.n_latents, cardinality=opts.cardinality, graph=opts.graph, expected_edges=opts.expected_edges,
        prob_low=opts.prob_low, prob_high=opts.prob_high, observed=opts.observed, observed_order=opts.observed_order,
        flip_prob=opts.flip_prob, representation_dim=opts.representation_dim, hidden=opts.hidden, samples=opts.samples,
        steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, eval_pairs=opts.eval_pairs,
        counterfactual=opts.counterfactual, log_eps=opts.log_eps, methods=methods,
        method_options=parse_method_options(opts.method_options), dict_latents=opts.dict_latents,
        dict_steps=opts.dict_steps, dict_batch_size=opts.dict_batch_size, dict_lr=opts.dict_lr, controls=True,
        objective="diverse", target_vocab=opts.target_vocab, target_scale=opts.target_scale, n_targets=opts.targets)
    # App. M as literally as the paper allows: deterministic mixing, Adam 1e-4, the masked single bit.
    app_m_base = dataclasses.replace(table_base, objective="app_m", steps=opts.app_m_steps, lr=opts.app_m_lr,
                                     flip_prob=opts.app_m_flip_prob)
    table = {}
    for objective in objectives(opts):
        base = table_base if objective == "diverse" else app_m_base
        table[row_name(objective, opts.representation_dim)] = [dataclasses.replace(base, seed=s) for s in seeds]
        if objective == "app_m" and opts.compare_dim and opts.compare_dim != opts.representation_dim:
            table[row_name(objective, opts.compare_dim)] = [
                dataclasses.replace(base, representation_dim=opts.compare_dim, methods=(), method_options={}, seed=s)
                for s in seeds]
    # The sweeps reproduce I-Predict's Fig. 2: the plain 3 x `hidden` network, probes only.
    sweep_base = dataclasses.replace(app_m_base, representation_dim=opts.hidden, methods=(), method_options={},
                                     steps=opts.sweep_steps or opts.app_m_steps, controls=False)
    observed = {n: [dataclasses.replace(sweep_base, n_latents=opts.sweep_chain, graph="chain", observed=n, seed=s)
                    for s in seeds] for n in _ints(opts.sweep_observed, "sweep_observed")}
    graphs = {}
    for g in _names(opts.graph_types):
        make_dag(g, 2)  # fails early on a bad graph name
        for d in _ints(opts.graph_sizes, "graph_sizes"):
            graphs[(g, d)] = [dataclasses.replace(sweep_base, n_latents=d, graph=g,
                                                  observed=opts.graph_observed_per_latent * d, seed=s) for s in seeds]
    token = [TokenSpec(n_latents=opts.n_latents, cardinality=opts.cardinality, graph=opts.graph,
                       expected_edges=opts.expected_edges, prob_low=opts.prob_low, prob_high=opts.prob_high,
                       vocab=opts.token_vocab, length=opts.token_length, samples=opts.samples,
                       eval_samples=max(2 * opts.eval_pairs, 100), steps=opts.token_steps, log_eps=opts.log_eps, seed=s)
             for s in seeds] if opts.token_world else []
    return Plan(table, observed, graphs, token)


# ----------------------------------------------------------------------------- aggregation
def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


SCALARS = ("probe_accuracy", "bayes_accuracy", "r2_marginal_logposterior", "r2_joint_logposterior",
           "posterior_entropy", "distinct_contexts", "loss_first", "loss_last", "control_probe_accuracy",
           "control_r2_marginal_logposterior", "control_r2_joint_logposterior", "pcc_supervised_linear",
           "mcc_supervised_linear", "eval_target_loss", "bayes_target_loss", "pcc_supervised_best_f")


def aggregate(trials: list[dict]) -> dict:
    """Mean and std over seeds of every scalar and of every per-method score."""
    out: dict = {}
    for key in SCALARS:
        if key in trials[0]:
            out[key], out[key + "_std"] = _mean_std([t[key] for t in trials])
    for key in ("pcc", "pcc_heldout", "mcc", "pcc_probe", "control_pcc", "control_pcc_heldout", "control_mcc"):
        if key in trials[0]:
            stats = {m: _mean_std([t[key][m] for t in trials]) for m in trials[0][key]}
            out[key] = {m: s[0] for m, s in stats.items()}
            out[key + "_std"] = {m: s[1] for m, s in stats.items()}
    if "diversity" in trials[0]:
        out["diversity"] = _mean_leaves([t["diversity"] for t in trials])
    out["objective"] = trials[0].get("objective", "app_m")
    out["seeds"] = trials
    return out


def _mean_leaves(dicts: list[dict]):
    """Mean over seeds of every number in equally shaped nested dicts (booleans: all true; lists: per entry)."""
    first = dicts[0]
    if isinstance(first, dict):
        return {k: _mean_leaves([d[k] for d in dicts]) for k in first}
    if isinstance(first, bool):
        return all(dicts)
    if isinstance(first, list):
        return [_mean_leaves(list(v)) for v in zip(*dicts)]
    if isinstance(first, (int, float)) and all(isinstance(v, (int, float)) for v in dicts):
        return float(np.mean(dicts))
    return None if any(v is None for v in dicts) else first


def run_simulate(opts: SimulateOptions, log=print) -> dict:
    """Run every planned trial, write OUT/results.json and OUT/report.html; return the results."""
    t0 = time.perf_counter()
    the_plan = plan(opts)
    eff = effective_options(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    save_effective_config(eff, out)
    say = (lambda m: log(f"[conca simulate {time.perf_counter() - t0:5.0f}s] {m}")) if opts.progress else (lambda m: None)
    seconds: dict[str, float] = {}
    with thread_limits(eff.threads):
        table = {}
        for name, specs in the_plan.table.items():
            say(f"table, {specs[0].objective} objective: {eff.n_latents} latents, graph {eff.graph}, {eff.observed} "
                f"observed, representation width {specs[0].representation_dim}")
            table[name] = {**aggregate([run_trial(s, say) for s in specs]),
                           "representation_dim": specs[0].representation_dim}
        seconds["table"] = time.perf_counter() - t0
        observed_sweep = []
        for n, specs in the_plan.observed.items():
            say(f"Fig. 2 left: chain of {eff.sweep_chain}, {n} observed")
            observed_sweep.append({"observed": n, **aggregate([run_trial(s) for s in specs])})
        seconds["observed_sweep"] = time.perf_counter() - t0 - sum(seconds.values())
        graph_sweep = []
        for (g, d), specs in the_plan.graphs.items():
            say(f"Fig. 2 right: {g}, {d} latents, {specs[0].observed} observed")
            graph_sweep.append({"graph": g, "n_latents": d, "observed": specs[0].observed,
                                **aggregate([run_trial(s) for s in specs])})
        seconds["graph_sweep"] = time.perf_counter() - t0 - sum(seconds.values())
        token = None
        if the_plan.token:
            say(f"token world: {eff.token_length} tokens over a vocabulary of {eff.token_vocab}")
            token_trials = [run_token_trial(s, say) for s in the_plan.token]
            token = {k: _mean_std([t[k] for t in token_trials]) for k in
                     ("r2_marginal_logposterior", "r2_joint_logposterior", "next_token_loss", "bayes_next_token_loss")}
            token = {**{k: v[0] for k, v in token.items()}, **{k + "_std": v[1] for k, v in token.items()},
                     "per_position": _per_position(token_trials), "seeds": token_trials}
        seconds["token_world"] = time.perf_counter() - t0 - sum(seconds.values())
    headline_row = next(iter(table))  # the first objective at representation_dim
    headline = table[headline_row]
    results = {
        **{k: headline.get(k) for k in ("probe_accuracy", "probe_accuracy_std", "bayes_accuracy",
                                        "r2_marginal_logposterior", "r2_marginal_logposterior_std",
                                        "r2_joint_logposterior", "r2_joint_logposterior_std", "control_probe_accuracy",
                                        "control_r2_marginal_logposterior", "diversity")},
        **{k: headline.get(k, {}) for k in ("pcc", "pcc_std", "pcc_heldout", "pcc_heldout_std", "mcc", "mcc_std",
                                            "pcc_probe", "pcc_probe_std", "control_pcc")},
        "objective": headline["objective"], "headline_row": headline_row,
        "representation_dim": eff.representation_dim,
        "paper": {"probe_accuracy": PAPER_TABLE["probe_accuracy"][0], "probe_accuracy_std": PAPER_TABLE["probe_accuracy"][1],
                  "pcc": {m: v[0] for m, v in PAPER_TABLE["pcc"].items()},
                  "pcc_std": {m: v[1] for m, v in PAPER_TABLE["pcc"].items()}},
        "table": table, "observed_sweep": observed_sweep, "graph_sweep": graph_sweep, "token_world": token,
        "config": asdict(eff), "seconds": seconds, "elapsed_s": time.perf_counter() - t0,
    }
    results["differences"] = differences(results)
    atomic_write_json(out / "results.json", jsonable(results))
    write_report(out / "report.html", results, eff)
    say(f"done in {results['elapsed_s']:.0f}s: {out / 'report.html'}")
    return results


def _per_position(trials: list[dict]) -> list[dict]:
    out = []
    for rows in zip(*(t["per_position"] for t in trials)):
        entry = {"prefix_length": rows[0]["prefix_length"]}
        for key in ("r2_marginal_logposterior", "probe_accuracy", "bayes_accuracy", "posterior_entropy"):
            entry[key], entry[key + "_std"] = _mean_std([r[key] for r in rows])
        out.append(entry)
    return out
