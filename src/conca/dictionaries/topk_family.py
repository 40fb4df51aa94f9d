"""BatchTopK, Matryoshka (BatchTopK) and JumpReLU sparse autoencoders.

- ``batchtopk``  (Bussmann et al., arXiv:2412.06410): top k*B activations over the whole batch
  in training; a JumpReLU-style global threshold (EMA of the smallest selected activation) at
  inference.
- ``matryoshka`` (Bussmann et al., arXiv:2503.17547): BatchTopK latents, and every nested prefix
  of the dictionary must reconstruct the input on its own.
- ``jumprelu``   (Rajamanoharan et al., arXiv:2407.14435): z = pre * H(pre - theta) with a learnt
  per-latent theta, trained with an L0 penalty through rectangle-kernel straight-through
  estimators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from conca.dictionaries.base import Dictionary, DictionaryConfig, register
from conca.dictionaries.init import remove_radial_grad_, renormalise_rows_, tied_linear_init
from conca.dictionaries.kernels import Entries, batch_topk, pre_activations, selected_linear, sparse_decode
from conca.dictionaries.sae import TopKConfig, TopKSAE
from conca.errors import ConfigError
from conca.runtime import distributed

__all__ = ["BatchTopKConfig", "BatchTopKSAE", "MatryoshkaConfig", "MatryoshkaSAE", "JumpReLUConfig", "JumpReLUSAE"]


# ----------------------------------------------------------------------------------------
# BatchTopK
# ----------------------------------------------------------------------------------------


@dataclass
class BatchTopKConfig(TopKConfig):
    # k, aux_k, aux_coeff (1/32), dead_after_tokens (10M) as TopK (Gao et al.); the BatchTopK
    # paper keeps the same AuxK. k is the *average* number of active latents per token.
    threshold_beta: float = 0.999  # EMA decay of the inference threshold (dictionary_learning batch_top_k.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold_beta < 1.0:
            raise ConfigError(f"threshold_beta must be in [0, 1), got {self.threshold_beta}")


def _grouped_decode(entries: Entries, values: torch.Tensor, weight: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """(n_tokens, G, d): entry [t, g] = sum of values * weight[col] over the selected (t, col) with
    boundaries[g-1] <= col < boundaries[g].

    A ragged sparse decode over n_tokens*G bags (token-major), so the cost is that of the
    selected entries only, never a dense (n_tokens, n_latents) matmul. With one group it is the
    plain sparse decode."""
    n_groups = len(boundaries)
    if n_groups == 1:
        return sparse_decode(entries, values, weight)[:, None, :]
    group = torch.searchsorted(boundaries, entries.cols, right=True)
    bags = Entries(entries.rows * n_groups + group, entries.cols, entries.n_rows * n_groups, entries.n_cols)
    # Entries are row-major, and groups are increasing in col only within a row: sort by bag.
    bag_order = torch.argsort(bags.rows, stable=True)
    bags = Entries(bags.rows[bag_order], bags.cols[bag_order], bags.n_rows, bags.n_cols)
    out = sparse_decode(bags, values[bag_order], weight)
    return out.view(entries.n_rows, n_groups, -1)


@register
class BatchTopKSAE(TopKSAE):
    """Training: z = BatchTopK_{k*B}(ReLU(W_e (x - b_d) + b_e)) over the whole batch of B tokens,
    so per-token L0 varies and averages k.  Inference (eval mode, and after load):
    z = ReLU(pre) * 1[ReLU(pre) > theta], theta = EMA_beta of the smallest positive selected
    activation of each training batch.  x_hat = W_d z + b_d, unit-norm decoder rows.

    Loss: ||x - x_hat||^2 (summed over dims, mean over tokens) + aux_coeff * AuxK (as TopK)."""

    name = "batchtopk"
    Config = BatchTopKConfig
    inference_buffers = ("threshold",)

    def __init__(self, config: BatchTopKConfig):
        super().__init__(config)
        # Negative = not estimated yet: eval-mode encode is then plain ReLU.
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))
        self._set_prefixes([config.n_latents], [1.0])

    def _set_prefixes(self, sizes: list[int], weights: list[float]) -> None:
        self.prefix_sizes = list(sizes)
        self.prefix_weights = list(weights)
        # Not saved: rebuilt from the config on construction.
        self.register_buffer("_boundaries", torch.tensor(sizes, dtype=torch.long), persistent=False)

    def _batch_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(relu(pre), values, token rows, latent cols) of the top k*B entries of relu(pre)."""
        acts = self.pre_activation(x).relu()
        n_tokens, n = acts.shape
        values, flat = acts.flatten().topk(self.config.k * n_tokens, sorted=False)
        return acts, values, flat // n, flat % n

    def _select(self, centred: torch.Tensor) -> tuple[torch.Tensor, Entries, torch.Tensor]:
        """Training selection with the sparse backward: (pre without autograd, the top k*B
        entries of relu(pre) in row-major order, their relu'd values attached to autograd)."""
        pre = pre_activations(centred, self.W_enc, self.b_enc)
        n_tokens, n = pre.shape
        top, flat = batch_topk(pre, self.config.k * n_tokens)
        entries, order = Entries.from_flat(flat, n_tokens, n)
        # relu(pre) selected == relu(pre[selected]): same selection and the same gradient mask.
        values = selected_linear(centred, self.W_enc, self.b_enc, top[order], entries).relu()
        return pre, entries, values

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            acts, values, rows, cols = self._batch_topk(x)
            return torch.zeros_like(acts).index_put_((rows, cols), values)
        acts = self.pre_activation(x).relu()
        return acts * (acts > self.threshold)

    @torch.no_grad()
    def _update_threshold(self, values: torch.Tensor) -> None:
        positive = values[values > 0]
        # Data parallel: the smallest selected activation over every rank's share (inf = none here).
        low = distributed.global_min(positive.min() if positive.numel() else values.new_tensor(float("inf")))
        if not torch.isfinite(low):
            return
        low = low.to(self.threshold.dtype)
        # The EMA's horizon grows with the number of updates n (beta_n = n / (n + 10), capped at
        # threshold_beta), so a short run tracks where the pre-activations are now rather than
        # where they were at initialisation; long runs get the configured beta.
        beta = min(self.config.threshold_beta, self.threshold_updates.item() / (self.threshold_updates.item() + 10))
        if self.threshold < 0:
            beta = 0.0
        self.threshold.mul_(beta).add_((1 - beta) * low)
        self.threshold_updates += 1

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """recon = sum_j w_j ||target - (W_d[:m_j] z[:m_j] + b_d)||^2 (one prefix m = n for plain
        BatchTopK), plus aux_coeff * AuxK on the residual of the full reconstruction.

        Under data-parallel training the k*B selection is over each rank's share of the batch."""
        target = x if target is None else target
        centred = self.centred(x)
        pre, entries, values = self._select(centred)
        partial = _grouped_decode(entries, values, self.W_dec, self._boundaries)
        # Cumulative over groups: prefix j decodes latents [0, m_j).
        x_hats = partial.cumsum(1) + self.b_dec
        errors = (x_hats - target[:, None, :]).pow(2).sum(-1).mean(0)  # (n_prefixes,)
        weights = torch.tensor(self.prefix_weights, dtype=errors.dtype, device=errors.device)
        terms = {"recon": (weights * errors).sum()}
        if self.training:
            self._update_threshold(values.detach())
        self._record_firing(entries.cols[values.detach() > 0], len(x))
        auxk = self._auxk(centred, pre, target, x_hats[:, -1])
        if auxk is not None:
            terms["auxk"] = auxk
        return terms

    def fold_input_scale(self, scale: float) -> None:
        # The threshold compares against pre-activations, which scale with the input.
        super().fold_input_scale(scale)
        with torch.no_grad():
            if self.threshold >= 0:
                self.threshold /= scale


# ----------------------------------------------------------------------------------------
# Matryoshka
# ----------------------------------------------------------------------------------------

# Bussmann et al. 2503.17547 nest a few prefixes of geometrically growing size; these fractions
# give prefixes [n/16, n/8, n/4, n/2, n].
DEFAULT_PREFIX_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    # Nested prefix sizes m_1 < ... < m_J = n_latents. An int is a number of latents, a float in
    # (0, 1] a fraction of n_latents. None: DEFAULT_PREFIX_FRACTIONS.
    prefixes: list[int | float] | None = None
    # Weights w_j of the prefix losses; None: equal. Always normalised to sum to 1.
    prefix_weights: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = self.prefix_sizes()
        if self.prefix_weights is not None:
            if len(self.prefix_weights) != len(sizes):
                raise ConfigError(f"prefix_weights has {len(self.prefix_weights)} entries for {len(sizes)} prefixes")
            if any(w < 0 for w in self.prefix_weights) or sum(self.prefix_weights) <= 0:
                raise ConfigError(f"prefix_weights must be non-negative with a positive sum, got {self.prefix_weights}")

    def prefix_sizes(self) -> list[int]:
        n = self.n_latents
        if self.prefixes is None:
            # Small dictionaries may round two fractions to the same size: keep each size once.
            return sorted({max(1, round(f * n)) for f in DEFAULT_PREFIX_FRACTIONS})
        if not self.prefixes:
            raise ConfigError("prefixes must not be empty")
        sizes = []
        for p in self.prefixes:
            if isinstance(p, bool) or not isinstance(p, (int, float)):
                raise ConfigError(f"prefixes must be ints (sizes) or floats (fractions), got {p!r}")
            if isinstance(p, float):
                if not 0 < p <= 1:
                    raise ConfigError(f"a fractional prefix must be in (0, 1], got {p}")
                p = max(1, round(p * n))
            sizes.append(int(p))
        if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
            raise ConfigError(f"prefix sizes must be positive and strictly increasing, got {sizes}")
        if sizes[-1] != n:
            raise ConfigError(f"the last prefix must be the whole dictionary ({n} latents), got {sizes[-1]}")
        return sizes

    def normalised_weights(self) -> list[float]:
        k = len(self.prefix_sizes())
        w = self.prefix_weights or [1.0] * k
        return [v / sum(w) for v in w]


@register
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK latents (threshold at inference), nested prefixes m_1 < ... < m_J = n:
    loss = sum_j w_j ||x - (W_d[:m_j] z[:m_j] + b_d)||^2 (summed over dims, mean over tokens;
    w normalised to sum 1) + aux_coeff * AuxK.  Early latents must reconstruct on their own, so
    they learn general features and later ones refine them (less feature absorption).

    Note: dictionary_learning's trainer averages the already weighted prefix losses again
    (an extra 1/J); here the weights are used as given."""

    name = "matryoshka"
    Config = MatryoshkaConfig

    def __init__(self, config: MatryoshkaConfig):
        super().__init__(config)
        self._set_prefixes(config.prefix_sizes(), config.normalised_weights())

    def decode_prefix(self, z: torch.Tensor, m: int) -> torch.Tensor:
        """x_hat using only the first m latents: W_d[:m] z[:m] + b_d."""
        return z[..., :m] @ self.W_dec[:m] + self.b_dec


# ----------------------------------------------------------------------------------------
# JumpReLU
# ----------------------------------------------------------------------------------------


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """Forward: pre * H(pre - theta).  Backward (Rajamanoharan et al., pseudo-code):
    d/dpre = H(pre - theta);  d/dtheta = -(theta / eps) * K((pre - theta) / eps), K the rectangle."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre > theta).to(pre.dtype) * grad_out
        grad_theta = -(theta / eps) * _rectangle((pre - theta) / eps) * grad_out
        return grad_pre, grad_theta.sum(0), None


class StepFunction(torch.autograd.Function):
    """Forward: H(pre - theta).  Backward: d/dpre = 0; d/dtheta = -(1 / eps) * K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * _rectangle((pre - theta) / eps) * grad_out
        return torch.zeros_like(pre), grad_theta.sum(0), None


@dataclass
class JumpReLUConfig(DictionaryConfig):
    # Sparsity coefficient lambda. [RECON] The paper's lambdas are for inputs with E||x||^2 = 1;
    # the trainer here scales inputs to E||x||^2 = d, which multiplies the reconstruction term by
    # d, so 1.0 is of the paper's order for d ~ 10^3. With target_l0 set, 1.0 is
    # dictionary_learning's default (jumprelu.py, sparsity_penalty).
    l0_coeff: float = 1.0
    bandwidth: float = 0.001  # epsilon of the rectangle kernel (paper, Gemma Scope)
    init_threshold: float = 0.001  # theta at init (paper)
    # Linear lambda warm-up from 0. The paper uses 10,000 steps of ~200k-step runs;
    # dictionary_learning uses 2,000. [RECON] 1,000 suits the shorter runs here.
    sparsity_warmup_steps: int = 1000
    # dictionary_learning variant: lambda * (L0 / target_l0 - 1)^2 instead of lambda * L0.
    target_l0: float | None = None
    # [RECON] The L0 penalty does not depend on decoder norms, so the paper needs no constraint;
    # we keep unit-norm decoder rows by default (as dictionary_learning does) so that latent
    # magnitudes are comparable across latents and across methods.
    unit_norm_decoder: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l0_coeff < 0 or self.bandwidth <= 0 or self.init_threshold <= 0:
            raise ConfigError(f"need l0_coeff >= 0, bandwidth > 0, init_threshold > 0 (got {self.l0_coeff}, "
                              f"{self.bandwidth}, {self.init_threshold})")
        if self.sparsity_warmup_steps < 0:
            raise ConfigError(f"sparsity_warmup_steps must be >= 0, got {self.sparsity_warmup_steps}")
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise ConfigError(f"target_l0 must be positive, got {self.target_l0}")


@register
class JumpReLUSAE(Dictionary):
    """pre = W_e (x - b_d) + b_e,  z = pre * H(pre - theta),  theta = exp(log_threshold) per latent,
    x_hat = W_d z + b_d.

    Loss: ||x - x_hat||^2 (summed over dims, mean over tokens)
          + lambda_t * E_t[sum_i H(pre_ti - theta_i)]       (or lambda_t (L0/target_l0 - 1)^2),
    lambda_t warmed up linearly. H has zero gradient; theta gets its gradient from the rectangle
    kernel straight-through estimators of JumpReLUFunction and StepFunction. The L0 term's STE is
    applied to pre (not to the JumpReLU output as in the paper's pseudo-code): its value is the
    same, and its kernel then sees pre on both sides of theta, as the paper's derivation assumes."""

    name = "jumprelu"
    Config = JumpReLUConfig
    inference_buffers = ()

    def __init__(self, config: JumpReLUConfig):
        super().__init__(config)
        d_in, n, d_out = config.d_in, config.n_latents, config.out_dim
        # Paper: W_e initialised as W_d^T, b_e = 0.
        self.W_enc, self.W_dec = tied_linear_init(d_in, n, d_out, config.d_out is not None)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.log_threshold = nn.Parameter(torch.full((n,), math.log(config.init_threshold)))


    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        centred = x if self.is_transcoder else x - self.b_dec
        return centred @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activation(x)
        return JumpReLUFunction.apply(pre, self.threshold, self.config.bandwidth)



    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        target = x if target is None else target
        pre = self.pre_activation(x)
        theta = self.threshold
        z = JumpReLUFunction.apply(pre, theta, self.config.bandwidth)
        terms = {"recon": (self.decode(z) - target).pow(2).sum(-1).mean()}
        l0 = StepFunction.apply(pre, theta, self.config.bandwidth).sum(-1).mean()
        lam = self.config.l0_coeff * self.warmup_factor(self.config.sparsity_warmup_steps)
        if self.config.target_l0 is None:
            terms["sparsity"] = lam * l0
        else:
            terms["sparsity"] = lam * (l0 / self.config.target_l0 - 1).pow(2)
        return terms

    def before_optimizer_step(self) -> None:
        if self.config.unit_norm_decoder:
            remove_radial_grad_(self.W_dec)

    def after_optimizer_step(self, optimizer=None, x=None) -> None:
        if self.config.unit_norm_decoder:
            renormalise_rows_(self.W_dec)

    def fold_input_scale(self, scale: float) -> None:
        # pre(s x) = s pre'(x) with b_e' = b_e/s, b_d' = b_d/s; pre > theta <=> pre' > theta/s.
        with torch.no_grad():
            self.b_enc /= scale
            self.b_dec /= scale
            self.log_threshold -= math.log(scale)
