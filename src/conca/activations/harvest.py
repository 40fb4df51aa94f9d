"""Model x contexts x sites -> activation store, resumable shard by shard."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from conca.activations.store import ActivationStore, Manifest, parse_dtype
from conca.models.load import LoadedModel
from conca.models.sites import Site, parse_sites, resolve, run_to_sites
from conca.text.batching import Contexts


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
    shards (an interrupted harvest) continues after the last complete one."""
    sites = parse_sites(sites)
    parse_dtype(dtype)
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
    )
    store = ActivationStore.create_or_resume(out, manifest)
    start = store.manifest.contexts_done
    device = next(loaded.model.parameters()).device
    bar = tqdm(total=len(contexts), initial=min(start, len(contexts)), unit="ctx", desc="harvest",
               disable=not progress, dynamic_ncols=True)
    for shard_start in range(start, len(contexts), shard_contexts):
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
        store.append_shard({k: torch.cat(v) for k, v in per_site.items()}, torch.cat(token_ids),
                           (shard_start, shard_start + len(chunk)))
    bar.close()
    store.mark_complete()
    return store
