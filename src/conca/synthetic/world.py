"""Generative worlds with known concepts: discrete latents on a DAG, and observations mixed from them.

The data-generating process of "I Predict Therefore I Am" (arXiv:2503.08980 v3, §6 + App. G.1) and
of ConCA's App. M (SPEC §2.3):

* Latents `z = (z_1..z_d)`, `z_i in {0..k_i-1}`, on a DAG (chain, Erdős–Rényi ER-k with k·d expected
  edges, or user edges). Each conditional `p(z_j | parents)` has one independent parameter vector
  per parent configuration: for a binary latent `p(z_j = 1 | pa) ~ U[low, high]` (the papers'
  U[0.2, 0.8]); for k > 2 values, k weights ~ U[low, high] normalised to sum to 1 [RECON].
* Mixing [RECON of the papers' one-sentence description]: the joint state `m in {0..M-1}`
  (M = prod k_i; one-hot of the joint configuration) goes through R random permutations
  pi_1..pi_R of {0..M-1} (R = M by default: "2^3 permutations for 3 latents"); each permuted index
  pi_r(m) is written in B = ceil(log2 M) bits, giving a pool of R·B binary observables. The
  number of them that is observed is the invertibility knob: more observed variables pin down
  the joint state (and every concept) more tightly. An optional bit-flip noise makes p(x|z) smooth.
* A token-sequence world: tokens drawn i.i.d. given the joint state from p(token | z) (a softmax
  of Gaussian logits per state), so a prefix x and the next token y are independent given z,
  exactly the model `p(x, y) = sum_z p(x|z) p(y|z) p(z)` (ConCA Eq. 1) for a causal transformer.

Joint states are numbered in mixed radix, latent 0 most significant: `m = sum_i z_i * prod_{j>i} k_j`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from conca.errors import ConfigError, InputError
# The latent graphs live in conca.synthetic.dag; re-exported here, where worlds are made from them.
from conca.synthetic.dag import (DAG, GRAPH_KINDS, _rng, chain_dag, dag_from_edges, er_dag, make_dag,  # noqa: F401
                                 parse_edges)

OBSERVED_ORDERS = ("random", "sequential")


@dataclass
class LatentModel:
    """Discrete latents on a DAG with conditional probability tables.

    cpts[j] has shape (prod of parents' cardinalities, k_j); row r is p(z_j | parents in
    configuration r), configurations numbered in mixed radix over `dag.parents[j]` (first parent
    most significant)."""

    dag: DAG
    cardinalities: tuple[int, ...]
    cpts: list[np.ndarray]

    def __post_init__(self) -> None:
        if len(self.cardinalities) != self.dag.n_nodes or len(self.cpts) != self.dag.n_nodes:
            raise ConfigError(f"{self.dag.n_nodes} latents need {self.dag.n_nodes} cardinalities and tables")
        for j, (k, table) in enumerate(zip(self.cardinalities, self.cpts)):
            n_configs = int(np.prod([self.cardinalities[p] for p in self.dag.parents[j]], dtype=np.int64))
            if k < 2:
                raise ConfigError(f"latent {j} needs at least 2 values, got {k}")
            if table.shape != (n_configs, k):
                raise ConfigError(f"table of latent {j} must have shape {(n_configs, k)}, got {table.shape}")
            if (table < 0).any() or not np.allclose(table.sum(1), 1.0):
                raise ConfigError(f"rows of the table of latent {j} must be probability vectors")

    @property
    def n_latents(self) -> int:
        return self.dag.n_nodes

    @property
    def n_states(self) -> int:
        return int(np.prod(self.cardinalities, dtype=np.int64))

    @property
    def n_marginals(self) -> int:
        """Length of the stacked per-concept posterior vector, sum_i k_i (ConCA Thm 2.2)."""
        return int(sum(self.cardinalities))

    def _radix(self) -> np.ndarray:
        k = np.asarray(self.cardinalities, dtype=np.int64)
        return np.concatenate([np.cumprod(k[::-1])[::-1][1:], [1]]).astype(np.int64)

    def states(self) -> np.ndarray:
        """(M, d) every joint configuration, row m = configuration with index m."""
        m = np.arange(self.n_states, dtype=np.int64)
        return (m[:, None] // self._radix()[None, :]) % np.asarray(self.cardinalities)[None, :]

    def state_index(self, z: np.ndarray) -> np.ndarray:
        """(N, d) configurations -> (N,) joint-state indices."""
        z = np.asarray(z, dtype=np.int64)
        if z.ndim != 2 or z.shape[1] != self.n_latents:
            raise InputError(f"latent values must be (samples, {self.n_latents}), got shape {z.shape}")
        return z @ self._radix()

    def _parent_config(self, j: int, z: np.ndarray) -> np.ndarray:
        index = np.zeros(len(z), dtype=np.int64)
        for p in self.dag.parents[j]:
            index = index * self.cardinalities[p] + z[:, p]
        return index

    def joint_prior(self) -> np.ndarray:
        """(M,) exact p(z) = prod_j p(z_j | pa_j) for every joint state."""
        states = self.states()
        prob = np.ones(self.n_states)
        for j in range(self.n_latents):
            prob *= self.cpts[j][self._parent_config(j, states), states[:, j]]
        return prob

    def sample(self, n: int, seed: "int | np.random.Generator | None" = None) -> np.ndarray:
        """(n, d) ancestral samples: each latent drawn after its parents, in topological order."""
        rng = _rng(seed)
        z = np.zeros((n, self.n_latents), dtype=np.int64)
        for j in self.dag.order:
            probs = self.cpts[j][self._parent_config(j, z)]
            # Inverse-CDF sampling of one categorical per row.
            z[:, j] = (rng.random((n, 1)) > np.cumsum(probs, axis=1)[:, :-1]).sum(1)
        return z

    def counterfactual(self, z: np.ndarray, latent: int, seed: "int | np.random.Generator | None" = None) -> np.ndarray:
        """A copy of z in which only `latent` changes, to a uniformly drawn different value.

        The papers' pairs (I-Predict Cor. 4.2-4.3, ConCA App. M) differ in exactly one concept,
        so descendants are deliberately not resampled."""
        if not 0 <= latent < self.n_latents:
            raise ConfigError(f"latent {latent} is not in 0..{self.n_latents - 1}")
        rng = _rng(seed)
        out = np.array(z, dtype=np.int64, copy=True)
        k = self.cardinalities[latent]
        out[:, latent] = (out[:, latent] + rng.integers(1, k, size=len(out))) % k
        return out

    def marginal_selector(self) -> np.ndarray:
        """(M, sum k_i) 0/1 matrix S with S[m, offset_i + v] = [z_i(m) = v].

        Lemma D.2 of ConCA: joint log-posterior ~ S @ stacked marginal log-posteriors."""
        states = self.states()
        offsets = np.concatenate([[0], np.cumsum(self.cardinalities)[:-1]])
        sel = np.zeros((self.n_states, self.n_marginals))
        for i in range(self.n_latents):
            sel[np.arange(self.n_states), offsets[i] + states[:, i]] = 1.0
        return sel


def random_latent_model(dag: DAG, cardinality: "int | list[int]" = 2, low: float = 0.2, high: float = 0.8,
                        seed: "int | np.random.Generator | None" = None) -> LatentModel:
    """Conditionals drawn from U[low, high]: p(z_j=1 | pa) for binary latents (the papers' choice);
    for k > 2 values, k weights ~ U[low, high] normalised per parent configuration [RECON]."""
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"conditional probabilities need 0 <= low <= high <= 1, got low={low}, high={high}")
    cards = [cardinality] * dag.n_nodes if isinstance(cardinality, int) else list(cardinality)
    if len(cards) != dag.n_nodes or min(cards) < 2:
        raise ConfigError(f"need one cardinality >= 2 per latent ({dag.n_nodes}), got {cards}")
    if max(cards) > 2 and high <= 0:
        raise ConfigError("k-valued latents need high > 0 (the weights are normalised)")
    rng = _rng(seed)
    cpts = []
    for j in range(dag.n_nodes):
        n_configs = int(np.prod([cards[p] for p in dag.parents[j]], dtype=np.int64))
        if cards[j] == 2:
            p1 = rng.uniform(low, high, size=n_configs)
            table = np.stack([1.0 - p1, p1], axis=1)
        else:
            w = rng.uniform(low, high, size=(n_configs, cards[j]))
            w = np.where(w.sum(1, keepdims=True) > 0, w, 1.0)  # low = high = 0 would give 0/0
            table = w / w.sum(1, keepdims=True)
        cpts.append(table)
    return LatentModel(dag, tuple(int(c) for c in cards), cpts)


# ---------------------------------------------------------------------------------- mixing
@dataclass
class PermutationMixing:
    """Observable s of joint state m is bit `bit[s]` of `permutations[perm[s]][m]`.

    `table` (M, n_observed) holds those bits; `flip_prob` flips each observed bit independently."""

    n_states: int
    perm: np.ndarray  # (n_observed,) which permutation each observable comes from
    bit: np.ndarray  # (n_observed,) which bit of the permuted index
    permutations: dict[int, np.ndarray]
    flip_prob: float = 0.0
    pool_size: int = 0
    table: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_prob < 0.5:
            raise ConfigError(f"flip_prob must be in [0, 0.5), got {self.flip_prob}")
        m = np.arange(self.n_states)
        self.table = np.stack([(self.permutations[int(r)][m] >> int(b)) & 1 for r, b in zip(self.perm, self.bit)],
                              axis=1).astype(np.int64) if len(self.perm) else np.zeros((self.n_states, 0), np.int64)

    @property
    def n_observed(self) -> int:
        return len(self.perm)

    def observe(self, state_index: np.ndarray, seed: "int | np.random.Generator | None" = None) -> np.ndarray:
        """(N,) joint-state indices -> (N, n_observed) binary observations."""
        x = self.table[np.asarray(state_index, dtype=np.int64)]
        if self.flip_prob > 0:
            x = x ^ (_rng(seed).random(x.shape) < self.flip_prob)
        return x.astype(np.int64)


def n_bits(n_states: int) -> int:
    return max(1, math.ceil(math.log2(n_states)))


def permutation_mixing(n_states: int, n_observed: int, seed: "int | np.random.Generator | None" = None,
                       n_permutations: int = 0, order: str = "random", flip_prob: float = 0.0) -> PermutationMixing:
    """The papers' mixing (SPEC §2.3 [RECON]): one-hot of the joint state -> random permutations ->
    bits. The pool is n_permutations (default M) × ceil(log2 M) binary observables.

    order='sequential' observes the pool in order (all bits of permutation 1, then of 2, ...);
    'random' observes a uniformly random subset. Either way the observed set for n is a prefix of
    the one for n+1 under the same seed, so sweeping n_observed only adds variables."""
    if order not in OBSERVED_ORDERS:
        raise ConfigError(f"unknown observed order {order!r}: choose one of {', '.join(OBSERVED_ORDERS)}")
    if n_states < 2:
        raise ConfigError(f"mixing needs at least 2 joint states, got {n_states}")
    rng = _rng(seed)
    n_perm = n_permutations or n_states
    bits = n_bits(n_states)
    pool = n_perm * bits
    if not 1 <= n_observed <= pool:
        raise ConfigError(f"n_observed must be in 1..{pool} ({n_perm} permutations x {bits} bits), got {n_observed}")
    chosen = np.arange(pool) if order == "sequential" else rng.permutation(pool)
    chosen = chosen[:n_observed]
    perm, bit = chosen // bits, chosen % bits
    # Permutation r comes from its own stream (base, r): only the observed ones are drawn (large pools
    # stay cheap), and the same r is the same permutation whatever else is observed.
    base = int(rng.integers(2 ** 62))
    permutations = {int(r): np.random.default_rng([base, int(r)]).permutation(n_states) for r in np.unique(perm)}
    return PermutationMixing(n_states, perm, bit, permutations, flip_prob, pool)


@dataclass
class SyntheticWorld:
    """Latents + permutation mixing: sample (z, x) pairs with known posteriors."""

    latent: LatentModel
    mixing: PermutationMixing

    def __post_init__(self) -> None:
        if self.mixing.n_states != self.latent.n_states:
            raise ConfigError(f"mixing is for {self.mixing.n_states} joint states, latents have {self.latent.n_states}")

    def observe(self, z: np.ndarray, seed: "int | np.random.Generator | None" = None) -> np.ndarray:
        return self.mixing.observe(self.latent.state_index(z), seed)

    def sample(self, n: int, seed: "int | np.random.Generator | None" = None) -> tuple[np.ndarray, np.ndarray]:
        rng = _rng(seed)
        z = self.latent.sample(n, rng)
        return z, self.observe(z, rng)


def make_world(n_latents: int = 5, graph: str = "er", expected_edges: float = 10.0, cardinality: int = 2,
               low: float = 0.2, high: float = 0.8, n_observed: int = 16, order: str = "random",
               flip_prob: float = 0.0, n_permutations: int = 0, seed: int = 0) -> SyntheticWorld:
    """One seeded world: graph, conditionals and mixing all drawn from `seed`."""
    rng = np.random.default_rng(seed)
    dag = make_dag(graph, n_latents, expected_edges, rng)
    latent = random_latent_model(dag, cardinality, low, high, rng)
    return SyntheticWorld(latent, permutation_mixing(latent.n_states, n_observed, rng, n_permutations, order, flip_prob))


# ----------------------------------------------------------------------------- token world
@dataclass
class TokenWorld:
    """Latent concepts emit a sequence of tokens, i.i.d. given the joint state:
    p(t_1..t_T | z) = prod_t emission[m(z), t_t]. A prefix and the next token are then
    conditionally independent given z, the model behind next-token prediction in both papers."""

    latent: LatentModel
    emission: np.ndarray  # (M, vocab) rows are p(token | joint state)
    length: int

    def __post_init__(self) -> None:
        if self.emission.shape[0] != self.latent.n_states:
            raise ConfigError(f"emission needs one row per joint state ({self.latent.n_states}), got {self.emission.shape}")
        if self.length < 1:
            raise ConfigError(f"sequence length must be >= 1, got {self.length}")

    @property
    def vocab(self) -> int:
        return self.emission.shape[1]

    def emit(self, z: np.ndarray, seed: "int | np.random.Generator | None" = None) -> np.ndarray:
        rng = _rng(seed)
        probs = self.emission[self.latent.state_index(z)]  # (N, V)
        u = rng.random((len(z), self.length, 1))
        return (u > np.cumsum(probs, axis=1)[:, None, :-1]).sum(-1).astype(np.int64)

    def sample(self, n: int, seed: "int | np.random.Generator | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """(z (n, d), tokens (n, length))."""
        rng = _rng(seed)
        z = self.latent.sample(n, rng)
        return z, self.emit(z, rng)


def token_world(latent: LatentModel, vocab: int = 16, length: int = 16, concentration: float = 2.0,
                seed: "int | np.random.Generator | None" = None) -> TokenWorld:
    """p(token | state) = softmax(concentration · g), g ~ N(0, I) per state: a larger
    concentration makes each token more informative, so posteriors sharpen faster along a prefix."""
    if vocab < 2:
        raise ConfigError(f"vocab must be >= 2, got {vocab}")
    if concentration < 0:
        raise ConfigError(f"concentration must be >= 0, got {concentration}")
    logits = concentration * _rng(seed).standard_normal((latent.n_states, vocab))
    logits -= logits.max(1, keepdims=True)
    emission = np.exp(logits)
    return TokenWorld(latent, emission / emission.sum(1, keepdims=True), length)
