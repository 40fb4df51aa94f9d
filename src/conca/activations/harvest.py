"""Model x contexts x sites -> activation store, resumable shard by shard.

Shards are serialised, checksummed and written by a background thread while the model runs on
the next shard. Under torchrun each rank harvests every world_size-th shard into its own
sub-store (``rank_RRR/``) and rank 0 then writes the top-level manifest listing all shards in
context order, so the merged store reads exactly like a single-process one.
"""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from conca.activations.outliers import check_ratio, exclude_outliers
from conca.activations.provenance import model_digest
from conca.activations.store import MANIFEST, ActivationStore, Manifest, ShardInfo, context_positions, parse_dtype
from conca.errors import ConfigError, CorruptDataError
from conca.fileio import atomic_write_json
from conca.models.load import LoadedModel
from conca.models.compiled import compiled_layers, should_compile
from conca.models.precision import forward_precision, resolve_forward_dtype
from conca.models.sites import Site, parse_sites, resolve, run_to_sites
from conca.runtime import distributed
from conca.text.batching import Contexts


class _ShardWriter:
    """Appends shards to a store on one background thread, one shard in flight at most (so the
    memory held is one shard being written plus the one being built). Shards are appended in
    submission order; a failed write is raised at the next submit or at close."""

    def __init__(self, store: ActivationStore):
        self.store = store
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conca-writer")
        self.pending: Future | None = None

    def submit(self, acts: dict[str, torch.Tensor], token_ids: torch.Tensor, contexts: tuple[int, int],
               positions: torch.Tensor, replace: int | None = None) -> None:
        self.wait()
        self.pending = self.pool.submit(self.store.append_shard, acts, token_ids, contexts, positions, replace)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        """Finish the shard in flight (a completed forward is never thrown away), then stop."""
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def harvest(
    loaded: LoadedModel,
    contexts: Contexts,
    sites: "list[Site] | list[str] | str",
    out: Path,
    dtype: str = "fp32",
    batch_size: int = 8,
    shard_contexts: int = 64,
    extra: dict | None = None,
    progress: bool = True,
    forward_dtype: str = "fp32",
    max_norm_ratio: float = 0.0,
    compile: str = "off",
) -> ActivationStore:
    """Run the model over `contexts` and store the activations of masked-in tokens at `sites`.

    Work is cut into shards of `shard_contexts` contexts; a store that already holds some
    shards (an interrupted harvest) continues after the last complete one, first rewriting any
    listed shard that is missing or fails its checks (size, sha256, contents). Launched with
    torchrun, the shards are shared out across ranks (see the module docstring).

    `forward_dtype` ('fp32', 'bf16' or 'auto': bf16 where the device computes it natively) is the
    precision of the model's forward (conca.models.precision); `max_norm_ratio` > 1 drops tokens
    whose norm exceeds that multiple of the shard's median norm at any site
    (conca.activations.outliers). Both are recorded in the manifest. `compile` ('on', 'off' or
    'auto': on from 100k tokens) runs the decoder layers compiled (conca.models.compiled)."""
    sites = parse_sites(sites)
    parse_dtype(dtype)
    max_norm_ratio = check_ratio(max_norm_ratio)
    if shard_contexts < 1 or batch_size < 1:
        raise ConfigError(f"shard_contexts and batch_size must be positive, got {shard_contexts}, {batch_size}")
    for site in sites:  # fail on a bad site before anything is written
        resolve(loaded.model, site)
    device = next(loaded.model.parameters()).device
    settings = {"forward_dtype": resolve_forward_dtype(forward_dtype, device), "max_norm_ratio": max_norm_ratio}
    manifest = Manifest(
        model=loaded.name,
        sites=[str(s) for s in sites],
        d_model=loaded.d_model,
        dtype=dtype,
        ctx_len=int(contexts.ids.shape[1]),
        n_contexts_planned=len(contexts),
        extra={**(extra or {}), **settings},
        planned_shard_tokens=[int(contexts.mask[s:s + shard_contexts].sum()) for s in range(0, len(contexts), shard_contexts)],
        model_digest=model_digest(loaded.name) or "",
    )
    context = distributed.init_from_env(device)
    out = Path(out)
    if context is None:
        store = ActivationStore.create_or_resume(out, manifest)
        starts = list(range(store.manifest.contexts_done, len(contexts), shard_contexts))
    else:
        # A rank's sub-store records the split it belongs to, so a resume with another world
        # size or shard size is refused rather than mixed.
        split = {"rank": context.rank, "world_size": context.world_size, "shard_contexts": shard_contexts}
        store = ActivationStore.create_or_resume(out / f"rank_{context.rank:03d}",
                                                 replace(manifest, shards=[], extra={**manifest.extra, "ranks": split}))
        mine = list(range(0, len(contexts), shard_contexts))[context.rank::context.world_size]
        starts = mine[len(store.manifest.shards):]
    # (contexts, shard to replace or None) for every shard to write: damaged listed ones first.
    work = [(tuple(store.manifest.shards[i].contexts), i) for i in _shards_to_repair(store, len(contexts))]
    work += [((s, min(s + shard_contexts, len(contexts))), None) for s in starts]
    total = sum(stop - start for (start, stop), _ in work)
    bar = tqdm(total=total, unit="ctx", desc="harvest", disable=not (progress and distributed.is_main_process()),
               dynamic_ncols=True)
    writer = _ShardWriter(store)
    n_tokens = sum(int(contexts.mask[a:b].sum()) for (a, b), _ in work)
    check_disk_space(store.path, n_tokens, manifest)
    try:
        compiling = should_compile(compile, n_tokens)
        with forward_precision(loaded.model, settings["forward_dtype"]), \
                compiled_layers(loaded.model, sites, compiling):
            _run_shards(loaded, chunks=work, contexts=contexts, sites=sites, batch_size=batch_size, device=device,
                        max_norm_ratio=max_norm_ratio, writer=writer, bar=bar, pad_batches=compiling)
    finally:
        writer.close()
        bar.close()
    store.mark_complete()
    if context is None:
        return store
    distributed.barrier()
    if context.is_main:
        merge_rank_stores(out, context.world_size, manifest)
    distributed.barrier()
    return ActivationStore.open(out)


def check_disk_space(path: Path, n_tokens: int, manifest: Manifest) -> None:
    """Refuse, before the first forward, a harvest whose shards would not fit on the disk of `path`
    (a paper-sized harvest is hundreds of GB): one error now rather than a full disk hours later."""
    per_token = len(manifest.sites) * manifest.d_model * parse_dtype(manifest.dtype).itemsize + 16  # + id, position
    needed = n_tokens * per_token
    free = shutil.disk_usage(path).free
    if needed > free:
        raise ConfigError(f"harvest needs about {needed / 2**30:.1f} GiB for {n_tokens:,} tokens x {len(manifest.sites)} "
                          f"site(s) x d={manifest.d_model} in {manifest.dtype}, but {path} has {free / 2**30:.1f} GiB "
                          f"free: use --dtype bf16, fewer --tokens or another --out")


def _run_shards(loaded: LoadedModel, chunks, contexts: Contexts, sites: list[Site], batch_size: int, device,
                max_norm_ratio: float, writer: _ShardWriter, bar, pad_batches: bool = False) -> None:
    """Forward every shard's contexts batch by batch and hand each finished shard to the writer."""
    for (shard_start, shard_stop), replace_index in chunks:
        chunk = contexts.subset(shard_start, shard_stop)
        per_site: dict[str, list[torch.Tensor]] = {str(s): [] for s in sites}
        token_ids = []
        for b in range(0, len(chunk), batch_size):
            ids = chunk.ids[b:b + batch_size].to(device)
            mask = chunk.mask[b:b + batch_size].to(device)
            acts = (_forward_full_batch(loaded.model, ids, sites, batch_size) if pad_batches
                    else run_to_sites(loaded.model, ids, sites))
            for site in sites:
                per_site[str(site)].append(acts[site][mask].float().cpu())
            token_ids.append(ids[mask].cpu())
            bar.update(len(ids))
        # Each stored token's [global context index, position]: the masked-in entries in the same
        # (row-major) order as ids[mask] above.
        positions = context_positions(chunk.mask, shard_start)
        shard_acts, shard_ids, positions, _ = exclude_outliers({k: torch.cat(v) for k, v in per_site.items()},
                                                               torch.cat(token_ids), positions, max_norm_ratio)
        writer.submit(shard_acts, shard_ids, (shard_start, shard_start + len(chunk)), positions, replace_index)


def _forward_full_batch(model, ids: torch.Tensor, sites: list[Site], batch_size: int) -> dict:
    """run_to_sites on a batch padded to `batch_size` rows (repeating its last row) and cut back:
    the rows are independent, and every forward then has one shape, which a compiled model needs
    to avoid compiling again for the last, shorter batch of each shard."""
    n = ids.shape[0]
    if n == batch_size:
        return run_to_sites(model, ids, sites)
    padded = torch.cat([ids, ids[-1:].expand(batch_size - n, -1)])
    return {site: acts[:n] for site, acts in run_to_sites(model, padded, sites).items()}


def _shards_to_repair(store: ActivationStore, n_contexts: int) -> list[int]:
    """The listed shards of a resumed store that are missing or damaged, to be harvested again.
    The manifest is marked incomplete until they are rewritten."""
    damaged = store.damaged_shards()
    if not damaged:
        return []
    for i in damaged:
        start, stop = store.manifest.shards[i].contexts
        if stop > n_contexts:
            raise CorruptDataError(f"manifest {store.path / MANIFEST}: shard {i} covers contexts {start}:{stop}, but this "
                                   f"harvest has only {n_contexts}: delete the store and harvest again")
    print(f"conca: repairing {len(damaged)} damaged shard(s) of {store.path}:\n  " + "\n  ".join(damaged.values()),
          file=sys.stderr)
    if store.manifest.complete:
        store.manifest.complete = False
        store._write_manifest()
    return sorted(damaged)


def merge_rank_stores(out: Path, world_size: int, manifest: Manifest) -> ActivationStore:
    """Write `out/manifest.json` listing the shards of every `out/rank_RRR/` sub-store in context
    order (atomically: readers see either no store or the whole one)."""
    shards: list[ShardInfo] = []
    complete = True
    for rank in range(world_size):
        sub = ActivationStore.open(out / f"rank_{rank:03d}")
        complete &= sub.manifest.complete
        shards += [replace(s, file=f"rank_{rank:03d}/{s.file}") for s in sub.manifest.shards]
    shards.sort(key=lambda s: s.contexts[0])
    merged = replace(manifest, shards=shards, complete=complete)
    atomic_write_json(out / MANIFEST, merged.to_json())
    return ActivationStore(out, merged)
