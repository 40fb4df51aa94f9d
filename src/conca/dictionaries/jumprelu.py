"""JumpReLU sparse autoencoder (Rajamanoharan et al., arXiv:2407.14435): z = pre * H(pre - theta)
with a learnt per-latent theta, trained with an L0 penalty through rectangle-kernel
straight-through estimators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from conca.dictionaries.base import Dictionary, DictionaryConfig, SparsityGrid, register
from conca.dictionaries.init import tied_linear_init
from conca.errors import ConfigError

__all__ = ["JumpReLUConfig", "JumpReLUSAE", "JumpReLUFunction", "StepFunction"]



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
    # Defaults come from the paper's longer runs; a short sweep needs up to 100x (see relu.py's grid).
    sparsity_grid = SparsityGrid("l0_coeff", (1.0, 10.0, 100.0), relative=True, default_sweep=True, order=3)
    # The shared target L0 is not mapped onto the option target_l0: that would switch the loss to
    # dictionary_learning's (L0 / target - 1)^2 variant; set it with --dict-options target_l0=N.
    target_l0_option = None
    unit_norm_decoder = True  # switched by the config field of the same name
    saelens_architecture = "jumprelu"
    saelens_import_default = True

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

    def fold_input_scale(self, scale: float) -> None:
        # pre(s x) = s pre'(x) with b_e' = b_e/s, b_d' = b_d/s; pre > theta <=> pre' > theta/s.
        with torch.no_grad():
            self.b_enc /= scale
            self.b_dec /= scale
            self.log_threshold -= math.log(scale)

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        # exp(log_threshold), the same op conca's encode uses.
        return {**super().saelens_tensors(), "threshold": self.threshold}

    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """`threshold` is what SAELens compares with; a legacy folder's `log_threshold` is taken as is."""
        super().load_saelens_tensors({k: v for k, v in tensors.items() if k not in ("threshold", "log_threshold")})
        log_threshold = tensors.get("log_threshold")
        with torch.no_grad():
            self.log_threshold.copy_(log_threshold if log_threshold is not None else exact_log(tensors["threshold"]))


def exact_log(t: torch.Tensor) -> torch.Tensor:
    """log(t) in t's dtype, nudged by a few ulps where that makes exp(result) == t exactly.

    JumpReLU stores log thresholds and compares against exp(log_threshold); without the nudge, a
    threshold exported to SAELens could come back one ulp off."""
    log = t.log()
    for _ in range(4):
        e = log.exp()
        off = e != t
        if not off.any():
            break
        direction = torch.where(e < t, torch.full_like(t, float("inf")), torch.full_like(t, float("-inf")))
        log = torch.where(off, torch.nextafter(log, direction), log)
    return log
