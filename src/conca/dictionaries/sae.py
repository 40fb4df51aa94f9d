"""Sparse autoencoders. TopK (Gao et al. 2024) with the AuxK dead-latent loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from conca.dictionaries.base import Dictionary, DictionaryConfig, register
from conca.dictionaries.init import remove_radial_grad_, renormalise_rows_, tied_linear_init
from conca.dictionaries.kernels import sparse_decode
from conca.errors import ConfigError


@dataclass
class TopKConfig(DictionaryConfig):
    k: int = 32
    aux_k: int | None = None  # None: d_in // 2, as in Gao et al.
    aux_coeff: float = 1 / 32
    dead_after_tokens: int = 10_000_000  # a latent silent this long counts as dead for AuxK

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.k <= self.n_latents:
            raise ConfigError(f"k must be in 1..n_latents={self.n_latents}, got {self.k}")


@register
class TopKSAE(Dictionary):
    """z = TopK_k(ReLU(W_e (x - b_d) + b_e)),  x_hat = W_d z + b_d, unit-norm decoder rows.

    Loss: ||x - x_hat||^2 (summed over dims, mean over tokens) + aux_coeff * AuxK, where AuxK
    reconstructs the residual x - x_hat from the top aux_k *dead* latents, normalised by the
    residual's variance, so that dead latents get a gradient towards useful directions."""

    name = "topk"
    Config = TopKConfig
    inference_buffers = ()

    def __init__(self, config: TopKConfig):
        super().__init__(config)
        d_in, n, d_out = config.d_in, config.n_latents, config.out_dim
        self.W_enc, self.W_dec = tied_linear_init(d_in, n, d_out, config.d_out is not None)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))


    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        centred = x if self.is_transcoder else x - self.b_dec
        return centred @ self.W_enc + self.b_enc

    @staticmethod
    def _topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return values.relu(), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activation(x)
        values, indices = self._topk(pre, self.config.k)
        return torch.zeros_like(pre).scatter_(-1, indices, values)



    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        target = x if target is None else target
        pre = self.pre_activation(x)
        values, indices = self._topk(pre, self.config.k)
        x_hat = sparse_decode(indices, values, self.W_dec) + self.b_dec
        terms = {"recon": (x_hat - target).pow(2).sum(-1).mean()}
        with torch.no_grad():
            self.tokens_since_fired += len(x)
            self.tokens_since_fired[indices[values > 0]] = 0
        auxk = self._auxk(pre, target, x_hat)
        if auxk is not None:
            terms["auxk"] = auxk
        return terms

    def _auxk(self, pre: torch.Tensor, target: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor | None:
        """AuxK (Gao et al.): the top aux_k dead latents reconstruct the residual, normalised by
        the residual's variance; None when nothing is dead or aux_coeff is 0."""
        dead = self.tokens_since_fired >= self.config.dead_after_tokens
        if self.config.aux_coeff <= 0 or not dead.any():
            return None
        aux_k = min(self.config.aux_k or self.config.d_in // 2, int(dead.sum()))
        aux_values, aux_indices = self._topk(pre.masked_fill(~dead, float("-inf")), aux_k)
        residual = (target - x_hat).detach()
        residual_hat = sparse_decode(aux_indices, aux_values, self.W_dec)
        scale = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        return self.config.aux_coeff * (residual_hat - residual).pow(2).sum() / scale

    def dead_fraction(self) -> float:
        return float((self.tokens_since_fired >= self.config.dead_after_tokens).float().mean())

    def before_optimizer_step(self) -> None:
        # Remove the gradient component that would only change decoder norms (they are renormalised anyway).
        remove_radial_grad_(self.W_dec)

    def after_optimizer_step(self, optimizer=None, x=None) -> None:
        renormalise_rows_(self.W_dec)

    def fold_input_scale(self, scale: float) -> None:
        # pre(s x)/s = W_e x - W_e b_d/s + b_e/s and x_hat/s = W_d (z/s) + b_d/s: dividing the
        # biases by s gives the same TopK selection on raw x, latents scaled by 1/s.
        with torch.no_grad():
            self.b_enc /= scale
            self.b_dec /= scale
