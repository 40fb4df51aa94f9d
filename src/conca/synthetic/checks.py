"""Checks of the identifiability theory on a world with known posteriors.

* Linear-probe accuracy per concept: `sklearn.linear_model.LogisticRegression` on f(x) (standardised),
  fitted on one part of the samples and scored on the held-out rest (I-Predict Fig. 2, ConCA App. M).
* R² of a least-squares affine map from f(x) to the stacked marginal log-posteriors
  [log p(z_i = v | x)]_{i, v} (ConCA Theorem 2.2: f(x) ≈ A [log p(z_i|x)]_i + b, so the log-posteriors
  are an affine function of f whenever A has full column rank) and to the joint log-posterior
  [log p(z = m | x)]_m (I-Predict Theorem 3.1). Fitted on one part, scored on the held-out rest:
      R² = 1 - sum (Y - Ŷ)² / sum (Y - mean_train(Y))²     (pooled over all target columns).
* Dictionary scores against the truth, with `conca.evaluation.matching`:
  - PCC: the papers' metric (SPEC §1.1) with the truth as reference: per concept i,
    Pearson(p(z_i = v | x), exp(ẑ_d)) over the samples, Hungarian matching, mean of the matched
    correlations. p = exp(true log-posterior) and exp(ẑ) are both in the probability domain, so
    latents equal to the exact log-posteriors score 1.
  - MCC: the ICA convention: |Pearson(log p(z_i = v | x), ẑ_d)| (no exp), Hungarian matching on the
    absolute correlations, mean of the matched ones.
  - PCC against the probe: §1.1 exactly, with the probe's log-odds (decision_function) as reference,
    as in the papers' real-data evaluation where the truth is unknown.
  - PCC held out: the PCC with the matching chosen on 4 of 5 folds of each concept's samples (by
    counterfactual pair) and the correlation scored on the fifth (`conca.evaluation.heldout`). The
    reference is the truth, not a fitted probe, and the dictionaries here have as many latents as
    references, so the in-sample PCC's selection effect is small; the held-out value shows how small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from conca.errors import ConfigError, InputError, ShapeError
from conca.evaluation.heldout import heldout_matching, reference_splits
from conca.evaluation.matching import MatchResult, hungarian_match, mean_matched_correlation, transform_latents


def split_indices(n: int, test_fraction: float = 0.5, seed: int = 0,
                  groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/test split of range(n); with `groups` (n,), members of a group stay together
    (so both halves of a counterfactual pair land on the same side)."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    if groups is None:
        perm = rng.permutation(n)
        n_test = min(n - 1, max(1, int(round(n * test_fraction))))
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    groups = np.asarray(groups)
    unique = rng.permutation(np.unique(groups))
    n_test = min(len(unique) - 1, max(1, int(round(len(unique) * test_fraction))))
    test = np.isin(groups, unique[:n_test])
    return np.flatnonzero(~test), np.flatnonzero(test)


def _features(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ShapeError(f"representations must be (samples, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("representations contain NaN or infinite values")
    return x


def fit_probe(features: np.ndarray, labels: np.ndarray, max_iter: int = 1000):
    """A standardising LogisticRegression pipeline (the papers' probe; scaling only helps lbfgs converge)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:  # pragma: no cover
        raise ConfigError("linear probes need scikit-learn: pip install scikit-learn") from exc

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter)).fit(_features(features), labels)


def probe_accuracy(features: np.ndarray, labels: np.ndarray, test_fraction: float = 0.5, seed: int = 0,
                   groups: np.ndarray | None = None) -> float:
    """Held-out accuracy of a linear probe predicting `labels` (N,) from `features` (N, m)."""
    features, labels = _features(features), np.asarray(labels)
    if labels.shape != (len(features),):
        raise ShapeError(f"need one label per sample: {len(features)} samples, labels of shape {labels.shape}")
    train, test = split_indices(len(features), test_fraction, seed, groups)
    if len(np.unique(labels[train])) < 2:
        # A constant training label: the best linear rule predicts that constant.
        return float((labels[test] == labels[train][0]).mean())
    return float(fit_probe(features[train], labels[train]).score(features[test], labels[test]))


def linear_r2(features: np.ndarray, targets: np.ndarray, test_fraction: float = 0.5, seed: int = 0,
              groups: np.ndarray | None = None) -> float:
    """Held-out R² of the least-squares affine map features -> targets, pooled over columns."""
    x, y = _features(features), np.asarray(targets, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape[0] != x.shape[0]:
        raise ShapeError(f"features {x.shape} and targets {y.shape} must have the same number of rows")
    train, test = split_indices(len(x), test_fraction, seed, groups)
    design = np.hstack([x, np.ones((len(x), 1))])
    # lstsq's minimum-norm solution copes with collinear (e.g. dead ReLU) feature columns.
    coef, *_ = np.linalg.lstsq(design[train], y[train], rcond=None)
    residual = ((y[test] - design[test] @ coef) ** 2).sum()
    total = ((y[test] - y[train].mean(0)) ** 2).sum()
    if total <= 0:
        return 1.0 if residual <= 1e-12 else 0.0
    return float(1.0 - residual / total)


def fit_linear_map(features: np.ndarray, targets: np.ndarray):
    """The least-squares affine map features -> targets, as a function of new features."""
    x, y = _features(features), np.asarray(targets, dtype=np.float64)
    design = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, y.reshape(len(x), -1), rcond=None)
    return lambda new: np.hstack([_features(new), np.ones((len(new), 1))]) @ coef


# ------------------------------------------------------------------------------ dictionaries
@dataclass
class LatentScore:
    """How one set of latents matches the true concepts."""

    pcc: float  # mean matched Pearson(p, exp(ẑ)) (SPEC §1.1 with the truth as reference)
    mcc: float  # mean matched |Pearson(log p, ẑ)| (ICA convention)
    pcc_probe: float | None = None  # §1.1 with a linear probe's log-odds as reference
    pcc_heldout: float | None = None  # the PCC's matching chosen on other folds than it is scored on
    per_concept: list[float] = field(default_factory=list)
    assignment: list[int] = field(default_factory=list)


def heldout_pcc(probabilities: "list[np.ndarray] | np.ndarray", latents: "list[np.ndarray] | np.ndarray",
                groups: list[np.ndarray] | None = None, folds: int = 5, seed: int = 0) -> float | None:
    """Held-out PCC against the true posteriors (folds by `groups`, e.g. counterfactual pairs; by
    sample without); None where a concept has too few samples for the folds."""
    if not isinstance(probabilities, list):
        probs = np.asarray(probabilities, dtype=np.float64)
        probabilities, latents = [probs[:, i] for i in range(probs.shape[1])], [latents] * probs.shape[1]
    groups = groups or [np.arange(len(p)) for p in probabilities]
    try:
        splits = reference_splits([np.asarray(p, dtype=np.float64) for p in probabilities], groups,
                                  [str(i) for i in range(len(probabilities))], folds, seed)
    except InputError:
        return None
    return heldout_matching([transform_latents(z, "exp") for z in latents], splits)["mpc_heldout"]


def score_latents(probabilities: "list[np.ndarray] | np.ndarray", latents: "list[np.ndarray] | np.ndarray",
                  eps: float = 1e-6, probe_logits: "list[np.ndarray] | np.ndarray | None" = None,
                  groups: list[np.ndarray] | None = None) -> LatentScore:
    """Score latents against true posteriors.

    Either per-concept samples (lists: probabilities[i] (N_i,) = p(z_i = v_i | x) over concept i's
    own samples, latents[i] (N_i, D)), as in the papers' counterfactual pairs, or shared samples
    (probabilities (N, C), latents (N, D)). `groups[i]` (N_i,): the pair of each sample, which the
    held-out folds keep together."""
    per_concept = isinstance(probabilities, list)
    if per_concept != isinstance(latents, list):
        raise InputError("give probabilities and latents both as per-concept lists or both as arrays")
    if per_concept:
        logs = [np.log(np.maximum(np.asarray(p, dtype=np.float64), eps)) for p in probabilities]
        latents = [np.asarray(z, dtype=np.float64) for z in latents]
        probs = [np.asarray(p, dtype=np.float64) for p in probabilities]
    else:
        probs = np.asarray(probabilities, dtype=np.float64)
        logs = np.log(np.maximum(probs, eps))
        latents = np.asarray(latents, dtype=np.float64)
    pcc = mean_matched_correlation(probs, latents, transform="exp")
    # MCC: signed correlations from the shared Pearson code, then Hungarian on their magnitudes.
    signed = mean_matched_correlation(logs, latents, transform="identity").correlations
    mcc = hungarian_match(np.abs(signed))
    probe = None
    if probe_logits is not None:
        probe = mean_matched_correlation(probe_logits if per_concept else np.asarray(probe_logits), latents,
                                         transform="exp").mpc
    return LatentScore(pcc.mpc, mcc.mpc, probe, per_concept=[float(v) for v in pcc.matched],
                       assignment=[int(a) for a in pcc.assignment],
                       pcc_heldout=heldout_pcc(probs, latents, groups if per_concept else None))


def adapted_method_options(method: str, n_latents: int, steps: int, overrides: dict | None = None) -> dict:
    """Defaults of registered methods made to fit a tiny dictionary and a short run (the method's
    `config_for` with fit_width): the target L0 (TopK-style k) is capped at n_latents // 2 (defaults
    of 32+ exceed the ~10 latents here), GroupNorm's num_groups becomes gcd(default, n_latents) so it
    divides the width, and sparsity warm-ups are capped at a fifth of training (as in `conca sweep`).
    The widths are left to the caller. `overrides` (from the user) win."""
    from conca.dictionaries.base import get_method

    config = get_method(method).config_for(n_latents, n_latents, steps=steps, fit_width=True)
    opts = {key: value for key, value in config.items() if key not in ("d_in", "n_latents")}
    opts.update(overrides or {})
    return opts


def train_dictionaries(methods: list[str], features: np.ndarray, n_latents: int, steps: int = 1000,
                       batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                       method_options: dict[str, dict] | None = None) -> dict:
    """Train every method on the same batches of `features` with conca's trainer; {name: Dictionary}."""
    from conca.activations.stream import TensorSource
    from conca.dictionaries.base import create
    from conca.training.trainer import TrainConfig, train

    if not methods:
        return {}
    x = torch.as_tensor(_features(features), dtype=torch.float32)
    if len(x) < batch_size:
        raise ConfigError(f"{len(x)} training representations are fewer than one dictionary batch ({batch_size})")
    torch.manual_seed(seed)
    family = {m: create(m, d_in=x.shape[1], n_latents=n_latents,
                        **adapted_method_options(m, n_latents, steps, (method_options or {}).get(m)))
              for m in methods}
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=False,
                      warmup_steps=min(50, max(1, steps // 10)), eval_every=steps, checkpoint_every=10**9,
                      init_tokens=min(8192, len(x)), eval_tokens=min(1024, len(x)))
    return train(family, TensorSource(x), cfg).dictionaries


@torch.no_grad()
def encode(dictionary, features: np.ndarray) -> np.ndarray:
    dictionary.eval()
    return dictionary.encode(torch.as_tensor(_features(features), dtype=torch.float32)).double().numpy()


def score_dictionaries(dictionaries: dict, features: "list[np.ndarray] | np.ndarray",
                       probabilities: "list[np.ndarray] | np.ndarray", eps: float = 1e-6,
                       probe_logits: "list[np.ndarray] | np.ndarray | None" = None,
                       groups: list[np.ndarray] | None = None) -> dict[str, LatentScore]:
    """Encode the evaluation representations with every dictionary and score them (`score_latents`)."""
    out = {}
    for name, d in dictionaries.items():
        latents = [encode(d, f) for f in features] if isinstance(features, list) else encode(d, features)
        if not np.isfinite(np.concatenate(latents) if isinstance(latents, list) else latents).all():
            raise InputError(f"dictionary {name} produced NaN/inf latents (training diverged: lower the dictionary lr)")
        out[name] = score_latents(probabilities, latents, eps, probe_logits, groups)
    return out


__all__ = ["LatentScore", "MatchResult", "adapted_method_options", "encode", "fit_linear_map", "fit_probe", "heldout_pcc",
           "linear_r2", "probe_accuracy", "score_dictionaries", "score_latents", "split_indices", "train_dictionaries"]
