"""Fast paths behind plain functions, each with an eager reference it is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j values[:, j] * weight[indices[:, j]]: a decoder pass that touches only the k active rows.

    embedding_bag gathers k rows per token and its backward scatters (index_add) into the weight
    gradient, so neither the dense (N, n_latents) code matrix nor its matmul is formed."""
    return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")


def sparse_decode_reference(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    dense = torch.zeros(indices.shape[0], weight.shape[0], dtype=weight.dtype, device=weight.device)
    return dense.scatter(-1, indices, values.to(weight.dtype)) @ weight
