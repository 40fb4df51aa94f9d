"""The TopK family of sparse autoencoders: the number of active latents is fixed, not penalised.

- ``topk``       (Gao et al. 2024): TopK_k of ReLU pre-activations per token, with the AuxK
  dead-latent loss.
- ``batchtopk``  (Bussmann et al., arXiv:2412.06410): top k*B activations over the whole batch
  in training; a JumpReLU-style global threshold (EMA of the smallest selected activation) at
  inference.
- ``matryoshka`` (Bussmann et al., arXiv:2503.17547): BatchTopK latents, and every nested prefix
  of the dictionary must reconstruct the input on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from conca.dictionaries.base import Dictionary, DictionaryConfig, SparsityGrid, register
from conca.dictionaries.init import tied_linear_init
from conca.dictionaries.kernels import Entries, batch_topk, pre_activations, selected_linear, sparse_decode
from conca.errors import ConfigError
from conca.runtime import distributed

__all__ = ["TopKConfig", "TopKSAE", "BatchTopKConfig", "BatchTopKSAE", "MatryoshkaConfig", "MatryoshkaSAE"]


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
    sparsity_grid = SparsityGrid("k", (16, 32, 64), default_sweep=True, order=0)
    target_l0_option = "k"
    unit_norm_decoder = True
    saelens_architecture = "topk"
    saelens_import_default = True

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

    def fold_input_scale(self, scale: float) -> None:
        # pre(s x)/s = W_e x - W_e b_d/s + b_e/s and x_hat/s = W_d (z/s) + b_d/s: dividing the
        # biases by s gives the same TopK selection on raw x, latents scaled by 1/s.
        with torch.no_grad():
            self.b_enc /= scale
            self.b_dec /= scale

    # SAELens' topk architecture selects the top k of pre, then applies ReLU: the same encoding.
    def saelens_cfg(self) -> dict:
        return {"k": self.config.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def saelens_options(cls, cfg: dict) -> dict:
        return {"k": int(cfg["k"])}  # cfg.json wins: SAELens users may change k after training


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
    sparsity_grid = SparsityGrid("k", (16, 32, 64), default_sweep=True, order=1)
    # Its eval-mode encoding ReLU(pre) * 1[ReLU(pre) > theta] is SAELens' JumpReLU with that theta on
    # every latent (theta >= 0; a negative, not yet estimated theta is plain ReLU, which 0 gives).
    saelens_architecture = "jumprelu"
    saelens_import_default = False

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
    def calibrate(self, x: torch.Tensor) -> "BatchTopKSAE":
        """The threshold as training's first step sets it (the smallest of the top k*B activations of x),
        no weight changed: an untrained BatchTopK otherwise encodes as plain ReLU, densely."""
        self.threshold.fill_(-1.0)
        self.threshold_updates.zero_()
        self._update_threshold(self._batch_topk(x)[1])
        return self

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

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().saelens_tensors(), "threshold": self.threshold.clamp_min(0).expand(self.config.n_latents)}

    def saelens_cfg(self) -> dict:
        return {}

    @classmethod
    def saelens_options(cls, cfg: dict) -> dict:
        return {}

    @classmethod
    def saelens_fits(cls, tensors: dict[str, torch.Tensor]) -> bool:
        threshold = tensors["threshold"]  # one threshold for all latents; a per-latent one needs a JumpReLU
        return bool((threshold == threshold[0]).all())

    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saelens_tensors({k: v for k, v in tensors.items() if k != "threshold"})
        with torch.no_grad():
            self.threshold.copy_(tensors["threshold"][0])


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
    sparsity_grid = SparsityGrid("k", (32, 64), default_sweep=True, order=2)

    def __init__(self, config: MatryoshkaConfig):
        super().__init__(config)
        self._set_prefixes(config.prefix_sizes(), config.normalised_weights())

    def decode_prefix(self, z: torch.Tensor, m: int) -> torch.Tensor:
        """x_hat using only the first m latents: W_d[:m] z[:m] + b_d."""
        return z[..., :m] @ self.W_dec[:m] + self.b_dec
