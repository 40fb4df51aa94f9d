"""Activations at a site, in memory: for evaluation-sized text (harvesting writes a store instead)."""

from __future__ import annotations

import torch

from conca.models.load import LoadedModel
from conca.models.sites import Site, run_to_sites
from conca.text.batching import Contexts


@torch.inference_mode()
def site_activations(loaded: LoadedModel, contexts: Contexts, site: "Site | str", batch_size: int = 8) -> torch.Tensor:
    """Masked-in activations at one site, in memory (for evaluation-sized text)."""
    site = Site.parse(site)
    out = []
    for b in range(0, len(contexts), batch_size):
        acts = run_to_sites(loaded.model, contexts.ids[b:b + batch_size], [site])[site]
        out.append(acts[contexts.mask[b:b + batch_size]].float())
    return torch.cat(out)
