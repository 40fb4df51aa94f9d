"""Several seeds of one method on the very same batches, for stability across seeds
(conca.evaluation.stability).

`train` already feeds every dictionary it is given the same stream of batches (the stream's order
is `cfg.seed`); what differs between the dictionaries here is only their initialisation, drawn
under `torch.manual_seed(seed)` for each seed. Training them together reads each batch once for all
of them. The caller's global random state is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from conca.activations.stream import ActivationSource
from conca.dictionaries.base import Dictionary, create
from conca.errors import ConfigError
from conca.training.config import TrainConfig
from conca.training.trainer import TrainResult, train


def seed_name(method: str, seed: int) -> str:
    return f"{method}_seed{seed}"


def seed_family(method: str, options: dict, seeds: Iterable[int]) -> dict[str, Dictionary]:
    """{"<method>_seed<s>": a `method` dictionary with `options` (create's: d_in, n_latents, ...),
    initialised under torch.manual_seed(s)}, for each seed s."""
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError(f"seeds must be distinct and at least one, got {seeds}")
    family = {}
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.manual_seed(seed)
            family[seed_name(method, seed)] = create(method, **options)
    return family


def train_seeds(method: str, source: ActivationSource, seeds: Iterable[int], cfg: TrainConfig, options: dict,
                out_dir: "Path | None" = None, **train_options) -> tuple[list[Dictionary], TrainResult]:
    """Train one `method` dictionary per seed on the same batches of `source` (one `train` call:
    batch order `cfg.seed`, initialisations the seeds'); return the trained dictionaries in seed order
    (ready for conca.evaluation.stability) and the TrainResult. `train_options` go to `train`
    (eval_x, labels, provenance, ...); with `out_dir` each is saved to out_dir/<method>_seed<s>/ and
    a stopped run resumes there."""
    family = seed_family(method, options, seeds)
    with torch.random.fork_rng(devices=[]):  # dead-latent resampling draws from the global generator
        result = train(family, source, cfg, out_dir=out_dir, **train_options)
    return list(result.dictionaries.values()), result
