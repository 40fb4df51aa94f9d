"""Exact posteriors p(z | x) by enumerating the joint states: the ground truth the checks score against.

    p(z = m | x) = p(m) · p(x | m) / sum_m' p(m') p(x | m')           (Bayes, over all M joint states)
    p(z_i = v | x) = sum_{m : z_i(m) = v} p(z = m | x)                (marginals = posterior @ S)

For the permutation mixing, only the visible observables enter the likelihood (the masked one is
the prediction target y, not part of the context x): with flip probability rho,
    log p(x_vis | m) = mismatches · log rho + matches · log(1 - rho),
which is -inf for any mismatch when rho = 0 (deterministic mixing). For the token world,
    log p(t_1..t_s | m) = sum_{t <= s} log emission[m, t_t]   for every prefix length s.

Enumeration costs O(N · M) memory, fine up to ~12 binary latents (M = 4096); beyond `max_states`
it is refused with a ConfigError rather than silently eating memory. Log-posteriors are clamped at
log(eps), because impossible states have p = 0 and log 0 = -inf breaks linear fits and correlations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conca.errors import ConfigError, InputError, ShapeError
from conca.synthetic.world import LatentModel, SyntheticWorld, TokenWorld

MAX_STATES = 4096
DEFAULT_EPS = 1e-6


def check_enumerable(n_states: int, max_states: int = MAX_STATES) -> None:
    if n_states > max_states:
        raise ConfigError(
            f"exact posteriors enumerate all {n_states} joint states, more than max_states={max_states} "
            "(about 12 binary latents): use fewer or smaller latents")


def clamped_log(p: np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
    """log(max(p, eps)): finite log-probabilities for states that are impossible given x."""
    if not eps > 0:
        raise ConfigError(f"eps must be > 0, got {eps}")
    return np.log(np.maximum(p, eps))


@dataclass
class Posterior:
    """Posterior over the joint states of `latent` for N observations."""

    latent: LatentModel
    joint: np.ndarray  # (N, M), rows sum to 1

    @property
    def marginals(self) -> list[np.ndarray]:
        """Per-concept posteriors p(z_i | x), each (N, k_i)."""
        stacked = self.stacked_marginals()
        offsets = np.concatenate([[0], np.cumsum(self.latent.cardinalities)])
        return [stacked[:, offsets[i]:offsets[i + 1]] for i in range(self.latent.n_latents)]

    def stacked_marginals(self) -> np.ndarray:
        """(N, sum k_i): [p(z_1 = .|x); ...; p(z_d = .|x)] (ConCA Thm 2.2's stacking)."""
        return self.joint @ self.latent.marginal_selector()

    def log_marginals(self, eps: float = DEFAULT_EPS) -> np.ndarray:
        """(N, sum k_i) stacked marginal log-posteriors, clamped at log(eps)."""
        return clamped_log(self.stacked_marginals(), eps)

    def log_joint(self, eps: float = DEFAULT_EPS) -> np.ndarray:
        """(N, M) joint log-posterior, clamped at log(eps) (I-Predict Thm 3.1's target)."""
        return clamped_log(self.joint, eps)

    def entropy(self) -> np.ndarray:
        """(N,) H(z | x) in nats; the papers' invertibility is H -> 0."""
        p = self.joint
        return -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)

    def map_marginals(self) -> np.ndarray:
        """(N, d) argmax_v p(z_i = v | x): the Bayes-optimal guess of each concept."""
        return np.stack([m.argmax(1) for m in self.marginals], axis=1)


def posterior_from_loglik(latent: LatentModel, loglik: np.ndarray) -> Posterior:
    """Normalise p(m) p(x | m) over states, stably in log space; loglik is (N, M)."""
    check_enumerable(latent.n_states)
    loglik = np.asarray(loglik, dtype=np.float64)
    if loglik.ndim != 2 or loglik.shape[1] != latent.n_states:
        raise ShapeError(f"log-likelihoods must be (N, {latent.n_states}), got {loglik.shape}")
    with np.errstate(divide="ignore"):
        logjoint = np.log(latent.joint_prior())[None, :] + loglik
    top = logjoint.max(1, keepdims=True)
    if not np.isfinite(top).all():
        raise InputError("an observation has probability 0 under every joint state (inconsistent with the world)")
    w = np.exp(logjoint - top)
    return Posterior(latent, w / w.sum(1, keepdims=True))


def mixing_loglik(world: SyntheticWorld, x: np.ndarray, visible: np.ndarray | None = None) -> np.ndarray:
    """(N, M) log p(x_visible | m) under the permutation mixing; `visible` (N, n_observed) is 0/1."""
    table = world.mixing.table.astype(np.float64)  # (M, n)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != table.shape[1]:
        raise ShapeError(f"observations must be (N, {table.shape[1]}), got {x.shape}")
    vis = np.ones(x.shape, dtype=np.float64) if visible is None else np.asarray(visible, dtype=np.float64)
    if vis.shape != x.shape:
        raise ShapeError(f"visibility mask must have the shape of x {x.shape}, got {vis.shape}")
    xf = x.astype(np.float64)
    # mismatches[n, m] = sum_s vis * (x xor table): x(1 - T) + (1 - x) T, as two matrix products.
    mismatches = (vis * xf) @ (1.0 - table).T + (vis * (1.0 - xf)) @ table.T
    matches = vis.sum(1, keepdims=True) - mismatches
    rho = world.mixing.flip_prob
    if rho == 0:
        return np.where(mismatches > 0.5, -np.inf, 0.0)
    return mismatches * np.log(rho) + matches * np.log1p(-rho)


def posterior(world: SyntheticWorld, x: np.ndarray, visible: np.ndarray | None = None) -> Posterior:
    """Exact p(z | x_visible) for the permutation-mixing world."""
    check_enumerable(world.latent.n_states)
    return posterior_from_loglik(world.latent, mixing_loglik(world, x, visible))


def masked_visibility(n_observed: int, masked: np.ndarray) -> np.ndarray:
    """(N, n_observed) 0/1: every observable visible except masked[n] (the prediction target)."""
    masked = np.asarray(masked, dtype=np.int64)
    vis = np.ones((len(masked), n_observed), dtype=np.int64)
    vis[np.arange(len(masked)), masked] = 0
    return vis


def token_prefix_logliks(world: TokenWorld, tokens: np.ndarray) -> np.ndarray:
    """(N, T+1, M): entry [n, s] = log p(t_1..t_s | m), prefix lengths s = 0..T."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 2 or tokens.max(initial=0) >= world.vocab or tokens.min(initial=0) < 0:
        raise InputError(f"tokens must be (N, T) ids in 0..{world.vocab - 1}")
    log_emit = np.log(world.emission)  # (M, V)
    per_token = log_emit.T[tokens]  # (N, T, M)
    zeros = np.zeros((len(tokens), 1, world.latent.n_states))
    return np.concatenate([zeros, np.cumsum(per_token, axis=1)], axis=1)


def token_posteriors(world: TokenWorld, tokens: np.ndarray) -> list[Posterior]:
    """Exact p(z | t_1..t_s) for every prefix length s = 0..T (index s of the list)."""
    check_enumerable(world.latent.n_states)
    logliks = token_prefix_logliks(world, tokens)
    return [posterior_from_loglik(world.latent, logliks[:, s]) for s in range(logliks.shape[1])]
