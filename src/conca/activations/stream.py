"""Shuffled training batches streamed from disk, never loading a whole store into memory.

A source is a list of chunks (store shards, or row blocks of a memory-mapped .npy). Each epoch
visits the chunks in a seeded random order, a few at a time (a "window"); rows inside a window
are shuffled and cut into batches, and the remainder of a window that does not fill a batch is
dropped (a different permutation uses it next epoch). Because batch counts then depend only on
chunk sizes, resuming at step N skips ahead by arithmetic, without reading skipped data.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from conca.activations.store import MANIFEST, ActivationStore
from conca.errors import ConfigError, CorruptDataError, InputError, ShapeError


class ActivationSource(Protocol):
    d: int
    chunk_sizes: list[int]
    description: str

    def load_chunk(self, index: int) -> torch.Tensor: ...


def _check_finite(x: torch.Tensor, where: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).sum().item()
        raise CorruptDataError(f"NaN/inf activations in {where} ({bad} rows): clean or re-harvest the data")
    return x


FOLLOW_POLL_S = 0.5  # how often a following source re-reads the manifest of a store being written
FOLLOW_TIMEOUT_S = 3600.0  # how long it waits for the next shard before giving up


class StoreSource:
    """The shards of one site of a store.

    With `follow`, the store may still be being harvested: the chunk sizes come from the
    harvest's shard plan, `load_chunk` waits for a shard until the harvest has written it, and
    the first epoch reads shards in order (`in_order_epochs`), so training overlaps harvesting.
    The result does not depend on timing: following a complete store gives the same batches."""

    def __init__(self, store: ActivationStore, site: str, follow: bool = False):
        self.store = store
        self.site = store.check_site(site)
        self.d = store.manifest.d_model
        self.chunk_sizes = [s.n_tokens for s in store.manifest.shards]
        self.description = f"{store.path} [{self.site}]"
        self.in_order_epochs = 1 if follow else 0
        self.following = follow and not store.manifest.complete
        if follow:
            planned = store.manifest.planned_shard_tokens
            if store.manifest.extra.get("max_norm_ratio"):
                raise InputError(f"store {store.path} drops norm outliers as it is harvested (max_norm_ratio="
                                 f"{store.manifest.extra['max_norm_ratio']}), so its shard sizes are known only once "
                                 "written: it cannot be followed; train once the harvest is complete")
            if not planned:
                raise InputError(f"store {store.path} records no shard plan (written by an older conca): "
                                 "it cannot be followed; train once the harvest is complete")
            self.chunk_sizes = list(planned)

    def _wait_for(self, index: int) -> None:
        deadline = time.monotonic() + FOLLOW_TIMEOUT_S
        while index >= len(self.store.manifest.shards):
            if self.store.manifest.complete:
                raise InputError(f"store {self.store.path} was completed with {len(self.store.manifest.shards)} shards, "
                                 f"fewer than its plan of {len(self.chunk_sizes)}")
            if time.monotonic() > deadline:
                raise InputError(f"waited {FOLLOW_TIMEOUT_S:.0f} s for shard {index} of {self.store.path}: is the harvest running?")
            time.sleep(FOLLOW_POLL_S)
            self.store = ActivationStore.open(self.store.path)
        if self.store.manifest.shards[index].n_tokens != self.chunk_sizes[index]:
            raise CorruptDataError(f"shard {index} of {self.store.path} holds {self.store.manifest.shards[index].n_tokens} "
                                   f"tokens, its plan said {self.chunk_sizes[index]}")

    def load_chunk(self, index: int) -> torch.Tensor:
        if self.following:
            self._wait_for(index)
        x = self.store.load_shard(index, self.site)["act"].float()
        return _check_finite(x, f"{self.store.path / self.store.manifest.shards[index].file}")


class NpySource:
    def __init__(self, path: Path, chunk_rows: int = 65536):
        path = Path(path)
        if not path.exists():
            raise InputError(f"activation file not found: {path}")
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{path} is not a readable .npy array: {exc}") from exc
        if not isinstance(self.array, np.ndarray):  # an .npz archive under a .npy name
            raise InputError(f"{path} is an .npz archive, not a .npy array: save one matrix with numpy.save")
        if self.array.dtype.kind != "f":  # ints, bools, complex, strings: no silent cast to float
            raise InputError(f"{path} holds {self.array.dtype} values: activations must be a float array "
                             "(float16/32/64); convert it with .astype(numpy.float32) if that is what you mean")
        if self.array.ndim != 2:
            raise ShapeError(f"{path} must be a 2-D (tokens, d) matrix, got shape {self.array.shape}")
        n, self.d = self.array.shape
        self.path = path
        self.chunk_rows = chunk_rows
        self.chunk_sizes = [min(chunk_rows, n - s) for s in range(0, n, chunk_rows)]
        self.description = str(path)

    def load_chunk(self, index: int) -> torch.Tensor:
        start = index * self.chunk_rows
        rows = np.asarray(self.array[start:start + self.chunk_sizes[index]], dtype=np.float32)
        return _check_finite(torch.from_numpy(rows.copy()), f"{self.path} rows {start}..")


class TensorSource:
    """An in-memory matrix, for tests and small experiments."""

    def __init__(self, x: torch.Tensor, chunk_rows: int = 65536):
        if x.ndim != 2:
            raise ShapeError(f"activations must be 2-D (tokens, d), got shape {tuple(x.shape)}")
        self.x = _check_finite(x.float(), "the given tensor")
        self.d = x.shape[1]
        self.chunk_rows = chunk_rows
        self.chunk_sizes = [min(chunk_rows, len(x) - s) for s in range(0, len(x), chunk_rows)]
        self.description = f"tensor {tuple(x.shape)}"

    def load_chunk(self, index: int) -> torch.Tensor:
        return self.x[index * self.chunk_rows: index * self.chunk_rows + self.chunk_sizes[index]]


class PairedSource:
    """Two row-aligned sources side by side (e.g. MLP input and output of the same tokens, for
    transcoders): chunks are concatenated along the feature axis, so one shuffle serves both."""

    def __init__(self, inputs: ActivationSource, targets: ActivationSource):
        if list(inputs.chunk_sizes) != list(targets.chunk_sizes):
            raise ShapeError(f"{inputs.description} and {targets.description} are not row-aligned (different chunk sizes)")
        self.inputs, self.targets = inputs, targets
        self.in_order_epochs = getattr(inputs, "in_order_epochs", 0)
        self.d = inputs.d + targets.d
        self.chunk_sizes = list(inputs.chunk_sizes)
        self.description = f"{inputs.description} -> {targets.description}"

    def load_chunk(self, index: int) -> torch.Tensor:
        return torch.cat([self.inputs.load_chunk(index), self.targets.load_chunk(index)], dim=1)


def open_source(spec: "str | Path | ActivationSource", site: str | None = None, expected_dim: int | None = None,
                follow: bool = False) -> ActivationSource:
    """A `.npy` file, a store directory (with `site`, optional when it has only one) or a source.

    `follow`: the store may still be being harvested (see `StoreSource`); wait for it to appear."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.suffix == ".npy":
            source = NpySource(path)
        else:
            deadline = time.monotonic() + FOLLOW_TIMEOUT_S
            while follow and not (path / MANIFEST).exists() and time.monotonic() < deadline:
                time.sleep(FOLLOW_POLL_S)
            store = ActivationStore.open(path)
            if site is None:
                if len(store.sites) != 1:
                    raise ConfigError(f"store {path} has sites {', '.join(store.sites)}: choose one with --site")
                site = store.sites[0]
            source = StoreSource(store, site, follow=follow)
    else:
        source = spec
    if expected_dim is not None and source.d != expected_dim:
        raise ShapeError(f"activations in {source.description} have width {source.d}, but {expected_dim} is expected")
    if sum(source.chunk_sizes) == 0:
        raise InputError(f"{source.description} holds no activations")
    return source


def read_rows(source: ActivationSource, n: int) -> torch.Tensor:
    """The first `n` rows of a source (fewer if it is smaller), reading only the chunks needed."""
    out, have = [], 0
    for i in range(len(source.chunk_sizes)):
        if have >= n:
            break
        chunk = source.load_chunk(i)[: n - have]
        out.append(chunk)
        have += len(chunk)
    return torch.cat(out)


class BatchStream:
    def __init__(self, source: ActivationSource, batch_size: int, seed: int = 0, window_chunks: int = 4):
        if batch_size < 1:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.window_chunks = max(1, window_chunks)
        if self._epoch_plan(0)[1] == 0:
            raise InputError(
                f"{source.description} has {sum(source.chunk_sizes)} rows in chunks too small for batch size "
                f"{batch_size}: lower --batch-size or harvest more tokens"
            )

    def _epoch_plan(self, epoch: int) -> tuple[list[tuple[list[int], int]], int]:
        """[(chunk indices of a window, batches in it)], total batches in the epoch."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.source.chunk_sizes), generator=g).tolist()
        if epoch < getattr(self.source, "in_order_epochs", 0):  # a followed store: shards as they are written
            order = sorted(order)
        windows = []
        for w in range(0, len(order), self.window_chunks):
            chunks = order[w:w + self.window_chunks]
            windows.append((chunks, sum(self.source.chunk_sizes[c] for c in chunks) // self.batch_size))
        return windows, sum(nb for _, nb in windows)

    def batches(self, start_step: int = 0) -> Iterator[torch.Tensor]:
        """An endless iterator of (batch_size, d) float32 batches, starting at batch `start_step`."""
        skip = start_step
        epoch = 0
        while True:
            windows, total = self._epoch_plan(epoch)
            if skip >= total:
                skip -= total
                epoch += 1
                continue
            for w, (chunks, n_batches) in enumerate(windows):
                if skip >= n_batches:
                    skip -= n_batches
                    continue
                rows = torch.cat([self.source.load_chunk(c) for c in chunks])
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + w + 1)
                perm = torch.randperm(len(rows), generator=g)
                for b in range(skip, n_batches):
                    yield rows[perm[b * self.batch_size:(b + 1) * self.batch_size]]
                skip = 0
            epoch += 1


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()
JOIN_TIMEOUT_S = 30.0  # how long closing a prefetch waits for its reader to finish the item in hand


def prefetch(items: Iterator, depth: int = 2, pin_memory: bool = False) -> Iterator:
    """The same items in the same order, produced `depth` ahead by a background thread, so that
    reading shards from disk, verifying checksums and shuffling overlap with training.

    Errors in the reader are raised in the consumer. Closing the returned generator (or
    dropping it) stops the thread after at most one more item, and waits for that (up to
    JOIN_TIMEOUT_S): a daemon thread still inside a torch op when the interpreter exits aborts the
    process ("terminate called without an active exception", exit -6, seen after a finished
    `conca train`)."""
    ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if pin_memory:
                    item = item.pin_memory()
                if not offer(item):
                    return
            offer(_END)
        except BaseException as exc:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            offer(_Failed(exc))

    thread = threading.Thread(target=read, name="conca-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        if thread is not threading.current_thread():
            # A reader blocked on a source that waits for new shards (--follow) is left behind after the timeout.
            thread.join(timeout=JOIN_TIMEOUT_S)
