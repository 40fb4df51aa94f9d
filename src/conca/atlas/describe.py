"""What a latent does when forced on: greedy continuations of neutral prompts with it clamped.

For each prompt the model continues it greedily once as it is (the baseline) and once per latent
with that latent clamped at its value at every position (prompt and generated tokens), through the
dictionary with the error term kept (`conca.interventions.intervene`), so that only the latent
changes. The latents of one prompt run as the rows of one batch (`ClampRows`): every row holds
the same prompt, so nothing is padded and each row equals the latent run alone.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from conca.dictionaries.base import Dictionary
from conca.errors import ConfigError
from conca.interventions.hooks import intervene
from conca.interventions.rows import ClampRows
from conca.models.sites import Site

# Short and topic-free, for base and instruct models alike (no chat template: a continuation).
NEUTRAL_PROMPTS = ("The", "I think that", "In the")


def _clamp_values(latents: list[int], values: "Mapping[int, float] | Sequence[float]") -> list[float]:
    if isinstance(values, Mapping):
        missing = [j for j in latents if j not in values]
        if missing:
            raise ConfigError(f"no clamp value for latent {missing[0]}")
        out = [float(values[j]) for j in latents]
    else:
        out = [float(v) for v in values]
        if len(out) != len(latents):
            raise ConfigError(f"{len(latents)} latents but {len(out)} clamp values")
    bad = [j for j, v in zip(latents, out) if not math.isfinite(v)]
    if bad:
        raise ConfigError(f"the clamp value of latent {bad[0]} is not finite")
    return out


def _continue(model, tokenizer, batch: torch.Tensor, max_new_tokens: int, pad: int | None) -> list[str]:
    """The greedy continuation of each row (the prompt left out, special tokens dropped)."""
    out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return [tokenizer.decode(row[batch.shape[1]:], skip_special_tokens=True) for row in out]


def describe_latents(loaded, dictionary: Dictionary, site: "Site | str", latents: Sequence[int],
                     values: "Mapping[int, float] | Sequence[float]", prompts: Sequence[str] = NEUTRAL_PROMPTS,
                     max_new_tokens: int = 8, batch_size: int = 32, progress: bool = False) -> dict[int, dict]:
    """{latent: {"clamp_value": v, "prompts": [{"prompt", "baseline", "clamped"}, ...]}}.

    `values` gives each latent's clamp value: a mapping latent -> value, or a sequence aligned with
    `latents`. `loaded` is a `LoadedModel` (model and tokenizer); the dictionary must be on the
    model's device. A transcoder cannot be spliced into one site: the result is then empty."""
    if dictionary.is_transcoder:
        return {}
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    latents = [int(j) for j in latents]
    clamp = dict(zip(latents, _clamp_values(latents, values)))  # a repeated latent runs once
    order = list(clamp)
    n = dictionary.config.n_latents
    bad = [j for j in order if not 0 <= j < n]
    if bad:  # before any generation
        raise ConfigError(f"unknown latent index {bad[0]}: the dictionary has {n} latents (0..{n - 1})")
    if not order:
        return {}
    from tqdm.auto import tqdm

    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = {j: {"clamp_value": clamp[j], "prompts": []} for j in order}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(total=len(prompts) * len(batches), desc="describe", unit="batch", disable=not progress, leave=False)
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            if ids.shape[1] == 0:
                raise ConfigError(f"the prompt {prompt!r} has no tokens")

            baseline = _continue(model, tokenizer, ids, max_new_tokens, pad)[0]
            for chunk in batches:
                with intervene(model, site, ClampRows(chunk, [clamp[j] for j in chunk]), dictionary=dictionary):
                    clamped = _continue(model, tokenizer, ids.expand(len(chunk), -1), max_new_tokens, pad)
                for j, text in zip(chunk, clamped):
                    results[j]["prompts"].append({"prompt": prompt, "baseline": baseline, "clamped": text})
                bar.update()
    bar.close()
    return results
