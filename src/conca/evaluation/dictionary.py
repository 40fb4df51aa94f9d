"""One dictionary against a model on held-out text: reconstruction, sparsity and (spliced in)
downstream metrics, plus firing frequencies. What `conca evaluate` and the demo report."""

from __future__ import annotations

import torch

from conca.dictionaries.base import Dictionary
from conca.evaluation.downstream import downstream_metrics
from conca.evaluation.reconstruction import ReconstructionStats
from conca.models.capture import site_activations
from conca.models.load import LoadedModel
from conca.models.sites import Site
from conca.text.batching import Contexts


def evaluate_dictionary(loaded: LoadedModel, dictionary: Dictionary, site: "Site | str", contexts: Contexts,
                        batch_size: int = 8, downstream: bool = True,
                        target_site: "Site | str | None" = None) -> tuple[dict, torch.Tensor]:
    """Reconstruction and sparsity metrics on `contexts` (plus downstream ones); and firing frequencies.

    A transcoder (with `target_site`) is measured against the target site's activations; splicing
    it into the model is not measured (no downstream metrics)."""
    x = site_activations(loaded, contexts, site, batch_size)
    dictionary.check_input(x)
    y = x if target_site is None else site_activations(loaded, contexts, target_site, batch_size)
    stats = ReconstructionStats(dictionary.config.n_latents)
    with torch.no_grad():
        for i in range(0, len(x), 4096):
            z = dictionary.encode(x[i:i + 4096])
            stats.update(y[i:i + 4096], dictionary.decode(z), z)
    metrics = stats.compute()
    if downstream and target_site is None:
        metrics.update(downstream_metrics(loaded.model, dictionary, site, contexts, batch_size=batch_size))
    return metrics, stats.firing_frequency()
