"""One streaming pass of activations through a dictionary -> per-latent statistics for the atlas.

`collect_latent_stats` reads the activations once, chunk by chunk, and keeps for every latent:
exact firing counts (z > 0) and sums, its exact top-k tokens (and bottom-k, most negative, for
dictionaries whose latents are signed), and a uniform sample without replacement of the tokens
where it fires. Memory is O(latents x (top + sample)) whatever the number of tokens.

The sample is priority sampling with a fixed random key per (token, latent): a 32-bit hash of
the token's global index, the latent and the seed; a latent keeps the `sample` firing tokens of
largest key. The keys of one latent are all distinct (the hash is a bijection of the token index
for tokens below 2**32), so the sample, like the top-k, does not depend on how the tokens were cut
into chunks. Ties in value go to the earlier token.

Each chunk is encoded in float32 in sub-batches whose code matrix holds at most
`ENCODE_ELEMENTS` entries. Most candidates are rejected against the running k-th value (or key)
of their latent, so after the first chunks the per-chunk work beyond the encoder is small. Sparse
codes (TopK-like: only nonzeros) are handled from `z.nonzero()`; signed dense codes on the dense
matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from conca.errors import ConfigError
from conca.runtime.memory import release_freed_memory

ENCODE_ELEMENTS = 2**23  # entries of the (tokens, latents) code matrix encoded at once (32 MiB in fp32)
_MASK32 = 0xFFFFFFFF


@dataclass
class LatentStats:
    """Per-latent statistics of one pass (numpy arrays; L latents, k = top, R = sample).

    Tokens are global indices in pass order (those of the source's `chunks()`); -1 pads, with
    NaN values, where a latent has fewer qualifying tokens. `sample_*` rows are in random order
    (any prefix of a row is itself a uniform sample)."""

    n_tokens: int
    signed: bool
    seed: int
    fire_count: np.ndarray  # (L,) int64: tokens with z > 0
    value_sum: np.ndarray  # (L,) float64: sum of z over all tokens
    firing_sum: np.ndarray  # (L,) float64: sum of z over the tokens where z > 0
    top_values: np.ndarray  # (L, k) float32, descending (z > 0 only)
    top_tokens: np.ndarray  # (L, k) int64
    bottom_values: np.ndarray  # (L, k) float32, ascending (z < 0 only); (L, 0) unless signed
    bottom_tokens: np.ndarray  # (L, k) int64
    sample_values: np.ndarray  # (L, R) float32: a uniform sample of the firing tokens' values
    sample_tokens: np.ndarray  # (L, R) int64

    @property
    def n_latents(self) -> int:
        return int(self.fire_count.shape[0])

    @property
    def density(self) -> np.ndarray:
        return self.fire_count / max(self.n_tokens, 1)

    @property
    def max(self) -> np.ndarray:
        """(L,) the largest value of each latent (NaN where it never fired)."""
        return self.top_values[:, 0] if self.top_values.shape[1] else np.full(self.n_latents, np.nan, np.float32)

    @property
    def mean_firing(self) -> np.ndarray:
        """(L,) mean of z over the tokens where the latent fires (NaN where it never fired)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.fire_count > 0, self.firing_sum / np.maximum(self.fire_count, 1), np.nan)


# --- keys: a 32-bit bijective mixer computed in int64 without overflow ------------------------------


def _mix32(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """A bijection of 32-bit integers held in int64 (xor-shifts and odd multipliers below 2**31,
    so no product overflows int64). `inplace`: x may be overwritten."""
    x = x if inplace else x.clone()
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(0x5BD1E995).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


def token_hash(tokens: torch.Tensor, seed: int) -> torch.Tensor:
    return _mix32((tokens & _MASK32) ^ _mix32(torch.tensor(seed & _MASK32)))


def latent_hash(latents: torch.Tensor, seed: int) -> torch.Tensor:
    return _mix32((latents * 0x9E3779B1 + (seed >> 32) + 0x632BE5AB) & _MASK32)


def sample_keys(token_h: torch.Tensor, latent_h: torch.Tensor) -> torch.Tensor:
    """The priority key of (token, latent) from their hashes: distinct over tokens for one latent."""
    return _mix32(torch.bitwise_xor(token_h, latent_h), inplace=True)


# --- the running per-latent selections ----------------------------------------------------------


class _Keep:
    """Per latent, the `size` candidates of largest `order` (ties: the earlier token), with their
    value and token. `threshold[j]` is what a new candidate must exceed to enter latent j's list:
    the last entry once the list is full, else `floor`.

    Offered candidates wait in a buffer and are merged when it holds `flush_at` of them (about
    latents x size, so memory stays O(latents x size)) or at `flush()`: merging sorts, and doing
    it once per batch would cost as much as the encoder while the lists fill. A threshold a little
    stale only lets more candidates into the buffer; the result is the same."""

    def __init__(self, n_latents: int, size: int, order_dtype: torch.dtype, pad, floor, sort_key, device) -> None:
        self.size, self.pad, self.floor, self.sort_key = size, pad, floor, sort_key
        self.order = torch.full((n_latents, size), pad, dtype=order_dtype, device=device)
        self.value = torch.full((n_latents, size), float("nan"), dtype=torch.float32, device=device)
        self.token = torch.full((n_latents, size), -1, dtype=torch.int64, device=device)
        self.threshold = torch.full((n_latents,), floor, dtype=order_dtype, device=device)
        self.flush_at = max(2**16, n_latents * size)
        self.pending: list[tuple[torch.Tensor, ...]] = []
        self.n_pending = 0

    def offer(self, cols: torch.Tensor, order: torch.Tensor, values: torch.Tensor, tokens: torch.Tensor) -> None:
        """Candidates above their latent's threshold, in increasing token order (after earlier offers)."""
        if self.size == 0 or cols.numel() == 0:
            return
        self.pending.append((cols, order, values, tokens))
        self.n_pending += cols.numel()
        if self.n_pending >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        cols, order, values, tokens = (torch.cat(parts) for parts in zip(*self.pending))
        self.pending, self.n_pending = [], 0
        # Segmented top-`size`: one stable sort by (latent, -order); ties keep token order.
        perm = torch.sort(cols * (1 << 32) + self.sort_key(order), stable=True).indices
        cols, order, values, tokens = cols[perm], order[perm], values[perm], tokens[perm]
        starts = torch.ones_like(cols, dtype=torch.bool)
        starts[1:] = cols[1:] != cols[:-1]
        segment = torch.cumsum(starts, 0) - 1
        first = torch.nonzero(starts).squeeze(1)
        rank = torch.arange(len(cols), device=cols.device) - first[segment]
        keep = rank < self.size
        latents = cols[first]
        m, size = len(latents), self.size
        cand_order = torch.full((m, size), self.pad, dtype=self.order.dtype, device=cols.device)
        cand_value = torch.full((m, size), float("nan"), dtype=torch.float32, device=cols.device)
        cand_token = torch.full((m, size), -1, dtype=torch.int64, device=cols.device)
        at = (segment[keep], rank[keep])
        cand_order[at], cand_value[at], cand_token[at] = order[keep], values[keep], tokens[keep]
        # Merge: the kept entries first (all earlier tokens), so a stable sort keeps ties for them.
        both_order = torch.cat([self.order[latents], cand_order], 1)
        pick = torch.sort(both_order, dim=1, descending=True, stable=True).indices[:, :size]
        self.order[latents] = both_order.gather(1, pick)
        self.value[latents] = torch.cat([self.value[latents], cand_value], 1).gather(1, pick)
        self.token[latents] = torch.cat([self.token[latents], cand_token], 1).gather(1, pick)
        last = self.order[latents, size - 1]
        full = self.token[latents, size - 1] >= 0
        floor = torch.full_like(last, self.floor)
        self.threshold[latents] = torch.where(full, torch.maximum(last, floor), floor)

    def state_bytes(self) -> int:
        """Bytes of the lists and of the buffer's bound (flush_at candidates of 4 tensors, 8 bytes each)."""
        lists = sum(t.numel() * t.element_size() for t in (self.order, self.value, self.token, self.threshold))
        return lists + (32 * self.flush_at if self.size else 0)


def _value_sort_key(v: torch.Tensor) -> torch.Tensor:
    """For v > 0 (float32): a non-negative int64 below 2**31 that decreases as v increases
    (positive floats order as their bit patterns)."""
    return (2**31 - 1) - v.view(torch.int32).to(torch.int64)


def _key_sort_key(keys: torch.Tensor) -> torch.Tensor:
    """For 32-bit keys: a non-negative int64 that decreases as the key increases."""
    return _MASK32 - keys


class _Pass:
    """The running state of `collect_latent_stats`."""

    def __init__(self, n_latents: int, top: int, sample: int, seed: int, signed: bool, device) -> None:
        self.n_latents, self.seed, self.signed, self.device = n_latents, seed, signed, device
        self.n_tokens = 0
        self.fire_count = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.value_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.firing_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        inf = float("inf")
        self.top = _Keep(n_latents, top, torch.float32, -inf, 0.0, _value_sort_key, device)  # order = z
        self.bottom = _Keep(n_latents, top if signed else 0, torch.float32, -inf, 0.0, _value_sort_key, device)  # order = -z
        self.sample = _Keep(n_latents, sample, torch.int64, -1, -1, _key_sort_key, device)  # order = key
        self.latent_h = latent_hash(torch.arange(n_latents, device=device), seed)

    def update(self, z: torch.Tensor) -> None:
        """The next tokens' codes (n, L)."""
        n = z.shape[0]
        tokens = torch.arange(self.n_tokens, self.n_tokens + n, device=z.device)
        if self.signed:
            self._update_dense(z, tokens)
        else:
            rows, cols = z.nonzero(as_tuple=True)  # row-major: increasing token order
            self._update_sparse(rows, cols, z[rows, cols], tokens)
        self.n_tokens += n

    def update_entries(self, n: int, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        """The next n tokens' codes given by their nonzero entries (rows nondecreasing)."""
        tokens = torch.arange(self.n_tokens, self.n_tokens + n, device=values.device)
        self._update_sparse(rows, cols, values, tokens)
        self.n_tokens += n

    def _update_sparse(self, rows, cols, values, tokens: torch.Tensor) -> None:
        self.value_sum.index_add_(0, cols, values.double())
        firing = values > 0
        rows, cols, values = rows[firing], cols[firing], values[firing]
        self.fire_count += torch.bincount(cols, minlength=self.n_latents)
        self.firing_sum.index_add_(0, cols, values.double())
        self._offer_top(self.top, rows, cols, values, tokens, values)
        keys = sample_keys(token_hash(tokens[rows], self.seed), self.latent_h[cols])
        self._offer_sample(rows, cols, values, tokens, keys)

    def _update_dense(self, z: torch.Tensor, tokens: torch.Tensor) -> None:
        firing = z > 0
        self.fire_count += firing.sum(0)
        self.value_sum += z.sum(0, dtype=torch.float64)
        self.firing_sum += z.clamp_min(0).sum(0, dtype=torch.float64)
        rows, cols = (z > self.top.threshold[None, :]).nonzero(as_tuple=True)
        values = z[rows, cols]
        self._offer_top(self.top, rows, cols, values, tokens, values)
        if self.bottom.size:
            rows, cols = (z < -self.bottom.threshold[None, :]).nonzero(as_tuple=True)
            values = z[rows, cols]
            self._offer_top(self.bottom, rows, cols, values, tokens, -values)
        if self.sample.size:
            keys = sample_keys(token_hash(tokens, self.seed)[:, None], self.latent_h[None, :])
            keys.masked_fill_(~firing, -1)
            rows, cols = (keys > self.sample.threshold[None, :]).nonzero(as_tuple=True)
            keys = keys[rows, cols]
            self.sample.offer(cols, keys, z[rows, cols], tokens[rows])

    @staticmethod
    def _offer_top(keep: _Keep, rows, cols, values, tokens, order) -> None:
        if keep.size == 0:
            return
        above = order > keep.threshold[cols]
        rows, cols, values, order = rows[above], cols[above], values[above], order[above]
        keep.offer(cols, order, values, tokens[rows])

    def _offer_sample(self, rows, cols, values, tokens, keys) -> None:
        if self.sample.size == 0:
            return
        above = keys > self.sample.threshold[cols]
        rows, cols, values, keys = rows[above], cols[above], values[above], keys[above]
        self.sample.offer(cols, keys, values, tokens[rows])

    def state_bytes(self) -> int:
        """Bytes of the running state: what grows with latents x (top + sample), never with tokens."""
        fixed = sum(t.numel() * t.element_size() for t in (self.fire_count, self.value_sum, self.firing_sum, self.latent_h))
        return fixed + self.top.state_bytes() + self.bottom.state_bytes() + self.sample.state_bytes()

    def result(self) -> LatentStats:
        for keep in (self.top, self.bottom, self.sample):
            keep.flush()
        def np_(t: torch.Tensor) -> np.ndarray:
            return t.cpu().numpy()

        return LatentStats(n_tokens=self.n_tokens, signed=self.signed, seed=self.seed,
                           fire_count=np_(self.fire_count), value_sum=np_(self.value_sum), firing_sum=np_(self.firing_sum),
                           top_values=np_(self.top.value), top_tokens=np_(self.top.token),
                           bottom_values=np_(self.bottom.value), bottom_tokens=np_(self.bottom.token),
                           sample_values=np_(self.sample.value), sample_tokens=np_(self.sample.token))


# --- the pass ------------------------------------------------------------------------------------


def sparse_encoder(dictionary):
    """For a plain TopK SAE, x -> (rows, cols, values) of its codes' nonzeros straight from its
    top-k, without the dense (tokens, latents) code matrix and its nonzero() scan; else None.
    Only where `encode` is TopKSAE's own (BatchTopK and Matryoshka encode otherwise)."""
    from conca.dictionaries.topk import TopKSAE

    if type(dictionary).encode is not TopKSAE.encode:
        return None

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values, indices = dictionary._topk(dictionary.pre_activation(x), dictionary.config.k)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(values.shape[1])
        values, cols = values.reshape(-1).float(), indices.reshape(-1)
        nonzero = values != 0
        return rows[nonzero], cols[nonzero], values[nonzero]

    return encode


def dictionary_device(dictionary) -> torch.device:
    return next(iter(dictionary.parameters()), torch.zeros(0)).device


def encode_batch_tokens(n_latents: int, batch_tokens: int | None = None) -> int:
    return batch_tokens or max(1, ENCODE_ELEMENTS // n_latents)


class _EvalMode:
    """The dictionary in eval mode (inference-time encodings, e.g. BatchTopK's threshold), restored after."""

    def __init__(self, dictionary) -> None:
        self.dictionary = dictionary

    def __enter__(self):
        self.was_training = self.dictionary.training
        self.dictionary.eval()

    def __exit__(self, *exc) -> None:
        self.dictionary.train(self.was_training)


def collect_latent_stats(dictionary, chunks, top: int = 20, sample: int = 200, seed: int = 0, signed: bool | None = None,
                         progress: bool = False, batch_tokens: int | None = None, total_tokens: int | None = None) -> LatentStats:
    """One pass over `chunks` (an iterable of (n, d_in) activation tensors, or a source from
    conca.atlas.sources) -> LatentStats. `signed` (default: the dictionary's `signed_latents`)
    adds the bottom-k. For a transcoder the chunks are its input site's activations."""
    for name, value in (("top", top), ("sample", sample)):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    signed = bool(getattr(dictionary, "signed_latents", False)) if signed is None else bool(signed)
    if hasattr(chunks, "chunks"):
        total_tokens = chunks.n_tokens if total_tokens is None else total_tokens
        chunks = chunks.chunks()
    device = dictionary_device(dictionary)
    n_latents = int(dictionary.config.n_latents)
    step = encode_batch_tokens(n_latents, batch_tokens)
    state = _Pass(n_latents, top, sample, seed, signed, device)
    sparse = None if signed else sparse_encoder(dictionary)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_tokens, unit="tok", desc="atlas pass", disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode(), _EvalMode(dictionary):
            for chunk in chunks:
                for start in range(0, chunk.shape[0], step):
                    x = chunk[start:start + step].to(device=device, dtype=torch.float32)
                    if sparse is not None:
                        state.update_entries(x.shape[0], *sparse(x))
                    else:
                        state.update(dictionary.encode(x).float())
                    bar.update(x.shape[0])
                release_freed_memory()  # else glibc's kept fragments grow the peak with the number of shards
    finally:
        bar.close()
    return state.result()


def encode_at(dictionary, source, token_index: np.ndarray, latent: np.ndarray, batch_tokens: int | None = None) -> np.ndarray:
    """z[token_index[i], latent[i]] for every pair, reading from `source` only the segments (store
    shards, context batches) that hold those tokens, each once, and encoding each distinct token
    once. Memory: one segment's activations plus the pairs."""
    token_index = np.asarray(token_index, dtype=np.int64)
    latent = np.asarray(latent, dtype=np.int64)
    out = np.zeros(len(token_index), dtype=np.float32)
    if len(token_index) == 0:
        return out
    unique, inverse = np.unique(token_index, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    inv_sorted = inverse[order]
    device = dictionary_device(dictionary)
    step = encode_batch_tokens(int(dictionary.config.n_latents), batch_tokens)
    with torch.inference_mode(), _EvalMode(dictionary):
        for lo, hi, acts in source.gather(unique):
            for start in range(lo, hi, step):
                stop = min(start + step, hi)
                z = dictionary.encode(acts[start - lo:stop - lo].to(device=device, dtype=torch.float32)).float()
                a, b = np.searchsorted(inv_sorted, [start, stop])
                pairs = order[a:b]
                rows = torch.from_numpy(inv_sorted[a:b] - start).to(device)
                cols = torch.from_numpy(latent[pairs]).to(device)
                out[pairs] = z[rows, cols].cpu().numpy()
    return out
