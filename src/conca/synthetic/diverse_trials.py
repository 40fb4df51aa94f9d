"""One trial of the diverse objective (`conca.synthetic.diversity`): App. M's world and evaluation,
but one shared f(x) of every observable predicting `n_targets` tokens over `target_vocab` outcomes.

The evaluation is App. M's (counterfactual pairs differing in one concept, probe per concept, R² of
f → marginal log-posteriors, dictionaries against the truth), with the untrained network of the
same architecture and seed scored beside every number, and the diversity condition checked."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from conca.synthetic import checks
from conca.synthetic.diversity import DiverseWorld, best_features, concept_emission, diversity_checks
from conca.synthetic.posterior import posterior
from conca.synthetic.predictors import TargetMLP, representations, train_target_mlp
from conca.synthetic.trials import TrialSpec, _reference_columns, build_world, evaluation_set, score_methods


def build_diverse_world(spec: TrialSpec) -> DiverseWorld:
    """App. M's world of `spec` (same seed, same graph, conditionals and mixing) plus p(y|z) from its own stream."""
    world = build_world(spec)
    emission = concept_emission(world.latent, spec.target_vocab, spec.target_scale, np.random.default_rng([spec.seed, 13]))
    return DiverseWorld(world, emission, spec.n_targets)


def run_diverse_trial(spec: TrialSpec, log=lambda message: None) -> dict:
    t0 = time.perf_counter()
    dworld = build_diverse_world(spec)
    world, latent = dworld.world, dworld.latent
    rng = np.random.default_rng([spec.seed, 7])
    _, x, y = dworld.sample(spec.samples, rng)
    torch.manual_seed(spec.seed)
    model = TargetMLP(spec.observed, spec.target_vocab, spec.representation_dim, spec.hidden)
    untrained = copy.deepcopy(model) if spec.controls else None
    losses = train_target_mlp(model, x, y, spec.steps, spec.batch_size, spec.lr, seed=spec.seed)
    ev = evaluation_set(world, spec.eval_pairs, spec.counterfactual, rng)
    post = posterior(world, ev.x)  # every observable is context; the targets are not
    rows = [np.flatnonzero(ev.concept == i) if spec.counterfactual else np.arange(len(ev.z)) for i in range(latent.n_latents)]
    log_marg, log_joint = post.log_marginals(spec.log_eps), post.log_joint(spec.log_eps)

    def theory_checks(feats: np.ndarray) -> dict:
        probe = [checks.probe_accuracy(feats[r], ev.z[r, i], seed=spec.seed, groups=ev.groups[r]) for i, r in enumerate(rows)]
        return {"probe_accuracy": float(np.mean(probe)), "probe_per_concept": probe,
                "r2_marginal_logposterior": checks.linear_r2(feats, log_marg, seed=spec.seed, groups=ev.groups),
                "r2_joint_logposterior": checks.linear_r2(feats, log_joint, seed=spec.seed, groups=ev.groups)}

    f = representations(model, ev.x)
    result = {"seed": spec.seed, "objective": "diverse", "n_edges": latent.dag.n_edges, "n_states": latent.n_states,
              **theory_checks(f)}
    bayes = [float((post.map_marginals()[r, i] == ev.z[r, i]).mean()) for i, r in enumerate(rows)]
    # Bayes-optimal target loss on fresh targets of the evaluation contexts: the floor for the model.
    y_eval = dworld.targets(ev.z, rng)[:, 0]
    predictive = post.joint @ dworld.emission
    with torch.no_grad():
        model_loss = float(torch.nn.functional.cross_entropy(model(torch.as_tensor(ev.x)), torch.as_tensor(y_eval)))
    tail = max(1, len(losses) // 10)
    result.update({
        "bayes_accuracy": float(np.mean(bayes)), "posterior_entropy": float(post.entropy().mean()),
        "distinct_contexts": int(len(np.unique(ev.x, axis=0))),
        "loss_first": float(np.mean(losses[:tail])), "loss_last": float(np.mean(losses[-tail:])),
        "eval_target_loss": model_loss,
        "bayes_target_loss": float(-np.log(predictive[np.arange(len(y_eval)), y_eval]).mean()),
        "diversity": diversity_checks(latent, dworld.emission, model.head.weight.detach().numpy(), post.joint,
                                      log_marg, ev.groups, spec.seed),
    })
    if untrained is not None:
        control = theory_checks(representations(untrained, ev.x))
        result.update({f"control_{k}": v for k, v in control.items() if k != "probe_per_concept"})
    if spec.methods:
        train_post = posterior(world, x)
        result["pcc_supervised_best_f"] = _best_f_pcc(spec, dworld, train_post, post, rows)
        result.update(score_methods(spec, latent, representations(model, x), train_post.log_marginals(spec.log_eps),
                                    ev, f, post, rows))
        if untrained is not None:
            control = score_methods(spec, latent, representations(untrained, x), train_post.log_marginals(spec.log_eps),
                                    ev, representations(untrained, ev.x), post, rows)
            result.update({f"control_{k}": control[k] for k in ("pcc", "pcc_heldout", "mcc")})
    result["seconds"] = time.perf_counter() - t0
    log(f"diverse objective seed {spec.seed} width {spec.representation_dim}: probe {result['probe_accuracy']:.3f} "
        f"(untrained {result.get('control_probe_accuracy', float('nan')):.3f}, true-posterior argmax "
        f"{result['bayes_accuracy']:.3f}), R2 marginal {result['r2_marginal_logposterior']:.3f} (untrained "
        f"{result.get('control_r2_marginal_logposterior', float('nan')):.3f}, best width-{spec.representation_dim} f "
        f"{result['diversity']['oracle_r2_marginal_logposterior']:.3f}) [{result['seconds']:.0f}s]")
    return result


def _best_f_pcc(spec: TrialSpec, dworld: DiverseWorld, train_post, post, rows) -> float:
    """A PCC reference for this world at this width, free of training: the supervised affine read-out
    of the true marginal log-posteriors from the best width-m f (`best_features`, no network), fitted on
    the training contexts and scored like the dictionaries on the evaluation pairs. Not a strict bound
    (least squares in the log domain; the PCC is scored in the probability domain)."""
    train_f, basis = best_features(train_post.joint, dworld.emission, spec.representation_dim)
    eval_f, _ = best_features(post.joint, dworld.emission, spec.representation_dim, basis)
    readout = checks.fit_linear_map(train_f, train_post.log_marginals(spec.log_eps))
    refs = _reference_columns(dworld.latent.cardinalities)
    stacked = post.stacked_marginals()
    if spec.counterfactual:
        return checks.score_latents([stacked[rows[i], col] for i, _, col in refs],
                                    [readout(eval_f[rows[i]]) for i, _, _ in refs], spec.log_eps).pcc
    return checks.score_latents(stacked[:, [col for _, _, col in refs]], readout(eval_f), spec.log_eps).pcc
