"""Token sources for the atlas: activation chunks in a fixed order, and the context windows around
chosen tokens rebuilt from token ids.

A source is a sequence of segments (the shards of a store, or batches of contexts run through
the model) holding the tokens 0 .. n_tokens-1 in pass order. Every segment can give its token ids
and [context, position] pairs cheaply (`_tokens`) and its activations (`_acts`: a verified shard
read, or a forward). Windows, token ids and activations of chosen tokens are read grouped by
segment, each needed segment once, so rebuilding the examples of every latent costs at most one
more read of the needed segments (plus, for the values highlighted in windows, one encode of each
distinct window token: conca.atlas.collect.encode_at).

Cost of the highlighted values (benchmarks/bench_atlas.py --quick, one thread, TopK with 4608
latents over a store of 8,255 tokens): windows of every card read in 2 ms (token ids and positions
only); values for 2.1M (window token, latent) pairs in 1.2 s, against 0.8 s for the pass itself:
on a small store every token sits in some window, so it is one more pass; on a large one the
distinct window tokens are bounded by latents x examples x window width, not by the store. Memory:
the pairs (about 20 bytes each: latents x (top + groups x per_group) x window width).

A window never crosses into another context, and holds only tokens whose position is within
`before`/`after` of the target's (tokens the harvest left out, BOS or outliers, are simply absent).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from conca.errors import ConfigError, InputError

DEFAULT_CHUNK_TOKENS = 8192


@dataclass
class WindowArrays:
    """Windows around E target tokens, slot `before` of each row being the target; -1 marks slots
    without a token (another context, past either end, or a position out of range)."""

    ids: np.ndarray  # (E, W) int64 token ids
    index: np.ndarray  # (E, W) int64 global token indices
    context: np.ndarray  # (E,) int64
    position: np.ndarray  # (E,) int64
    before: int

    def valid(self, e: int) -> np.ndarray:
        return self.index[e] >= 0

    def example(self, e: int) -> dict:
        valid = self.valid(e)
        return {"ids": self.ids[e][valid].tolist(), "target": int(valid[:self.before].sum()),
                "context": int(self.context[e]), "position": int(self.position[e])}


class SegmentedSource:
    """The shared machinery; subclasses set `site`, `tokenizer`, `_offsets` and define `_tokens`,
    `_acts` and `_segment_chunks`."""

    site: str
    out_site: str | None = None
    tokenizer = None
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    _offsets: np.ndarray  # (S+1,) int64: first global token index of each segment, then n_tokens

    @property
    def n_tokens(self) -> int:
        return int(self._offsets[-1])

    @property
    def n_segments(self) -> int:
        return len(self._offsets) - 1

    def _tokens(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _acts(self, s: int, site: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def chunks(self) -> Iterator[torch.Tensor]:
        """(n, d_in) float32 activation chunks of the input site, in pass order."""
        return self._chunks(self.site)

    def targets(self) -> Iterator[torch.Tensor] | None:
        """A transcoder's output-site chunks aligned with `chunks()`; None without an output site."""
        return None if self.out_site is None else self._chunks(self.out_site)

    def _chunks(self, site: str) -> Iterator[torch.Tensor]:
        for s in range(self.n_segments):
            acts = self._acts(s, site)
            for start in range(0, acts.shape[0], self.chunk_tokens):
                yield acts[start:start + self.chunk_tokens].float()

    # --- reading chosen tokens, grouped by segment ------------------------------------------------
    def _check(self, token_indices) -> np.ndarray:
        idx = np.asarray(token_indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_tokens):
            raise InputError(f"token index out of range: this source has {self.n_tokens} tokens "
                             f"(got {int(idx.min())}..{int(idx.max())})")
        return idx

    def _by_segment(self, sorted_idx: np.ndarray) -> Iterator[tuple[int, int, int]]:
        """(segment, lo, hi): sorted_idx[lo:hi] are the requested tokens in segment s."""
        bounds = np.searchsorted(sorted_idx, self._offsets)
        for s in range(self.n_segments):
            if bounds[s + 1] > bounds[s]:
                yield s, int(bounds[s]), int(bounds[s + 1])

    def gather(self, sorted_unique: np.ndarray) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(lo, hi, acts): the input-site activations (float32) of sorted_unique[lo:hi], one needed
        segment at a time."""
        idx = self._check(sorted_unique)
        for s, lo, hi in self._by_segment(idx):
            acts = self._acts(s, self.site)
            rows = torch.from_numpy(idx[lo:hi] - self._offsets[s])
            yield lo, hi, acts[rows].float()
            del acts

    def token_ids(self, token_indices) -> np.ndarray:
        """The token id of every index (reading only the needed segments' ids)."""
        idx = self._check(token_indices)
        order = np.argsort(idx, kind="stable")
        out = np.empty(len(idx), dtype=np.int64)
        for s, lo, hi in self._by_segment(idx[order]):
            ids, _ = self._tokens(s)
            out[order[lo:hi]] = ids[idx[order[lo:hi]] - self._offsets[s]]
        return out

    def window_arrays(self, token_indices, before: int = 5, after: int = 5) -> WindowArrays:
        """Windows of up to before + 1 + after tokens around each index, in one grouped read."""
        if before < 0 or after < 0:
            raise ConfigError(f"window sizes must be non-negative, got before={before}, after={after}")
        idx = self._check(token_indices)
        width = before + 1 + after
        e = len(idx)
        out = WindowArrays(ids=np.full((e, width), -1, np.int64), index=np.full((e, width), -1, np.int64),
                           context=np.zeros(e, np.int64), position=np.zeros(e, np.int64), before=before)
        order = np.argsort(idx, kind="stable")
        offsets = np.arange(-before, after + 1)
        for s, lo, hi in self._by_segment(idx[order]):
            ids, positions = self._tokens(s)
            rows = order[lo:hi]
            local = idx[rows] - self._offsets[s]
            slots = local[:, None] + offsets[None, :]
            inside = (slots >= 0) & (slots < len(ids))
            slots = np.clip(slots, 0, max(len(ids) - 1, 0))
            context, position = positions[local, 0], positions[local, 1]
            shift = positions[slots, 1] - position[:, None]
            valid = (inside & (positions[slots, 0] == context[:, None]) & (shift >= -before) & (shift <= after))
            out.ids[rows] = np.where(valid, ids[slots], -1)
            out.index[rows] = np.where(valid, slots + self._offsets[s], -1)
            out.context[rows], out.position[rows] = context, position
        return out

    def windows(self, token_indices, before: int = 5, after: int = 5) -> list[dict]:
        """Per index: {"ids": [...], "target": i (index of the token in ids), "context": c, "position": p}."""
        arrays = self.window_arrays(token_indices, before, after)
        return [arrays.example(e) for e in range(len(arrays.context))]

    def window_values(self, dictionary, windows: WindowArrays, latents) -> np.ndarray:
        """(E, W) float32: latents[e]'s value at every token of window e (0 at empty slots), from
        one grouped read of the needed segments and one encode of each distinct window token."""
        from conca.atlas.collect import encode_at

        latents = np.broadcast_to(np.asarray(latents, dtype=np.int64)[:, None], windows.index.shape)
        valid = windows.index >= 0
        values = np.zeros(windows.index.shape, dtype=np.float32)
        values[valid] = encode_at(dictionary, self, windows.index[valid], latents[valid])
        return values


class StoreSource(SegmentedSource):
    """An activation store's shards in order (dtype -> float32, `chunk_tokens` rows per chunk);
    windows from `store.read_tokens` (token ids and positions only, no activations)."""

    def __init__(self, store, site: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, out_site: str | None = None,
                 tokenizer=None) -> None:
        if chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.store, self.chunk_tokens, self.tokenizer = store, chunk_tokens, tokenizer
        self.site = store.check_site(str(site))
        self.out_site = None if out_site is None else store.check_site(str(out_site))
        counts = [s.n_tokens for s in store.manifest.shards]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self._positions_checked = False

    def _tokens(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._positions_checked:
            require = getattr(self.store, "require_positions", None)
            if require is not None:
                require("inspect")
            self._positions_checked = True
        ids, positions = self.store.read_tokens(s)
        return np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64)

    def _acts(self, s: int, site: str | None = None) -> torch.Tensor:
        return self.store.load_shard(s, site or self.site)["act"]

    def describe(self) -> str:
        return f"store {self.store.path}"


class ContextsSource(SegmentedSource):
    """Contexts run through the model `batch_size` at a time: the activations of their masked-in
    tokens at `site` (as a harvest stores them). Token ids and positions are kept (small); the
    activations are recomputed whenever asked for."""

    # Activations kept after their forward, up to this many bytes, so that the second read (the values
    # highlighted in windows) does not run the model again: held-out text is small, a store is not.
    CACHE_BYTES = 256 * 2**20

    def __init__(self, loaded, contexts, site, batch_size: int = 8, out_site=None) -> None:
        from conca.models.sites import Site, resolve

        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.loaded, self.contexts, self.batch_size = loaded, contexts, batch_size
        self.tokenizer = getattr(loaded, "tokenizer", None)
        self._sites = {str(Site.parse(s)): Site.parse(s) for s in (site, out_site) if s is not None}
        for parsed in self._sites.values():
            resolve(loaded.model, parsed)
        self.site = str(Site.parse(site))
        self.out_site = None if out_site is None else str(Site.parse(out_site))
        mask = contexts.mask.bool()
        where = mask.nonzero().numpy().astype(np.int64)  # (n, 2) [context, position], row-major
        self._ids = contexts.ids[mask].numpy().astype(np.int64)
        self._positions = where
        starts = range(0, len(contexts), batch_size)
        per_batch = [int(mask[b:b + batch_size].sum()) for b in starts]
        self._offsets = np.concatenate([[0], np.cumsum(per_batch, dtype=np.int64)]).astype(np.int64)
        self._cache: dict[tuple[int, str], torch.Tensor] = {}
        self._cached_bytes = 0

    def _tokens(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._offsets[s], self._offsets[s + 1]
        return self._ids[lo:hi], self._positions[lo:hi]

    def _acts(self, s: int, site: str | None = None) -> torch.Tensor:
        key = (s, site or self.site)
        if key in self._cache:
            return self._cache[key]
        acts = self._forward(s, site)
        if self._cached_bytes + acts.numel() * acts.element_size() <= self.CACHE_BYTES:
            self._cache[key] = acts
            self._cached_bytes += acts.numel() * acts.element_size()
        return acts

    def _forward(self, s: int, site: str | None = None) -> torch.Tensor:
        from conca.models.sites import run_to_sites

        model = self.loaded.model
        device = next(model.parameters()).device
        b = s * self.batch_size
        ids = self.contexts.ids[b:b + self.batch_size].to(device)
        mask = self.contexts.mask[b:b + self.batch_size].bool().to(device)
        wanted = self._sites[site or self.site]
        with torch.inference_mode():
            acts = run_to_sites(model, ids, [wanted])[wanted]
            return acts[mask].float().cpu()

    def _chunks(self, site: str) -> Iterator[torch.Tensor]:
        for s in range(self.n_segments):
            yield self._acts(s, site)

    def describe(self) -> str:
        return "held-out text"
