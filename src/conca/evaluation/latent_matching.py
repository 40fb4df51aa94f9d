"""Matching the latents of two dictionaries by a similarity that arrives a block of rows at a time.

The similarity S (L x L', values in [0, 1]) is |cosine| of decoder directions or |Pearson| of
activations (conca.evaluation.stability). `SimilarityReducer.add` takes it in row blocks, so memory
holds one block plus what the results need:

- every latent's best partner on the other side, both ways (`row_best`, `col_best`): the per-latent
  stability score (an upper bound on what a one-to-one matching can give a latent);
- a one-to-one matching maximising the summed S. Up to `hungarian_max` latents on the larger side,
  exactly: the whole matrix is kept (float64, 128 MiB at 4096 x 4096) and solved by scipy's
  `linear_sum_assignment` (Jonker-Volgenant). Above it, the Hungarian is run on a sparse graph: each
  latent's `candidates` best partners, from both sides (scipy's `min_weight_full_bipartite_matching`,
  LAPJVsp), pairs outside the candidates counted as 0: the maximum-weight matching on the candidate
  edges, the latents it leaves over paired in index order (candidates can collide: a dead latent's
  S is 0 everywhere). Any one-to-one matching, its pairs outside the candidates counted as 0, is a
  lower bound on the optimum and the best-partner mean an upper bound: the value is bracketed.

Measured on 576-dimensional directions (SmolLM2's width), one thread on a shared 2-core machine:
the Hungarian alone, exact, 1.8 s at 4,096 latents and 11 s at 8,192 (its float64 matrix alone is
512 MiB there; 16,384 would need 2 GiB and about a minute), on the top-16 candidates 0.16 s at 8,192
and 0.5 s at 16,384. Whole `match_directions` at 8,192: exact 0.15995 (15-23 s) vs candidates 0.15994
(5-6 s) on unrelated directions; 0.57571 vs 0.57567 with half the latents shared (best-partner means
0.1644 and 0.5815).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

HUNGARIAN_MAX = 4096
CANDIDATES = 16
EXACT = "exact Hungarian (scipy linear_sum_assignment) on the full matrix"


@dataclass
class PairMatch:
    row_best: np.ndarray  # (L,) best S of each latent of the first dictionary
    row_partner: np.ndarray  # (L,) the second dictionary's latent that gives it
    col_best: np.ndarray  # (L',) best S of each latent of the second dictionary
    col_partner: np.ndarray  # (L',)
    matched: np.ndarray | None  # (min(L, L'),) S of the one-to-one matching's pairs; None: not computed
    matching: str  # how the one-to-one matching was found ("" when it was not)
    note: str = ""  # why it is missing, or ""
    pairs: tuple[np.ndarray, np.ndarray] | None = None  # (rows, cols) of the matched pairs, aligned with `matched`

    @property
    def matched_mean(self) -> float | None:
        return None if self.matched is None else float(self.matched.mean())

    def share_above(self, threshold: float) -> float | None:
        return None if self.matched is None else float((self.matched > threshold).mean())


def candidate_matching_label(candidates: int) -> str:
    return (f"Hungarian on each latent's top-{candidates} partners both ways (scipy min_weight_full_bipartite_matching; "
            f"pairs outside them count as 0): a lower bound of the exact optimum, the best-partner mean an upper bound")


class SimilarityReducer:
    """Reduce S (n_rows x n_cols, in [0, 1]) given in row blocks to a `PairMatch`.

    approximate=False: above `hungarian_max` the one-to-one matching is left out (None, with a note)
    instead of run on candidates."""

    def __init__(self, n_rows: int, n_cols: int, *, hungarian_max: int = HUNGARIAN_MAX, candidates: int = CANDIDATES,
                 approximate: bool = True):
        self.n_rows, self.n_cols, self.candidates = n_rows, n_cols, max(1, candidates)
        self.row_best = np.zeros(n_rows, dtype=np.float32)
        self.row_partner = np.zeros(n_rows, dtype=np.int64)
        self.exact = max(n_rows, n_cols) <= hungarian_max
        self.sparse = not self.exact and approximate
        self.hungarian_max = hungarian_max
        self.dense = np.zeros((n_rows, n_cols)) if self.exact else None
        self.col_best = torch.zeros(n_cols)
        self.col_partner = torch.zeros(n_cols, dtype=torch.long)
        # Sparse mode: row candidates as (rows, cols, values) pieces; column candidates as a running top-k.
        self.pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.col_top: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rows_seen = 0

    def add(self, start: int, block: torch.Tensor) -> None:
        """Rows start .. start + len(block) of S."""
        block = block.detach().float().cpu().clamp_(0.0, 1.0)
        stop = start + len(block)
        best = block.max(dim=1)
        self.row_best[start:stop] = best.values.numpy()
        self.row_partner[start:stop] = best.indices.numpy()
        col = block.max(dim=0)
        better = (col.values > self.col_best) | (self.rows_seen == 0)
        self.col_best = torch.where(better, col.values, self.col_best)
        self.col_partner = torch.where(better, col.indices + start, self.col_partner)
        self.rows_seen += len(block)
        if self.dense is not None:
            self.dense[start:stop] = block.double().numpy()
        elif self.sparse:
            k = min(self.candidates, self.n_cols)
            values, cols = block.topk(k, dim=1)
            rows = np.repeat(np.arange(start, stop), k)
            self.pieces.append((rows, cols.numpy().ravel(), values.double().numpy().ravel()))
            k = min(self.candidates, len(block))
            values, rows_t = block.topk(k, dim=0)
            rows_t = rows_t + start
            if self.col_top is not None:
                values, rows_t = torch.cat([self.col_top[0], values]), torch.cat([self.col_top[1], rows_t])
                keep = values.topk(min(self.candidates, len(values)), dim=0).indices
                values, rows_t = values.gather(0, keep), rows_t.gather(0, keep)
            self.col_top = (values, rows_t)

    def finish(self) -> PairMatch:
        if self.rows_seen != self.n_rows:
            raise RuntimeError(f"similarity reducer got {self.rows_seen} of {self.n_rows} rows")
        matched, matching, note, pairs = None, "", "", None
        if self.dense is not None:
            rows, cols = linear_sum_assignment(self.dense, maximize=True)
            matched, matching, pairs = self.dense[rows, cols], EXACT, (rows, cols)
        elif self.sparse:
            matched, matching, pairs = self._candidate_matching()
        else:
            note = (f"one-to-one (Hungarian) mean left out: {max(self.n_rows, self.n_cols)} latents, more than "
                    f"{self.hungarian_max} (its L x L matrix and cubic time)")
        return PairMatch(self.row_best.clip(0.0, 1.0), self.row_partner, self.col_best.numpy().clip(0.0, 1.0),
                         self.col_partner.numpy().astype(np.int64), matched, matching, note, pairs)

    def _candidate_matching(self) -> tuple[np.ndarray, str, tuple[np.ndarray, np.ndarray]]:
        """The best one-to-one matching when pairs outside the candidates count as 0: a maximum-weight
        matching on the candidate edges, completed in index order. Solved as a full matching of every
        row in an L x (L' + L) graph where row i may also take its own slack column L' + i (S = 0)."""
        top_values, top_rows = self.col_top
        rows = [p[0] for p in self.pieces] + [top_rows.numpy().ravel()]
        cols = [p[1] for p in self.pieces] + [np.tile(np.arange(self.n_cols), len(top_rows))]
        values = [p[2] for p in self.pieces] + [top_values.double().numpy().ravel()]
        keys, first = np.unique(np.concatenate(rows) * self.n_cols + np.concatenate(cols), return_index=True)
        edge_values = np.concatenate(values)[first]
        slack = np.arange(self.n_rows)
        # Weights 2 - S lie in [1, 2]: never zero (the sparse solver treats stored zeros as no edge).
        graph = csr_matrix((np.concatenate([2.0 - edge_values, np.full(self.n_rows, 2.0)]),
                            (np.concatenate([keys // self.n_cols, slack]), np.concatenate([keys % self.n_cols,
                                                                                           self.n_cols + slack]))),
                           shape=(self.n_rows, self.n_cols + self.n_rows))
        match_rows, match_cols = min_weight_full_bipartite_matching(graph)
        real = match_cols < self.n_cols
        match_rows, match_cols = match_rows[real], match_cols[real]
        matched = edge_values[np.searchsorted(keys, match_rows * self.n_cols + match_cols)]
        row_free, col_free = np.ones(self.n_rows, bool), np.ones(self.n_cols, bool)
        row_free[match_rows], col_free[match_cols] = False, False
        left = min(self.n_rows, self.n_cols) - len(match_rows)  # paired in index order, S counted as 0
        pairs = (np.concatenate([match_rows, np.flatnonzero(row_free)[:left]]).astype(np.int64),
                 np.concatenate([match_cols, np.flatnonzero(col_free)[:left]]).astype(np.int64))
        return np.concatenate([matched, np.zeros(left)]), candidate_matching_label(self.candidates), pairs


def block_rows(n_cols: int, block_bytes: int, itemsize: int = 4) -> int:
    """Rows per block so that a block of `n_cols` columns stays near `block_bytes`."""
    return max(1, block_bytes // (itemsize * max(1, n_cols)))


def unit_rows(directions: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (float32, CPU); a zero row stays zero (cosine 0 with everything)."""
    directions = directions.detach().float().cpu()
    return directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)


def match_directions(mine: torch.Tensor, theirs: torch.Tensor, *, block_bytes: int = 64 * 2**20,
                     hungarian_max: int = HUNGARIAN_MAX, candidates: int = CANDIDATES,
                     approximate: bool = True) -> PairMatch:
    """Match rows of `mine` (L, d) to rows of `theirs` (L', d) on |cosine|, in blocks of rows."""
    mine, theirs = unit_rows(mine), unit_rows(theirs)
    reducer = SimilarityReducer(len(mine), len(theirs), hungarian_max=hungarian_max, candidates=candidates,
                                approximate=approximate)
    step = block_rows(len(theirs), block_bytes)
    for start in range(0, len(mine), step):
        reducer.add(start, (mine[start:start + step] @ theirs.T).abs_())
    return reducer.finish()
