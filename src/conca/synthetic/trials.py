"""One trial of the synthetic lab: a world, a predictor trained on it by next-token prediction, and
the checks of its representation against the exact posteriors (plus any dictionaries trained on
it). A trial is a pure function of its spec (seeded), returning plain numbers; `conca simulate`
plans, runs and aggregates them."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from conca.errors import ConfigError
from conca.synthetic import checks
from conca.synthetic.diversity import appm_diversity
from conca.synthetic.posterior import masked_visibility, posterior, token_posteriors
from conca.synthetic.predictors import (CausalTransformer, MaskedMLP, representations, train_causal_transformer,
                                        train_masked_mlp)
from conca.synthetic.world import SyntheticWorld, make_dag, make_world, random_latent_model, token_world

OBJECTIVES = ("diverse", "app_m")
TOKEN_CONCENTRATION = 2.0  # emission logits' scale in the token world (not a paper quantity)
TOKEN_D_MODEL = 64


@dataclass
class TrialSpec:
    """One world + predictor + checks (+ dictionaries)."""

    n_latents: int = 5
    cardinality: int = 2
    graph: str = "er"
    expected_edges: float = 10.0
    prob_low: float = 0.2
    prob_high: float = 0.8
    observed: int = 8
    observed_order: str = "random"
    flip_prob: float = 0.0
    representation_dim: int = 10
    hidden: int = 256
    samples: int = 20000
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-4
    eval_pairs: int = 500
    counterfactual: bool = True
    log_eps: float = 1e-6
    seed: int = 0
    methods: tuple[str, ...] = ()
    method_options: dict = field(default_factory=dict)
    dict_latents: int = 0
    dict_steps: int = 1000
    dict_batch_size: int = 256
    dict_lr: float = 1e-3
    controls: bool = False  # also score the untrained network (a capacity control)
    # "app_m": ConCA App. M's masked-bit objective (run_trial); "diverse": one shared f predicting
    # `n_targets` tokens over `target_vocab` outcomes (conca.synthetic.diversity, run_diverse_trial).
    objective: str = "app_m"
    target_vocab: int = 32
    target_scale: float = 1.5
    n_targets: int = 8


@dataclass
class TokenSpec:
    n_latents: int = 5
    cardinality: int = 2
    graph: str = "er"
    expected_edges: float = 10.0
    prob_low: float = 0.2
    prob_high: float = 0.8
    vocab: int = 16
    length: int = 12
    concentration: float = TOKEN_CONCENTRATION
    d_model: int = TOKEN_D_MODEL
    samples: int = 20000
    eval_samples: int = 1000
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    log_eps: float = 1e-6
    seed: int = 0


def build_world(spec: TrialSpec) -> SyntheticWorld:
    return make_world(spec.n_latents, spec.graph, spec.expected_edges, spec.cardinality, spec.prob_low,
                      spec.prob_high, spec.observed, spec.observed_order, spec.flip_prob, seed=spec.seed)


@dataclass
class EvalSet:
    """Evaluation samples; `concept[n]` is the concept pair n belongs to (-1: observational)."""

    z: np.ndarray
    x: np.ndarray
    masked: np.ndarray
    groups: np.ndarray
    concept: np.ndarray


def evaluation_set(world: SyntheticWorld, n_pairs: int, counterfactual: bool, rng: np.random.Generator) -> EvalSet:
    """Counterfactual pairs (z, z') differing only in concept i, n_pairs per concept, both halves
    of a pair sharing the masked variable (ConCA App. M); or 2·n_pairs·d observational samples."""
    d, n_obs = world.latent.n_latents, world.mixing.n_observed
    if counterfactual:
        zs, masks, groups, concept = [], [], [], []
        for i in range(d):
            z0 = world.latent.sample(n_pairs, rng)
            z1 = world.latent.counterfactual(z0, i, rng)
            m = rng.integers(n_obs, size=n_pairs)
            zs += [z0, z1]
            masks += [m, m]
            ids = i * n_pairs + np.arange(n_pairs)
            groups += [ids, ids]
            concept += [np.full(2 * n_pairs, i)]
        z = np.concatenate(zs)
        return EvalSet(z, world.observe(z, rng), np.concatenate(masks), np.concatenate(groups), np.concatenate(concept))
    n = 2 * n_pairs * d
    z = world.latent.sample(n, rng)
    return EvalSet(z, world.observe(z, rng), rng.integers(n_obs, size=n), np.arange(n), np.full(n, -1))


def _reference_columns(cardinalities: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(concept, value, column in the stacked marginals) for values 1..k-1 of each concept: value 0
    is determined by the others (for a binary concept, one reference p(z_i = 1 | x))."""
    offsets = np.concatenate([[0], np.cumsum(cardinalities)[:-1]])
    return [(i, v, int(offsets[i] + v)) for i, k in enumerate(cardinalities) for v in range(1, k)]


def run_trial(spec: TrialSpec, log=lambda message: None) -> dict:
    """Train the predictor of `spec.objective` on one world and check it against the exact posteriors:
    App. M's masked-prediction MLP here, or the diverse objective (`diverse_trials.run_diverse_trial`)."""
    if spec.objective == "diverse":
        from conca.synthetic.diverse_trials import run_diverse_trial  # it builds on this module

        return run_diverse_trial(spec, log)
    if spec.objective != "app_m":
        raise ConfigError(f"unknown objective {spec.objective!r}: choose one of {', '.join(OBJECTIVES)}")
    t0 = time.perf_counter()
    world = build_world(spec)
    rng = np.random.default_rng([spec.seed, 7])
    _, x = world.sample(spec.samples, rng)
    torch.manual_seed(spec.seed)
    model = MaskedMLP(spec.observed, spec.representation_dim, spec.hidden)
    untrained = copy.deepcopy(model) if spec.controls else None
    losses = train_masked_mlp(model, x, spec.steps, spec.batch_size, spec.lr, seed=spec.seed)
    ev = evaluation_set(world, spec.eval_pairs, spec.counterfactual, rng)
    f = representations(model, ev.x, ev.masked)
    post = posterior(world, ev.x, masked_visibility(spec.observed, ev.masked))
    latent = world.latent
    rows = [np.flatnonzero(ev.concept == i) if spec.counterfactual else np.arange(len(ev.z)) for i in range(latent.n_latents)]
    log_marg, log_joint = post.log_marginals(spec.log_eps), post.log_joint(spec.log_eps)

    def theory_checks(feats: np.ndarray) -> tuple[list[float], float, float]:
        probe = [checks.probe_accuracy(feats[r], ev.z[r, i], seed=spec.seed, groups=ev.groups[r]) for i, r in enumerate(rows)]
        return (probe, checks.linear_r2(feats, log_marg, seed=spec.seed, groups=ev.groups),
                checks.linear_r2(feats, log_joint, seed=spec.seed, groups=ev.groups))

    probe, r2_marg, r2_joint = theory_checks(f)
    # "Accuracy of the true posterior's argmax": Bayes-optimal for observational samples; on
    # counterfactual pairs (not drawn from p(z)) a probe can beat it slightly.
    bayes = [float((post.map_marginals()[r, i] == ev.z[r, i]).mean()) for i, r in enumerate(rows)]
    tail = max(1, len(losses) // 10)
    contexts = np.where(masked_visibility(spec.observed, ev.masked) == 1, ev.x, 2)
    result = {
        "seed": spec.seed, "objective": "app_m", "n_edges": latent.dag.n_edges, "n_states": latent.n_states,
        "probe_accuracy": float(np.mean(probe)), "probe_per_concept": probe, "bayes_accuracy": float(np.mean(bayes)),
        "r2_marginal_logposterior": r2_marg, "r2_joint_logposterior": r2_joint,
        "posterior_entropy": float(post.entropy().mean()),
        # Contexts (visible values + mask) the evaluation holds: with width >= this many, any injective f
        # is trivially linear in anything, which the untrained control makes visible.
        "distinct_contexts": int(len(np.unique(contexts, axis=0))),
        "loss_first": float(np.mean(losses[:tail])), "loss_last": float(np.mean(losses[-tail:])),
    }
    if untrained is not None:
        probe0, r2_marg0, r2_joint0 = theory_checks(representations(untrained, ev.x, ev.masked))
        result.update({"control_probe_accuracy": float(np.mean(probe0)), "control_r2_marginal_logposterior": r2_marg0,
                       "control_r2_joint_logposterior": r2_joint0})
    result["diversity"] = appm_diversity(world, model.head.weight.detach().numpy(), post.joint)
    if spec.methods:
        train_masked = rng.integers(spec.observed, size=len(x))
        train_f = representations(model, x, train_masked)
        train_post = posterior(world, x, masked_visibility(spec.observed, train_masked))
        result.update(score_methods(spec, latent, train_f, train_post.log_marginals(spec.log_eps), ev, f, post, rows))
        if untrained is not None:  # the same dictionaries on the untrained network's f: the PCC's control
            control = score_methods(spec, latent, representations(untrained, x, train_masked),
                                    train_post.log_marginals(spec.log_eps), ev, representations(untrained, ev.x, ev.masked),
                                    post, rows)
            result.update({f"control_{k}": control[k] for k in ("pcc", "pcc_heldout", "mcc")})
    result["seconds"] = time.perf_counter() - t0
    log(f"seed {spec.seed} width {spec.representation_dim}: probe {result['probe_accuracy']:.3f} "
        f"(true-posterior argmax {result['bayes_accuracy']:.3f}), R2 marginal {result['r2_marginal_logposterior']:.3f}, "
        f"joint {result['r2_joint_logposterior']:.3f} [{result['seconds']:.0f}s]")
    return result


def score_methods(spec: TrialSpec, latent, train_f: np.ndarray, train_log_marginals: np.ndarray, ev: EvalSet,
                  f: np.ndarray, post, rows) -> dict:
    """Dictionaries trained on the training representations, scored on the evaluation ones against the
    true posteriors; plus the supervised affine read-out of the true log-posteriors (a reference)."""
    n_latents = spec.dict_latents or latent.n_marginals
    dictionaries = checks.train_dictionaries(list(spec.methods), train_f, n_latents, spec.dict_steps,
                                             spec.dict_batch_size, spec.dict_lr, spec.seed, spec.method_options)
    stacked = post.stacked_marginals()
    refs = _reference_columns(latent.cardinalities)
    if spec.counterfactual:
        probs = [stacked[rows[i], col] for i, _, col in refs]
        feats = [f[rows[i]] for i, _, _ in refs]
        logits = [_probe_logits(f[rows[i]], ev.z[rows[i], i], v) for i, v, _ in refs]
    else:
        probs = stacked[:, [col for _, _, col in refs]]
        feats = f
        logits = np.stack([_probe_logits(f, ev.z[:, i], v) for i, v, _ in refs], axis=1)
    groups = [ev.groups[rows[i]] for i, _, _ in refs] if spec.counterfactual else None  # pairs stay in one fold
    scores = checks.score_dictionaries(dictionaries, feats, probs, spec.log_eps, logits, groups)
    # Supervised upper reference: the least-squares affine read-out of the true marginal
    # log-posteriors, fitted on the training representations, applied to the evaluation ones.
    readout = checks.fit_linear_map(train_f, train_log_marginals)
    oracle = checks.score_latents(probs, [readout(v) for v in feats] if isinstance(feats, list) else readout(feats),
                                  spec.log_eps)
    return {"pcc": {m: s.pcc for m, s in scores.items()}, "mcc": {m: s.mcc for m, s in scores.items()},
            "pcc_supervised_linear": oracle.pcc, "mcc_supervised_linear": oracle.mcc,
            "pcc_probe": {m: s.pcc_probe for m, s in scores.items()},
            "pcc_heldout": {m: s.pcc_heldout for m, s in scores.items()},
            "pcc_per_concept": {m: s.per_concept for m, s in scores.items()}}


def _probe_logits(features: np.ndarray, labels: np.ndarray, value: int) -> np.ndarray:
    """SPEC §1.1: a probe fitted in-sample; its decision function for `value` is the reference."""
    if len(np.unique(labels)) < 2:
        return np.zeros(len(labels))
    probe = checks.fit_probe(features, labels)
    scores = probe.decision_function(features)
    if scores.ndim == 1:
        return scores if value == 1 else -scores
    classes = list(probe.classes_)
    return scores[:, classes.index(value)] if value in classes else np.zeros(len(labels))


def run_token_trial(spec: TokenSpec, log=lambda message: None) -> dict:
    """Train a causal transformer on the token world; R² of f(prefix) -> log-posteriors by prefix length."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([spec.seed, 11])
    dag = make_dag(spec.graph, spec.n_latents, spec.expected_edges, rng)
    latent = random_latent_model(dag, spec.cardinality, spec.prob_low, spec.prob_high, rng)
    world = token_world(latent, spec.vocab, spec.length, spec.concentration, rng)
    _, tokens = world.sample(spec.samples, rng)
    torch.manual_seed(spec.seed)
    model = CausalTransformer(spec.vocab, spec.length, spec.d_model)
    losses = train_causal_transformer(model, tokens, spec.steps, spec.batch_size, spec.lr, seed=spec.seed)
    z, test = world.sample(spec.eval_samples, rng)
    f = representations(model, test)  # (N, T, dim): position s has seen s tokens
    posts = token_posteriors(world, test)
    # Bayes-optimal next-token loss: -log sum_m p(m | t_<=s) p(t_{s+1} | m), the floor for the model.
    bayes_loss = float(np.mean([-np.log((posts[s].joint * world.emission[:, test[:, s]].T).sum(1)).mean()
                                for s in range(spec.length)]))
    with torch.no_grad():
        logits = model(torch.as_tensor(test))
        model_loss = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.as_tensor(test).flatten()))
    n, T = test.shape
    groups = np.repeat(np.arange(n), T)  # a sequence's positions stay on one side of the split
    pooled_f = f.reshape(n * T, -1)
    marg = np.concatenate([posts[s].log_marginals(spec.log_eps)[:, None] for s in range(T)], axis=1).reshape(n * T, -1)
    joint = np.concatenate([posts[s].log_joint(spec.log_eps)[:, None] for s in range(T)], axis=1).reshape(n * T, -1)
    per_position = []
    for s in range(1, T):
        per_position.append({
            "prefix_length": s,
            "r2_marginal_logposterior": checks.linear_r2(f[:, s], posts[s].log_marginals(spec.log_eps), seed=spec.seed),
            "probe_accuracy": float(np.mean([checks.probe_accuracy(f[:, s], z[:, i], seed=spec.seed)
                                             for i in range(latent.n_latents)])),
            "bayes_accuracy": float((posts[s].map_marginals() == z).mean()),
            "posterior_entropy": float(posts[s].entropy().mean()),
        })
    result = {
        "seed": spec.seed,
        "r2_marginal_logposterior": checks.linear_r2(pooled_f, marg, seed=spec.seed, groups=groups),
        "r2_joint_logposterior": checks.linear_r2(pooled_f, joint, seed=spec.seed, groups=groups),
        "next_token_loss": model_loss, "bayes_next_token_loss": bayes_loss,
        "loss_first": float(np.mean(losses[:max(1, len(losses) // 10)])),
        "per_position": per_position, "seconds": time.perf_counter() - t0,
    }
    log(f"token world seed {spec.seed}: R2 marginal {result['r2_marginal_logposterior']:.3f}, joint "
        f"{result['r2_joint_logposterior']:.3f}, loss {model_loss:.3f} (Bayes {bayes_loss:.3f}) [{result['seconds']:.0f}s]")
    return result
