"""AlignSAE (arXiv:2512.02004): a dictionary whose last latents are named concept slots.

z = act(W_e h + b_e) with n_free free latents followed by n_concepts concept slots (the released
code's order), h_hat = z W_d + b_d. Training is "pre-train, then post-train" (SPEC §4.2): for the
first `pretrain_fraction` of the steps only reconstruction (+ the free-slot L1 when
`pretrain_sparsity`), then every term, each with its own weight:

  recon   MSE(h_hat, h), mean over elements
  sparse  mean |z_free|
  align   MSE(z_concept, onehot(concept)) or CrossEntropy(z_concept, concept)
  indep   sum_{j != k} Cov(z_free)_jk^2          (batch-centred; skipped above `indep_max_free`)
  ortho   sum_{j,k} CrossCov(z_concept, z_free)_jk^2
  value   CrossEntropy(value_head_c(z_concept[c]), answer class), c = the true concept

Supervision arrives as `labels` (batch, 2): concept index and answer class, -1 where unknown
(such rows only reconstruct). The encoder activation (`identity` as released, `relu`, `topk`)
acts on the free bank; concept slots are read linearly in every mode, so the alignment loss always
has a gradient and a slot's value is the handle that swaps use. The value heads
(Linear(1, H) -> ReLU -> Linear(H, classes) per concept, over the answer classes named in
`value_labels`) are saved with the weights, so a loaded AlignSAE can still read out values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from conca.dictionaries.base import Dictionary, DictionaryConfig, SparsityGrid, register
from conca.dictionaries.init import tied_linear_init
from conca.errors import ConfigError, InputError

ACTIVATIONS = ("identity", "relu", "topk")
ALIGN_LOSSES = ("mse", "ce")


@dataclass
class AlignSAEConfig(DictionaryConfig):
    # Slot i of the concept bank is concepts[i]. Empty: no slots, which is the unsupervised stage
    # alone (a linear autoencoder with L1 and decorrelation on its latents).
    concepts: list[str] = field(default_factory=list)
    activation: str = "identity"
    k: int = 32  # active free latents when activation == "topk"
    align_loss: str = "mse"
    recon_coeff: float = 1.0
    sparse_coeff: float = 1e-3
    align_coeff: float = 1.0
    indep_coeff: float = 1e-2
    ortho_coeff: float = 1e-2
    value_coeff: float = 0.5
    indep_max_free: int = 4096  # the free-free covariance is n_free^2: skipped above this, as released
    pretrain_fraction: float = 0.2  # share of the steps that only reconstruct (stage 1)
    pretrain_sparsity: bool = False  # stage 1 also pays the free-slot L1
    value_labels: list[str] = field(default_factory=list)  # answer classes of the value heads (empty: none)
    value_hidden: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(set(self.concepts)) != len(self.concepts):
            raise ConfigError(f"concept names must be distinct, got {self.concepts}")
        if self.n_latents <= len(self.concepts):
            raise ConfigError(f"n_latents ({self.n_latents}) must exceed the {len(self.concepts)} concept slots "
                              "(the rest is the free bank)")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.align_loss not in ALIGN_LOSSES:
            raise ConfigError(f"align_loss must be one of {', '.join(ALIGN_LOSSES)}, got {self.align_loss!r}")
        if self.activation == "topk" and not 1 <= self.k <= self.n_free:
            raise ConfigError(f"k must be in 1..n_free={self.n_free}, got {self.k}")
        if not 0 <= self.pretrain_fraction < 1:
            raise ConfigError(f"pretrain_fraction must be in [0, 1), got {self.pretrain_fraction}")
        for name in ("recon_coeff", "sparse_coeff", "align_coeff", "indep_coeff", "ortho_coeff", "value_coeff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.d_out is not None:
            raise ConfigError("AlignSAE reconstructs its input; transcoder mode (d_out) is not supported")

    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    @property
    def n_free(self) -> int:
        return self.n_latents - len(self.concepts)


@register
class AlignSAE(Dictionary):
    name = "align"
    Config = AlignSAEConfig
    # Without labels an AlignSAE is its unsupervised stage (L1 on the free bank): for `--methods align`.
    sparsity_grid = SparsityGrid("sparse_coeff", (1e-3, 1e-1, 1.0), order=9)
    target_l0_option = "k"  # active free latents when activation == "topk"
    supports_transcoder = False
    signed_latents = True  # the concept slots (and an "identity" free bank) are not rectified

    def __init__(self, config: AlignSAEConfig):
        super().__init__(config)
        # The released code initialises the decoder as the encoder's transpose.
        self.W_enc, self.W_dec = tied_linear_init(config.d_in, config.n_latents, config.d_in, False)
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))
        classes = len(config.value_labels)
        self.value_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(1, config.value_hidden), nn.ReLU(), nn.Linear(config.value_hidden, classes))
            for _ in config.concepts) if classes else None

    # --- names -------------------------------------------------------------------
    @property
    def concept_slots(self) -> list[int]:
        """Latent index of each concept, in the order of `config.concepts`."""
        return list(range(self.config.n_free, self.config.n_latents))

    def slot(self, concept: "str | int") -> int:
        """Latent index of a concept given by name or by its position in the concept bank."""
        names = self.config.concepts
        if isinstance(concept, str):
            if concept not in names:
                raise InputError(f"unknown concept {concept!r}: this AlignSAE has {', '.join(names)}")
            return self.config.n_free + names.index(concept)
        if not 0 <= concept < len(names):
            raise InputError(f"concept index {concept} out of range: this AlignSAE has {len(names)} concepts")
        return self.config.n_free + concept

    # --- inference ---------------------------------------------------------------
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        free, concept = pre[..., :self.config.n_free], pre[..., self.config.n_free:]
        if self.config.activation == "relu":
            free = free.relu()
        elif self.config.activation == "topk":
            values, indices = free.topk(self.config.k, dim=-1, sorted=False)
            free = torch.zeros_like(free).scatter_(-1, indices, values.relu())
        return torch.cat([free, concept], dim=-1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activation(x))

    def concept_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_concepts): the concept slots' values; their argmax is the bound concept."""
        return self.encode(x)[..., self.config.n_free:]

    def value_logits(self, z_concept: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        """(N, classes): each row's value head `concept[n]` applied to that row's slot value."""
        if self.value_heads is None:
            raise ConfigError("this AlignSAE has no value heads (value_labels is empty)")
        out = z_concept.new_zeros(len(z_concept), len(self.config.value_labels))
        for c, head in enumerate(self.value_heads):
            rows = concept == c
            if rows.any():
                out[rows] = head(z_concept[rows, c:c + 1])
        return out

    # --- training ----------------------------------------------------------------
    @property
    def in_pretraining(self) -> bool:
        return self.train_step < self.config.pretrain_fraction * self.total_steps

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg = self.config
        z = self.encode(x)
        z_free, z_concept = z[:, :cfg.n_free], z[:, cfg.n_free:]
        terms = {"recon": cfg.recon_coeff * F.mse_loss(self.decode(z), x)}
        if cfg.sparse_coeff and (cfg.pretrain_sparsity or not self.in_pretraining):
            terms["sparse"] = cfg.sparse_coeff * z_free.abs().mean()
        if self.in_pretraining:
            return terms
        # Squared Frobenius norms of (cross-)covariances through batch Gram matrices:
        # ||A^T B||_F^2 = sum(G_A * G_B) with G = A A^T (batch x batch), which costs B^2 n
        # instead of the n^2 B of forming the n_free x n_free covariance.
        free_c = z_free - z_free.mean(0)
        gram_free = free_c @ free_c.T / len(x)
        if cfg.indep_coeff and cfg.n_free <= cfg.indep_max_free:
            diagonal = free_c.pow(2).sum(0) / len(x)
            terms["indep"] = cfg.indep_coeff * (gram_free.pow(2).sum() - diagonal.pow(2).sum())
        if cfg.ortho_coeff and cfg.n_concepts:
            concept_c = z_concept - z_concept.mean(0)
            terms["ortho"] = cfg.ortho_coeff * (gram_free * (concept_c @ concept_c.T / len(x))).sum()
        if labels is None:
            return terms
        concept = labels[:, 0]
        known = concept >= 0
        if cfg.align_coeff and known.any():
            if cfg.align_loss == "mse":
                onehot = F.one_hot(concept[known], cfg.n_concepts).to(z.dtype)
                terms["align"] = cfg.align_coeff * F.mse_loss(z_concept[known], onehot)
            else:
                terms["align"] = cfg.align_coeff * F.cross_entropy(z_concept[known], concept[known])
        if cfg.value_coeff and self.value_heads is not None and labels.shape[1] > 1:
            valued = known & (labels[:, 1] >= 0)
            if valued.any():
                logits = self.value_logits(z_concept[valued], concept[valued])
                terms["value"] = cfg.value_coeff * F.cross_entropy(logits, labels[valued, 1])
        return terms

    def fold_input_scale(self, scale: float) -> None:
        # Trained on s*h: z = (s h) W_e + b_e, so W_e <- s W_e keeps every latent unchanged on raw h
        # (the slots stay in one-hot units, which swaps' alpha and the value heads rely on), and
        # h_hat/s = z (W_d/s) + b_d/s.
        with torch.no_grad():
            self.W_enc *= scale
            self.W_dec /= scale
            self.b_dec /= scale
