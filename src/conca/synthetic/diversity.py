"""A world and objective that satisfy the diversity condition, and numerical checks of the condition.

ConCA Thm 2.2 / I-Predict Thm 3.1 assume a softmax model p(y|x) ∝ exp(f(x)ᵀg(y)) that matches Bayes,
with *many* outcomes y per context whose g(y_k) − g(y_0) span the representation (diversity), each
only weakly informative about z (regularity), while the context pins z down (H(z|x) → 0). ConCA
App. M's masked-bit objective gives each context one binary target: the loss constrains f along the
single direction g(j,1) − g(j,0), so the condition fails by construction (`appm_diversity`).

The diverse world (`DiverseWorld`) keeps App. M's context side exactly (one-hot of the joint state →
random permutations → bits, here with a small flip noise so p(x|z) is stochastic) and changes only
the target: every sample carries `n_targets` tokens y drawn i.i.d. from p(y|z) over `vocab` outcomes,
    p(y | z) = softmax_y( Σ_i W_i[z_i, y] ),   W_i[v, y] ~ N(0, scale²)   (log-additive over concepts),
one shared f(x) predicting all of them. Log-additive emissions are a choice of this lab [not a paper
quantity]: with joint-state-wise random logits, log p(y|x) has rank ≈ M across contexts and a width-m
softmax cannot match Bayes at all (`predictive_spectrum` measures this for any world).

Checks (`diversity_checks`), all from the exact world and the trained head:
* L (posterior side, I-Predict §2.2): columns p(z|y_k) − p(z|y_0) over the M joint states, and the
  per-concept version p(z_i|y_k) − p(z_i|y_0); numerical rank and condition number.
* L̂ (model side, ConCA Thm 2.2 (i)): columns g(y_k) − g(y_0) of the trained head; rank and σ_1/σ_m.
* ε of approximate invertibility (Def. 2.1/4.1): 1 − E_x max_z p(z|x); and E_x H(z|x).
* Regularity: max and mean over k of TV(p(z|y_k), p(z|y_0)).
* The Bayes predictive log-ratios log p(y_k|x) − log p(y_0|x) over evaluation contexts: the share of
  their variance beyond m singular directions (what no width-m f can fit), and the R² of the best
  width-m f (their top-m principal subspace) to the marginal log-posteriors: the theorem's ceiling here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conca.errors import ConfigError, ShapeError
from conca.synthetic.dag import _rng
from conca.synthetic.world import LatentModel, SyntheticWorld

RANK_TOL = 1e-6  # singular values below RANK_TOL * sigma_1 count as zero


def concept_emission(latent: LatentModel, vocab: int, scale: float,
                     seed: "int | np.random.Generator | None" = None) -> np.ndarray:
    """(M, vocab) p(y | joint state) = softmax(Σ_i W_i[z_i]), W_i ~ N(0, scale²) per concept value."""
    if vocab < 2:
        raise ConfigError(f"the target vocabulary needs at least 2 outcomes, got {vocab}")
    if not scale > 0:
        raise ConfigError(f"target_scale must be > 0, got {scale}")
    rng = _rng(seed)
    states = latent.states()
    logits = np.zeros((latent.n_states, vocab))
    for i, k in enumerate(latent.cardinalities):
        logits += (scale * rng.standard_normal((k, vocab)))[states[:, i]]
    logits -= logits.max(1, keepdims=True)
    emission = np.exp(logits)
    return emission / emission.sum(1, keepdims=True)


@dataclass
class DiverseWorld:
    """App. M's context x (permutation mixing) and `n_targets` i.i.d. tokens y ~ p(y|z) per sample."""

    world: SyntheticWorld
    emission: np.ndarray  # (M, vocab)
    n_targets: int = 8

    def __post_init__(self) -> None:
        if self.emission.shape[0] != self.world.latent.n_states:
            raise ConfigError(f"emission needs one row per joint state ({self.world.latent.n_states}), "
                              f"got {self.emission.shape}")
        if self.n_targets < 1:
            raise ConfigError(f"n_targets must be >= 1, got {self.n_targets}")

    @property
    def latent(self) -> LatentModel:
        return self.world.latent

    @property
    def vocab(self) -> int:
        return self.emission.shape[1]

    def targets(self, z: np.ndarray, seed: "int | np.random.Generator | None" = None) -> np.ndarray:
        """(N, n_targets) tokens drawn i.i.d. from p(y | z) (inverse-CDF sampling)."""
        probs = self.emission[self.latent.state_index(z)]
        u = _rng(seed).random((len(z), self.n_targets, 1))
        return (u > np.cumsum(probs, axis=1)[:, None, :-1]).sum(-1).astype(np.int64)

    def sample(self, n: int, seed: "int | np.random.Generator | None" = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(z (n, d), x (n, n_observed), y (n, n_targets))."""
        rng = _rng(seed)
        z, x = self.world.sample(n, rng)
        return z, x, self.targets(z, rng)


def _spectrum(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)


def rank_and_condition(matrix: np.ndarray, needed: int | None = None) -> dict:
    """Numerical rank (σ > RANK_TOL·σ_1) and condition σ_1/σ_r with r = `needed` (default: the rank
    the shape allows); None when σ_r is zero (not invertible in that sense)."""
    s = _spectrum(matrix)
    r = min(matrix.shape) if needed is None else needed
    rank = int((s > RANK_TOL * s[0]).sum()) if len(s) and s[0] > 0 else 0
    cond = float(s[0] / s[r - 1]) if 0 < r <= len(s) and s[r - 1] > RANK_TOL * s[0] else None
    return {"rank": rank, "needed": int(r), "condition": cond, "full_rank": bool(rank >= r)}


def posterior_given_targets(latent: LatentModel, emission: np.ndarray) -> np.ndarray:
    """(M, vocab): column k is p(z | y_k) ∝ p(y_k | z) p(z)."""
    joint = emission * latent.joint_prior()[:, None]
    return joint / joint.sum(0, keepdims=True)


def predictive_spectrum(post_joint: np.ndarray, emission: np.ndarray, log_marginals: np.ndarray, width: int,
                        groups: np.ndarray | None = None, seed: int = 0) -> dict:
    """The Bayes predictive log-ratios log p(y_k|x) − log p(y_0|x) (N, vocab−1) over contexts: share of
    their (centred) variance beyond `width` directions, and the held-out R² of the best width-`width`
    f (their top principal subspace) to the marginal log-posteriors."""
    from conca.synthetic.checks import linear_r2

    if post_joint.shape[1] != emission.shape[0]:
        raise ShapeError(f"posteriors over {post_joint.shape[1]} states, emission over {emission.shape[0]}")
    logpred = np.log(np.maximum(post_joint @ emission, 1e-300))
    ratios = logpred[:, 1:] - logpred[:, :1]
    ratios = ratios - ratios.mean(0)
    u, s, _ = np.linalg.svd(ratios, full_matrices=False)
    energy = s ** 2
    share = float(energy[width:].sum() / energy.sum()) if energy.sum() > 0 else 0.0
    best_f = u[:, :width] * s[:width]
    return {"residual_variance_share": share, "singular_values": (s[: width + 2] / s[0]).tolist() if s[0] > 0 else [],
            "oracle_r2_marginal_logposterior": linear_r2(best_f, log_marginals, seed=seed, groups=groups)}


def best_features(post_joint: np.ndarray, emission: np.ndarray, width: int,
                  basis: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The best width-`width` f of a softmax model matching Bayes in least squares: the Bayes log-predictive
    ratios projected on their top principal directions. `basis` (mean, directions) from one set of
    contexts projects another set in the same coordinates; returns (features, basis)."""
    logpred = np.log(np.maximum(post_joint @ emission, 1e-300))
    ratios = logpred[:, 1:] - logpred[:, :1]
    if basis is None:
        mean = ratios.mean(0)
        _, _, vt = np.linalg.svd(ratios - mean, full_matrices=False)
        basis = (mean, vt[:width])
    return (ratios - basis[0]) @ basis[1].T, basis


def diversity_checks(latent: LatentModel, emission: np.ndarray, head_weight: np.ndarray, post_joint: np.ndarray,
                     log_marginals: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> dict:
    """Every quantity of the module docstring for one trained model on one world.

    head_weight (vocab, m): row k is g(y_k); post_joint (N, M): p(z|x) of the evaluation contexts."""
    head_weight = np.asarray(head_weight, dtype=np.float64)
    if head_weight.shape[0] != emission.shape[1]:
        raise ShapeError(f"head has {head_weight.shape[0]} rows, the target vocabulary {emission.shape[1]}")
    width = head_weight.shape[1]
    pzy = posterior_given_targets(latent, emission)
    L_joint = pzy[:, 1:] - pzy[:, :1]
    L_marg = latent.marginal_selector().T @ L_joint
    L_hat = (head_weight[1:] - head_weight[:1]).T  # (m, vocab − 1)
    tv = 0.5 * np.abs(pzy[:, 1:] - pzy[:, :1]).sum(0)
    free = sum(k - 1 for k in latent.cardinalities)  # the per-concept posteriors' degrees of freedom
    return {
        "directions_per_context": int(emission.shape[1] - 1),
        # Columns of L are differences of distributions over the M states, so they sum to 0: rank <= M - 1
        # (I-Predict's "ℓ × ℓ invertible" can at most mean rank M − 1 on the simplex's tangent space).
        "L_joint": rank_and_condition(L_joint, min(latent.n_states - 1, L_joint.shape[1])),
        "L_marginal": rank_and_condition(L_marg, free),
        "L_hat": rank_and_condition(L_hat, width),
        "epsilon": float(1.0 - post_joint.max(1).mean()),
        "posterior_entropy": float(-(post_joint * np.log(np.where(post_joint > 0, post_joint, 1.0))).sum(1).mean()),
        "tv_max": float(tv.max()), "tv_mean": float(tv.mean()),
        **predictive_spectrum(post_joint, emission, log_marginals, width, groups, seed),
    }


def appm_diversity(world: SyntheticWorld, head_weight: np.ndarray, post_joint: np.ndarray) -> dict:
    """The same checks for App. M's masked-bit objective: y = (j, x_j), f depends on the mask j.

    Per context there are 2 outcomes, so L̂ has one column g(j,1) − g(j,0): rank 1 of the m needed.
    L per context is p(z|x_j=1) − p(z|x_j=0); with the deterministic mixing these two have disjoint
    supports (TV = 1: each target bit splits the joint states in half, the opposite of regularity)."""
    head_weight = np.asarray(head_weight, dtype=np.float64)
    n_obs = world.mixing.n_observed
    width = head_weight.shape[1]
    g = head_weight.reshape(n_obs, 2, width)
    prior = world.latent.joint_prior()
    table = world.mixing.table
    rho = world.mixing.flip_prob
    tvs = []
    for j in range(n_obs):
        like1 = np.where(table[:, j] == 1, 1 - rho, rho)
        p1, p0 = like1 * prior, (1 - like1) * prior
        tvs.append(0.5 * np.abs(p1 / p1.sum() - p0 / p0.sum()).sum())
    across = rank_and_condition((g[:, 1] - g[:, 0]).T, width)
    return {
        "directions_per_context": 1,
        "L_hat": {"rank": 1, "needed": int(width), "condition": None, "full_rank": width <= 1},
        "L_hat_across_masks": across,
        "epsilon": float(1.0 - post_joint.max(1).mean()),
        "posterior_entropy": float(-(post_joint * np.log(np.where(post_joint > 0, post_joint, 1.0))).sum(1).mean()),
        "tv_max": float(max(tvs)), "tv_mean": float(np.mean(tvs)),
    }
