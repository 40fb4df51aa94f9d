"""Excluding norm-outlier tokens (attention sinks and the like) from a harvest.

A few tokens can carry activations whose norm is many times the typical one (the first token, a
sink token the model parks attention on); left in, they dominate a dictionary's reconstruction
loss. With a ratio R, a token is dropped when its activation norm at any harvested site exceeds
R times the median norm of that site over the same shard, so the rule needs no pass over the
whole corpus and a resumed harvest makes the same decisions."""

from __future__ import annotations

import torch

from conca.errors import ConfigError


def check_ratio(max_norm_ratio: float) -> float:
    """0 switches the rule off; otherwise the ratio must exceed 1 (a ratio <= 1 would drop about
    half of the tokens, the ones above the median)."""
    ratio = float(max_norm_ratio)
    if not (ratio == 0 or ratio > 1):
        raise ConfigError(f"max_norm_ratio must be 0 (off) or greater than 1, got {max_norm_ratio}")
    return ratio


def outlier_mask(per_site: dict[str, torch.Tensor], max_norm_ratio: float) -> torch.Tensor:
    """Bool (n_tokens,): True for tokens whose norm exceeds max_norm_ratio x the median norm at any
    site. All False when the rule is off (ratio 0)."""
    n = next(iter(per_site.values())).shape[0]
    drop = torch.zeros(n, dtype=torch.bool)
    if not max_norm_ratio or n == 0:
        return drop
    for acts in per_site.values():
        norms = acts.float().norm(dim=-1)
        drop |= norms > max_norm_ratio * norms.median()
    return drop


def exclude_outliers(per_site: dict[str, torch.Tensor], token_ids: torch.Tensor, positions: torch.Tensor,
                     max_norm_ratio: float) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, int]:
    """The shard without its norm outliers: (activations per site, token ids, positions, tokens
    dropped); every per-token tensor loses the same rows, so they stay aligned."""
    drop = outlier_mask(per_site, max_norm_ratio)
    n_dropped = int(drop.sum())
    if not n_dropped:
        return per_site, token_ids, positions, 0
    keep = ~drop
    return {site: acts[keep] for site, acts in per_site.items()}, token_ids[keep], positions[keep], n_dropped
