"""Concept swaps through an AlignSAE's concept slots (SPEC §4.4), one swap per batch row.

Any other dictionary works too when it is given `slots`, a mapping from concept name to the latent
that stands for it (e.g. an unsupervised SAE's Hungarian-matched features), so both can be
compared with the same swap.

Two ways to move a prompt's concept a to concept b at the studied site, at the chosen positions
(by default the last prompt token, where the activations were read):

  latent_decode   z' = z; z'[a] = 0; z'[b] = alpha; the activation becomes decode(z'), or
                  x + decode(z') - decode(z) with the error term (the released code splices
                  decode(z') without it)
  decoder_column  x += alpha * ||x|| / ||W_d[b]|| * W_d[b]   (the released hook script's default)

The released table script wrote decode(z') into the input embeddings (right for layer 0 only);
here the patch is a forward hook on the studied site, for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from conca.dictionaries.align import AlignSAE
from conca.dictionaries.base import Dictionary
from conca.errors import ConfigError, InputError
from conca.interventions.hooks import ActivationEdit, LatentEdit, intervene
from conca.models.prompts import greedy_generate
from conca.models.sites import Site

SWAP_METHODS = ("latent_decode", "decoder_column")


class SlotSwap(LatentEdit):
    """Per batch row r: z'[source[r]] = 0, z'[target[r]] = alpha (slots as latent indices)."""

    def __init__(self, source: torch.Tensor, target: torch.Tensor, alpha: float):
        self.source, self.target, self.alpha = source.long(), target.long(), float(alpha)

    def latents_used(self) -> tuple[int, ...]:
        return tuple(int(i) for i in torch.cat([self.source, self.target]).unique())

    def apply(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        tokens = torch.arange(len(z), device=z.device)
        z[tokens, self.source.to(z.device)[rows]] = 0.0
        z[tokens, self.target.to(z.device)[rows]] = self.alpha
        return z


class SlotSteer(ActivationEdit):
    """Per batch row r: x += alpha * ||x|| / ||W_d[target[r]]|| * W_d[target[r]]."""

    def __init__(self, target: torch.Tensor, alpha: float):
        self.target, self.alpha = target.long(), float(alpha)

    def check(self, dictionary, width) -> None:
        if dictionary is None:
            raise ConfigError("decoder-column steering needs the dictionary whose columns it adds")

    def apply(self, x: torch.Tensor, rows: torch.Tensor, dictionary) -> torch.Tensor:
        directions = dictionary.decoder_directions[self.target.to(x.device)[rows]].to(x)
        step = x.norm(dim=-1, keepdim=True) / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x + self.alpha * step * directions


def concept_slots(dictionary: Dictionary, concepts: "Sequence[str | int] | torch.Tensor",
                  slots: "Mapping[str, int] | None" = None) -> torch.Tensor:
    """Latent indices of concepts given by name or concept-bank index (unknown ones raise); with
    `slots`, concept names are looked up there instead of in an AlignSAE's slots."""
    if isinstance(concepts, torch.Tensor):
        concepts = concepts.tolist()
    if slots is None:
        return torch.tensor([dictionary.slot(c) for c in concepts], dtype=torch.long)
    unknown = sorted({str(c) for c in concepts if c not in slots})
    if unknown:
        raise InputError(f"unknown concept {unknown[0]!r}: the slot mapping has {', '.join(map(str, slots))}")
    latents = torch.tensor([int(slots[c]) for c in concepts], dtype=torch.long)
    if len(latents) and not 0 <= int(latents.min()) <= int(latents.max()) < dictionary.config.n_latents:
        raise InputError(f"slot mapping points outside the dictionary's {dictionary.config.n_latents} latents")
    return latents


def concept_swap(model: nn.Module, site: "Site | str", dictionary: Dictionary,
                 source: "Sequence[str | int] | torch.Tensor", target: "Sequence[str | int] | torch.Tensor",
                 alpha: float, method: str = "latent_decode", error_term: bool = False, positions="last",
                 slots: "Mapping[str, int] | None" = None):
    """A context manager under which row r of every batch is swapped from concept source[r] to
    target[r] (names or concept indices; one entry per batch row). `slots` (concept name -> latent)
    lets any dictionary stand in for an AlignSAE."""
    if method not in SWAP_METHODS:
        raise ConfigError(f"unknown swap method {method!r}: choose one of {', '.join(SWAP_METHODS)}")
    if slots is None and not isinstance(dictionary, AlignSAE):
        raise ConfigError(f"concept swaps need an AlignSAE (named concept slots) or a slots mapping, got "
                          f"{dictionary.name}")
    target_slots = concept_slots(dictionary, target, slots)
    if method == "decoder_column":
        return intervene(model, site, SlotSteer(target_slots, alpha), dictionary=dictionary, error_term=True,
                         positions=positions)
    source_slots = concept_slots(dictionary, source, slots)
    if len(source_slots) != len(target_slots):
        raise ConfigError(f"{len(source_slots)} source concepts but {len(target_slots)} targets: give one pair per row")
    return intervene(model, site, SlotSwap(source_slots, target_slots, alpha), dictionary=dictionary,
                     error_term=error_term, positions=positions)


@dataclass(frozen=True)
class SwapTrial:
    prompt: str
    source: str  # the prompt's own concept
    target: str  # the concept swapped in
    expected: str = ""  # what a successful swap should answer (empty: not scored)


def generate_swapped(model: nn.Module, tokenizer, site: "Site | str", dictionary: Dictionary,
                     trials: Sequence[SwapTrial], alpha: float, method: str = "latent_decode", error_term: bool = False,
                     positions="last", max_new_tokens: int = 8, batch_size: int = 64,
                     slots: "Mapping[str, int] | None" = None) -> list[str]:
    """The greedy answer of each trial's prompt under its swap, in order."""
    def intervention(indices: list[int]):
        rows = [trials[i] for i in indices]
        return concept_swap(model, site, dictionary, [t.source for t in rows], [t.target for t in rows], alpha,
                            method, error_term, positions, slots)

    return greedy_generate(model, tokenizer, [t.prompt for t in trials], max_new_tokens, batch_size, intervention)
