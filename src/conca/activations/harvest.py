"""Model x contexts x sites -> activation store, resumable shard by shard.

Shards are serialised, checksummed and written by a background thread while the model runs on
the next shard. Under torchrun each rank harvests every world_size-th shard into its own
sub-store (``rank_RRR/``) and rank 0 then writes the top-level manifest listing all shards in
context order, so the merged store reads exactly like a single-process one.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from conca.activations.provenance import model_digest
from conca.activations.store import MANIFEST, ActivationStore, Manifest, ShardInfo, atomic_write_json, parse_dtype
from conca.errors import ConfigError
from conca.models.load import LoadedModel
from conca.models.sites import Site, parse_sites, resolve, run_to_sites
from conca.text.batching import Contexts
from conca.training import distributed


class _ShardWriter:
    """Appends shards to a store on one background thread, one shard in flight at most (so the
    memory held is one shard being written plus the one being built). Shards are appended in
    submission order; a failed write is raised at the next submit or at close."""

    def __init__(self, store: ActivationStore):
        self.store = store
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conca-writer")
        self.pending: Future | None = None

    def submit(self, acts: dict[str, torch.Tensor], token_ids: torch.Tensor, contexts: tuple[int, int]) -> None:
        self.wait()
        self.pending = self.pool.submit(self.store.append_shard, acts, token_ids, contexts)

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
) -> ActivationStore:
    """Run the model over `contexts` and store the activations of masked-in tokens at `sites`.

    Work is cut into shards of `shard_contexts` contexts; a store that already holds some
    shards (an interrupted harvest) continues after the last complete one. Launched with
    torchrun, the shards are shared out across ranks (see the module docstring)."""
    sites = parse_sites(sites)
    parse_dtype(dtype)
    if shard_contexts < 1 or batch_size < 1:
        raise ConfigError(f"shard_contexts and batch_size must be positive, got {shard_contexts}, {batch_size}")
    for site in sites:  # fail on a bad site before anything is written
        resolve(loaded.model, site)
    manifest = Manifest(
        model=loaded.name,
        sites=[str(s) for s in sites],
        d_model=loaded.d_model,
        dtype=dtype,
        ctx_len=int(contexts.ids.shape[1]),
        n_contexts_planned=len(contexts),
        extra=dict(extra or {}),
        planned_shard_tokens=[int(contexts.mask[s:s + shard_contexts].sum()) for s in range(0, len(contexts), shard_contexts)],
        model_digest=model_digest(loaded.name) or "",
    )
    device = next(loaded.model.parameters()).device
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
    total = sum(min(s + shard_contexts, len(contexts)) - s for s in starts)
    bar = tqdm(total=total, unit="ctx", desc="harvest", disable=not (progress and distributed.is_main_process()),
               dynamic_ncols=True)
    writer = _ShardWriter(store)
    try:
        for shard_start in starts:
            chunk = contexts.subset(shard_start, min(shard_start + shard_contexts, len(contexts)))
            per_site: dict[str, list[torch.Tensor]] = {str(s): [] for s in sites}
            token_ids = []
            for b in range(0, len(chunk), batch_size):
                ids = chunk.ids[b:b + batch_size].to(device)
                mask = chunk.mask[b:b + batch_size].to(device)
                acts = run_to_sites(loaded.model, ids, sites)
                for site in sites:
                    per_site[str(site)].append(acts[site][mask].float().cpu())
                token_ids.append(ids[mask].cpu())
                bar.update(len(ids))
            writer.submit({k: torch.cat(v) for k, v in per_site.items()}, torch.cat(token_ids),
                          (shard_start, shard_start + len(chunk)))
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
