"""Latent graphs of the synthetic worlds: DAGs over the latent concepts (a chain, Erdős–Rényi ER-k
with k·d expected edges, or user edges), always in a topological order."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from conca.errors import ConfigError

GRAPH_KINDS = ("chain", "er", "edges")


def _rng(seed: "int | np.random.Generator | None") -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# --------------------------------------------------------------------------------------- DAGs
@dataclass(frozen=True)
class DAG:
    """A directed acyclic graph over nodes 0..n_nodes-1; `order` is a topological order."""

    n_nodes: int
    parents: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]

    @property
    def edges(self) -> list[tuple[int, int]]:
        return sorted((p, child) for child, pa in enumerate(self.parents) for p in pa)

    @property
    def n_edges(self) -> int:
        return sum(len(p) for p in self.parents)

    def is_acyclic(self) -> bool:
        return _topological_order(self.n_nodes, self.edges) is not None


def _topological_order(n: int, edges: list[tuple[int, int]]) -> tuple[int, ...] | None:
    """Kahn's algorithm; None when the edges contain a cycle."""
    indegree = [0] * n
    children: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        children[a].append(b)
        indegree[b] += 1
    ready = [i for i in range(n) if indegree[i] == 0]
    order = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for c in children[node]:
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    return tuple(order) if len(order) == n else None


def dag_from_edges(n_nodes: int, edges: "list[tuple[int, int]]") -> DAG:
    """A DAG from explicit (parent, child) edges; ConfigError on a cycle, self-loop or bad node."""
    if n_nodes < 1:
        raise ConfigError(f"a graph needs at least one node, got {n_nodes}")
    clean = []
    for a, b in edges:
        a, b = int(a), int(b)
        if not (0 <= a < n_nodes and 0 <= b < n_nodes):
            raise ConfigError(f"edge {a}->{b} names a node outside 0..{n_nodes - 1}")
        if a == b:
            raise ConfigError(f"edge {a}->{b} is a self-loop")
        if (a, b) not in clean:
            clean.append((a, b))
    order = _topological_order(n_nodes, clean)
    if order is None:
        raise ConfigError(f"edges {clean} contain a cycle: latents must form a DAG")
    parents = tuple(tuple(sorted(a for a, b in clean if b == child)) for child in range(n_nodes))
    return DAG(n_nodes, parents, order)


def chain_dag(n_nodes: int) -> DAG:
    """z_0 -> z_1 -> ... -> z_{n-1} (the Fig. 2 left graph for n = 3)."""
    return dag_from_edges(n_nodes, [(i, i + 1) for i in range(n_nodes - 1)])


def er_dag(n_nodes: int, expected_edges: float, seed: "int | np.random.Generator | None" = None) -> DAG:
    """Erdős–Rényi DAG: a random topological order, then each of the n(n-1)/2 forward pairs is an
    edge with probability p = expected_edges / (n(n-1)/2).

    ER-k means expected_edges = k·n. p is capped at 1 (a complete DAG), which happens for small n:
    e.g. ConCA's "5 latents, 10 expected edges" is the complete DAG on 5 nodes, and ER3 on 4 nodes
    asks for 12 of the 6 possible edges."""
    if n_nodes < 1:
        raise ConfigError(f"a graph needs at least one node, got {n_nodes}")
    if expected_edges < 0:
        raise ConfigError(f"expected_edges must be >= 0, got {expected_edges}")
    rng = _rng(seed)
    pairs = n_nodes * (n_nodes - 1) // 2
    p = min(1.0, expected_edges / pairs) if pairs else 0.0
    order = rng.permutation(n_nodes)
    edges = [(int(order[i]), int(order[j])) for i in range(n_nodes) for j in range(i + 1, n_nodes) if rng.random() < p]
    return dag_from_edges(n_nodes, edges)


def parse_edges(text: str) -> list[tuple[int, int]]:
    """'0->1, 1->2' (or '0-1,1-2') -> [(0, 1), (1, 2)]."""
    edges = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*-+>?\s*(\d+)", item)
        if not match:
            raise ConfigError(f"bad edge {item!r}: expected PARENT->CHILD, e.g. '0->1'")
        edges.append((int(match.group(1)), int(match.group(2))))
    return edges


def make_dag(graph: str, n_nodes: int, expected_edges: float = 0.0,
             seed: "int | np.random.Generator | None" = None) -> DAG:
    """'chain', 'er' (expected_edges edges), 'erK' (K·n expected edges, e.g. 'er2'), or explicit
    edges '0->1,1->2' (anything containing '>' or '-')."""
    text = graph.strip().lower()
    if text == "chain":
        return chain_dag(n_nodes)
    if text == "er":
        return er_dag(n_nodes, expected_edges, seed)
    match = re.fullmatch(r"er(\d+(?:\.\d+)?)", text)
    if match:
        return er_dag(n_nodes, float(match.group(1)) * n_nodes, seed)
    if "-" in text or ">" in text:
        return dag_from_edges(n_nodes, parse_edges(text))
    raise ConfigError(f"unknown graph {graph!r}: use 'chain', 'er', 'erK' (e.g. 'er2') or edges like '0->1,1->2'")


# --------------------------------------------------------------------------------- latents
