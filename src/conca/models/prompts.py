"""Many prompts at once, without padding: greedy generation and last-token activations.

Prompts are grouped by token length, so every row of a batch has its last prompt token at the
same position: nothing depends on a model's handling of padding or position ids, and position
"last" of an intervention means the same token in every row.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from conca.models.sites import Site, run_to_sites


def group_by_length(token_lists: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of the token lists, grouped by length and cut into batches of at most `batch_size`."""
    by_length: dict[int, list[int]] = {}
    for i, tokens in enumerate(token_lists):
        by_length.setdefault(len(tokens), []).append(i)
    return [group[b:b + batch_size] for _, group in sorted(by_length.items()) for b in range(0, len(group), batch_size)]


def _eos_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return [] if eos is None else [eos]


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 8,
    batch_size: int = 64,
    intervention: Callable[[list[int]], ContextManager] | None = None,
    progress: bool = False,
) -> list[str]:
    """The greedy continuation of each prompt (decoded, special tokens removed, cut at the end
    token), in the order of `prompts`.

    `intervention(indices)` may return a context manager entered around the generation of the
    prompts at those indices (e.g. a per-row concept swap)."""
    token_lists = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    eos = _eos_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    batches = group_by_length(token_lists, batch_size)
    for indices in tqdm(batches, desc="generate", disable=not progress, leave=False):
        ids = torch.tensor([token_lists[i] for i in indices], device=device)
        context = intervention(indices) if intervention is not None else contextlib.nullcontext()
        with context:
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                       do_sample=False, eos_token_id=eos or None, pad_token_id=pad)
        for row, i in enumerate(indices):
            new = generated[row, ids.shape[1]:].tolist()
            if eos and eos[0] in new:
                new = new[:new.index(eos[0])]
            out[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return out


def last_token_activations(model: nn.Module, tokenizer, prompts: Sequence[str], sites: "Sequence[Site | str]",
                           batch_size: int = 64, progress: bool = False) -> dict[Site, torch.Tensor]:
    """{site: (len(prompts), d)}: each prompt's activation at its last token, in prompt order."""
    sites = [Site.parse(s) for s in sites]
    token_lists = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    device = next(model.parameters()).device
    out: dict[Site, torch.Tensor] = {}
    for indices in tqdm(group_by_length(token_lists, batch_size), desc="activations", disable=not progress, leave=False):
        ids = torch.tensor([token_lists[i] for i in indices], device=device)
        acts = run_to_sites(model, ids, sites)
        for site in sites:
            if site not in out:
                out[site] = torch.zeros(len(prompts), acts[site].shape[-1])
            out[site][indices] = acts[site][:, -1].float().cpu()
    return out
