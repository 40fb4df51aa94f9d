"""The diverse objective's ceilings without any training: for worlds of `conca simulate`'s table
(5 binary latents, ER DAG with 10 expected edges), the best width-m f of a softmax model matching
Bayes (`conca.synthetic.diversity.best_features`) and what it allows on App. M's counterfactual
evaluation: Bayes probe accuracy (true posterior's argmax), R² of the best f to the marginal
log-posteriors, and the PCC of its supervised affine read-out of the log-posteriors (a reference for the
dictionaries' PCC, not a strict bound: the read-out is least squares in the log domain, the PCC is
scored in the probability domain).

    PYTHONPATH=src python scripts/lab_diversity_ceiling.py [--seeds 3]
    PYTHONPATH=src python scripts/lab_diversity_ceiling.py --dictionaries conca_layernorm_softplus,p_anneal

With --dictionaries, the default world only: those dictionaries trained on the best width-m f itself
(no network), scored like `conca simulate` scores them: what the PCC can reach when f is exactly the
softmax model that matches Bayes best.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import numpy as np

from conca.synthetic.diverse_trials import _best_f_pcc, build_diverse_world
from conca.synthetic.diversity import best_features
from conca.synthetic import checks
from conca.synthetic.posterior import posterior
from conca.synthetic.trials import TrialSpec, evaluation_set


def _sampled(spec: TrialSpec):
    """The world, the evaluation set, the exact posteriors of its and the training contexts, and each concept's rows."""
    dworld = build_diverse_world(spec)
    rng = np.random.default_rng([spec.seed, 7])
    _, x, _ = dworld.sample(spec.samples, rng)
    ev = evaluation_set(dworld.world, spec.eval_pairs, True, rng)
    post, train_post = posterior(dworld.world, ev.x), posterior(dworld.world, x)
    return dworld, ev, post, train_post, [np.flatnonzero(ev.concept == i) for i in range(dworld.latent.n_latents)]


def ceiling(spec: TrialSpec) -> tuple[float, float, float]:
    dworld, ev, post, train_post, rows = _sampled(spec)
    f, _ = best_features(post.joint, dworld.emission, spec.representation_dim)
    bayes = np.mean([(post.map_marginals()[r, i] == ev.z[r, i]).mean() for i, r in enumerate(rows)])
    r2 = checks.linear_r2(f, post.log_marginals(spec.log_eps), seed=spec.seed, groups=ev.groups)
    return float(bayes), r2, _best_f_pcc(spec, dworld, train_post, post, rows)


def dictionaries_on_best_f(spec: TrialSpec) -> dict:
    from conca.synthetic.trials import score_methods

    dworld, ev, post, train_post, rows = _sampled(spec)
    train_f, basis = best_features(train_post.joint, dworld.emission, spec.representation_dim)
    eval_f, _ = best_features(post.joint, dworld.emission, spec.representation_dim, basis)
    return score_methods(spec, dworld.latent, train_f, train_post.log_marginals(spec.log_eps), ev, eval_f, post, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dictionaries", default="")
    args = parser.parse_args()
    if args.dictionaries:
        from conca.runtime.threads import thread_limits

        with thread_limits(1):
            for s in range(args.seeds):
                spec = TrialSpec(observed=12, flip_prob=0.05, objective="diverse", seed=s, dict_steps=600,
                                 methods=tuple(args.dictionaries.split(",")))
                out = dictionaries_on_best_f(spec)
                print(f"seed {s}: PCC {({m: round(v, 3) for m, v in out['pcc'].items()})}, supervised affine read-out "
                      f"{out['pcc_supervised_linear']:.3f}", flush=True)
        return
    print("observed flip scale | Bayes probe | R² best f | PCC best f read-out   (means over seeds)")
    for observed, flip, scale in itertools.product((8, 12, 24), (0.05, 0.15), (1.5, 3.0)):
        base = TrialSpec(observed=observed, flip_prob=flip, target_scale=scale, objective="diverse", samples=5000)
        values = np.mean([ceiling(dataclasses.replace(base, seed=s)) for s in range(args.seeds)], axis=0)
        print(f"{observed:8d} {flip:4.2f} {scale:5.1f} | {values[0]:.3f}       | {values[1]:.3f}     | {values[2]:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
