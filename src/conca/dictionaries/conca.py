"""Sparse Concept Component Analysis (ConCA; Liu et al., arXiv:2601.20420, §3 / Eq. 4-5).

    z_hat = R(W_e f + b_e)              (a linear encoder; R a normalisation, no ReLU)
    f_hat = W_d z_hat + b_d
    loss  = ||f_hat - f||^2 + alpha * sum_i |g(z_hat_i)|

z_hat estimates the stacked per-concept log-posteriors log p(z_i | x) (Theorem 2.2), so sparsity
is imposed on g(z_hat), a stable stand-in for exp that maps a log-posterior back to the probability
domain ("log p = 0 means p = 1, fully active"). R is LayerNorm, Dropout, BatchNorm or
GroupNorm(num_groups); g is SELU, SoftPlus or ELU: the paper's 12 variants are registered as
`conca_<norm>_<g>`. The generic `conca` method takes `norm` and `g` as options and adds the
Table 3 ablation g = exp (z_hat clamped to [-exp_clamp, exp_clamp], because exp overflows) and the
shifted forms elu_plus_one (= exp for z <= 0) and selu_shift (SELU minus its lower bound, >= 0).

Details the paper leaves open (SPEC §3.4 [RECON]): the norms are affine (PyTorch defaults),
dropout p = 0.1, BatchNorm uses batch statistics in training and running statistics at inference,
the decoder is unconstrained, and the penalty is summed over latents and averaged over tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from conca.dictionaries.base import Dictionary, DictionaryConfig, SparsityGrid, register
from conca.errors import ConfigError

NORMS = ("layernorm", "dropout", "batchnorm", "groupnorm")
PAPER_GS = ("selu", "softplus", "elu")
GS = PAPER_GS + ("elu_plus_one", "selu_shift", "exp")

# SELU(z) -> -scale*alpha as z -> -inf; adding it makes g >= 0 with g(-inf) = 0, like exp.
_SELU_FLOOR = 1.0507009873554805 * 1.6732632423543772


@dataclass
class ConCAConfig(DictionaryConfig):
    norm: str = "layernorm"
    g: str = "softplus"
    # ConCA's carried-forward configurations use alpha = 1e-4 (Takeaway of Fig. 2, Tables 5-6).
    alpha: float = 1e-4
    num_groups: int = 4  # GroupNorm groups; the paper's ablation uses 4, 8, 16, 32
    dropout: float = 0.1  # not given in the paper
    exp_clamp: float = 20.0  # g = exp only: z_hat is clamped to [-c, c] (Table 3: c in 20..50)
    norm_affine: bool = True  # learnable per-latent scale and shift after normalising
    batchnorm_momentum: float = 0.1  # running-statistics update rate (PyTorch default)
    sparsity_warmup_steps: int = 0  # alpha ramps linearly from 0 over this many steps
    unit_norm_decoder: bool = False  # optional constraint; the paper does not state one

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm not in NORMS:
            raise ConfigError(f"unknown ConCA normalisation {self.norm!r}: choose one of {', '.join(NORMS)}")
        if self.g not in GS:
            raise ConfigError(f"unknown ConCA sparsity function g={self.g!r}: choose one of {', '.join(GS)}")
        if self.alpha < 0:
            raise ConfigError(f"alpha must be >= 0, got {self.alpha}")
        if self.norm == "groupnorm" and (self.num_groups < 1 or self.n_latents % self.num_groups):
            raise ConfigError(f"num_groups={self.num_groups} must be >= 1 and divide n_latents={self.n_latents}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.exp_clamp <= 0:
            raise ConfigError(f"exp_clamp must be > 0, got {self.exp_clamp}")
        if not 0.0 < self.batchnorm_momentum <= 1.0:
            raise ConfigError(f"batchnorm_momentum must be in (0, 1], got {self.batchnorm_momentum}")
        if self.sparsity_warmup_steps < 0:
            raise ConfigError(f"sparsity_warmup_steps must be >= 0, got {self.sparsity_warmup_steps}")


def sparsity_function(name: str, z: torch.Tensor) -> torch.Tensor:
    """g(z_hat): the map from estimated log-posteriors to the (pseudo-)probabilities penalised."""
    if name == "softplus":
        return F.softplus(z)
    if name == "selu":
        return F.selu(z)
    if name == "elu":
        return F.elu(z)
    if name == "elu_plus_one":
        return F.elu(z) + 1.0
    if name == "selu_shift":
        return F.selu(z) + _SELU_FLOOR
    if name == "exp":
        return torch.exp(z)
    raise ConfigError(f"unknown ConCA sparsity function g={name!r}: choose one of {', '.join(GS)}")


@register
class ConCA(Dictionary):
    """Sparse ConCA with a configurable normalisation R and sparsity function g."""

    name = "conca"
    Config = ConCAConfig
    inference_buffers = ("running_mean", "running_var")
    # The penalty acts on g(z_hat) of normalised latents, so it moves reconstruction rather than L0
    # (every latent stays nonzero): swept with `--methods conca...` or 'all', not in the default family.
    sparsity_grid = SparsityGrid("alpha", (1.0, 100.0, 1000.0), relative=True, order=8)
    unit_norm_decoder = True  # only when the config's unit_norm_decoder is set (off by default)
    signed_latents = True  # z_hat estimates log-posteriors: signed and dense

    def __init__(self, config: ConCAConfig):
        super().__init__(config)
        d_in, n, d_out = config.d_in, config.n_latents, config.out_dim
        # nn.Linear's default init for both maps: z_hat is O(1) after R, so a decoder with rows of
        # norm ~1 would start from reconstructions n times too large.
        self.W_enc = nn.Parameter(torch.empty(d_in, n).uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in)))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d_out).uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n)))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if config.norm_affine and config.norm != "dropout":
            self.norm_weight = nn.Parameter(torch.ones(n))
            self.norm_bias = nn.Parameter(torch.zeros(n))
        else:
            self.norm_weight = self.norm_bias = None
        # Buffers exist for every norm so the saved form is uniform; only BatchNorm uses them.
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        if config.unit_norm_decoder:
            from conca.dictionaries.init import renormalise_rows_

            renormalise_rows_(self.W_dec)

    # --- inference ---------------------------------------------------------------
    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc + self.b_enc

    def normalise(self, pre: torch.Tensor) -> torch.Tensor:
        """R(.): the regulariser between the linear encoder and the latents."""
        c = self.config
        if c.norm == "layernorm":
            return F.layer_norm(pre, (c.n_latents,), self.norm_weight, self.norm_bias)
        if c.norm == "groupnorm":
            shape = pre.shape
            return F.group_norm(pre.reshape(-1, c.n_latents), c.num_groups, self.norm_weight, self.norm_bias).reshape(shape)
        if c.norm == "batchnorm":
            flat = pre.reshape(-1, c.n_latents)
            use_batch = self.training and flat.shape[0] > 1
            out = F.batch_norm(flat, self.running_mean, self.running_var, self.norm_weight, self.norm_bias,
                               training=use_batch, momentum=c.batchnorm_momentum)
            return out.reshape(pre.shape)
        return F.dropout(pre, c.dropout, self.training)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.normalise(self.pre_norm(x))
        if self.config.g == "exp":
            # Table 3 clamps the hidden activations themselves, so reconstruction sees the clamp too.
            z = z.clamp(-self.config.exp_clamp, self.config.exp_clamp)
        return z

    def g(self, z: torch.Tensor) -> torch.Tensor:
        return sparsity_function(self.config.g, z)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> "ConCA":
        """BatchNorm's running statistics as long training leaves them (the pre-activations' mean and
        variance on x), no weight changed: else an untrained BatchNorm ConCA normalises at inference by
        0 and 1, leaving latents on another scale than a trained one's. Other norms: nothing to set."""
        if self.config.norm == "batchnorm":
            pre = self.pre_norm(x).reshape(-1, self.config.n_latents)
            self.running_mean.copy_(pre.mean(0))
            self.running_var.copy_(pre.var(0) if pre.shape[0] > 1 else torch.ones_like(self.running_var))
        return self

    # --- training ----------------------------------------------------------------
    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        target = x if target is None else target
        z = self.encode(x)
        x_hat = self.decode(z)
        recon = (x_hat - target).pow(2).sum(-1).mean()
        alpha = self.config.alpha * self.warmup_factor(self.config.sparsity_warmup_steps)
        return {"recon": recon, "sparsity": alpha * self.g(z).abs().sum(-1).mean()}

    @classmethod
    def fit_options(cls, n_latents: int, defaults: dict) -> dict:
        groups = defaults.get("num_groups")  # GroupNorm needs groups that divide the width
        return {"num_groups": math.gcd(groups, n_latents)} if isinstance(groups, int) else {}

    def fold_input_scale(self, scale: float) -> None:
        # pre(s x) = s x W_e + b_e, so W_e * s gives the same pre-activations (and the same
        # BatchNorm statistics) on raw x; z_hat estimates log-posteriors and is left unscaled,
        # and f_hat / s = W_d/s z_hat + b_d/s.
        with torch.no_grad():
            self.W_enc.mul_(scale)
            self.W_dec.div_(scale)
            self.b_dec.div_(scale)


def _variant(norm: str, g: str) -> type[ConCA]:
    config_cls = dataclass(type(f"ConCA_{norm}_{g}_Config", (ConCAConfig,), {
        "__annotations__": {"norm": str, "g": str}, "norm": norm, "g": g}))

    def __init__(self, config: ConCAConfig) -> None:
        if (config.norm, config.g) != (norm, g):
            raise ConfigError(f"{self.name} fixes norm={norm} and g={g}; use method 'conca' to choose them freely")
        ConCA.__init__(self, config)

    cls = type(f"ConCA_{norm}_{g}", (ConCA,), {"name": f"conca_{norm}_{g}", "Config": config_cls, "__init__": __init__,
                                               "__doc__": f"Sparse ConCA with R = {norm} and g = {g}."})
    return register(cls)


VARIANTS = {f"conca_{norm}_{g}": _variant(norm, g) for norm in NORMS for g in PAPER_GS}
