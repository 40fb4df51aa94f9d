"""Sparse autoencoders. TopK (Gao et al. 2024) with the AuxK dead-latent loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from conca.dictionaries.base import Dictionary, DictionaryConfig, register
from conca.dictionaries.init import remove_radial_grad_, renormalise_rows_, tied_linear_init
from conca.dictionaries.kernels import Entries, pre_activations, selected_linear, sparse_decode
from conca.errors import ConfigError
from conca.runtime import distributed


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
        if self.aux_k is not None and self.aux_k < 1:
            raise ConfigError(f"aux_k must be >= 1 (or unset for d_in // 2), got {self.aux_k}")


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


    def centred(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return x if self.is_transcoder else x - self.b_dec

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.centred(x) @ self.W_enc + self.b_enc

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
        centred = self.centred(x)
        # The dense product is the only (N, n_latents) step; gradients flow through the k selected
        # entries only (kernels.selected_linear), and decoding touches k decoder rows per token.
        pre = pre_activations(centred, self.W_enc, self.b_enc)
        top, indices = pre.topk(self.config.k, dim=-1, sorted=False)
        entries = Entries.topk(indices, self.config.n_latents)
        values = selected_linear(centred, self.W_enc, self.b_enc, top, entries).relu()
        x_hat = sparse_decode(entries, values, self.W_dec) + self.b_dec
        terms = {"recon": (x_hat - target).pow(2).sum(-1).mean()}
        self._record_firing(entries.cols[values.detach().reshape(-1) > 0], len(x))
        auxk = self._auxk(centred, pre, target, x_hat)
        if auxk is not None:
            terms["auxk"] = auxk
        return terms

    @torch.no_grad()
    def _record_firing(self, fired_latents: torch.Tensor, n_tokens: int) -> None:
        """Count tokens since each latent last fired; under data-parallel training the count and
        the fired set are those of the global batch, so every rank sees the same dead latents."""
        fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
        fired[fired_latents] = True
        fired, n_tokens = distributed.global_firing(fired, n_tokens)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    def _auxk(self, centred: torch.Tensor, pre: torch.Tensor, target: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor | None:
        """AuxK (Gao et al.): the top aux_k dead latents reconstruct the residual, normalised by
        the residual's variance; None when nothing is dead or aux_coeff is 0.

        `pre` is the encoder's pre-activation computed without autograd; the selected dead
        entries are re-attached with the same sparse backward as the main path."""
        dead = self.tokens_since_fired >= self.config.dead_after_tokens
        if self.config.aux_coeff <= 0 or not dead.any():
            return None
        dead_latents = dead.nonzero().squeeze(1)
        aux_k = min(self.config.aux_k or self.config.d_in // 2, len(dead_latents))
        top, local = pre.index_select(1, dead_latents).topk(aux_k, dim=-1, sorted=False)
        entries = Entries.topk(dead_latents[local], self.config.n_latents)
        aux_values = selected_linear(centred, self.W_enc, self.b_enc, top, entries).relu()
        residual = (target - x_hat).detach()
        residual_hat = sparse_decode(entries, aux_values, self.W_dec)
        # Normalised by the global batch's residual variance, so data-parallel ranks compute the
        # single-process loss between them.
        scale = distributed.global_centred_sum_sq(residual).clamp_min(1e-12)
        return self.config.aux_coeff * distributed.share_weight() * (residual_hat - residual).pow(2).sum() / scale

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
