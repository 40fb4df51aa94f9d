"""ReLU-family sparse autoencoders: the L1 ("vanilla") SAE, the Gated SAE and p-annealing.

All three encode with a ReLU of an affine map of the centred input, decode linearly, and are
trained on inputs scaled to E||x||^2 = d (the trainer does that, and `fold_input_scale` folds the
scale back). Loss terms follow the dictionary_learning trainers: squared error summed over
dimensions and averaged over tokens, plus an already-weighted sparsity penalty.

Default coefficients (l1_coeff = 0.1 for all three) are the dictionary_learning defaults on that
input scale (StandardTrainer l1_penalty, GatedSAETrainer l1_penalty, PAnnealTrainer
initial_sparsity_penalty; I-Predict App. H.3 uses 0.1 for p-annealing). A unit of activation on a
unit decoder row lowers the summed squared error by about 2<r, w_i>, so a latent stays on only while
its overlap with the residual exceeds ~l1_coeff / 2; the right value depends on how large features
are relative to sqrt(d). Measured (300 steps, lr 3e-3, batch 256) on `planted()` (d=16, 24
features, 3 active, 48 latents): l1_coeff 0.1 gives L0 10-13 at FVU 0.05-0.08 for every method;
0.3 gives L0 5-6.5 at FVU 0.09-0.19; 1.0 collapses (FVU 0.2-0.7). On a denser superposition
(d=64, 512 features, 8 active, 256 latents, 1000 steps) L0 stays 110-120 at 0.1 (FVU <= 0.01)
and 40-60 at 1.0 (FVU 0.06-0.23). The value is a per-dataset knob: sweep it for a target L0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from conca.dictionaries.base import Dictionary, DictionaryConfig, SparsityGrid, register
from conca.dictionaries.init import tied_linear_init
from conca.errors import ConfigError

PENALTIES = ("l1", "decoder_norm")


def _check_common(config: DictionaryConfig) -> None:
    if config.l1_coeff < 0:
        raise ConfigError(f"l1_coeff must be >= 0, got {config.l1_coeff}")
    if config.sparsity_warmup_steps < 0:
        raise ConfigError(f"sparsity_warmup_steps must be >= 0, got {config.sparsity_warmup_steps}")


@dataclass
class ReLUSAEConfig(DictionaryConfig):
    # Bricken et al. 2023 / Cunningham et al. 2309.08600; dictionary_learning StandardTrainer
    # l1_penalty default 0.1 on inputs scaled to E||x||^2 = d.
    l1_coeff: float = 0.1
    # "l1": lambda * sum_i z_i with unit-norm decoder rows and dead-latent resampling
    # (Towards Monosemanticity); "decoder_norm": lambda * sum_i z_i ||W_d[i]|| with a free
    # decoder (Anthropic, April 2024 update), no resampling by default.
    penalty: str = "l1"
    sparsity_warmup_steps: int = 0  # lambda ramps linearly from 0 over this many steps
    # Resample latents silent since the last resample every this many steps (0: never).
    # None: 2500 for "l1" (dictionary_learning train scripts), 0 for "decoder_norm".
    resample_every: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.penalty not in PENALTIES:
            raise ConfigError(f"penalty must be one of {', '.join(PENALTIES)}, got {self.penalty!r}")
        _check_common(self)
        if self.resample_every is not None and self.resample_every < 0:
            raise ConfigError(f"resample_every must be >= 0 (0 disables), got {self.resample_every}")


class _ReLUBase(Dictionary):
    """z = ReLU(W_e (x - b_d) + b_e),  x_hat = W_d z + b_d.

    Shared by relu_l1 and p_anneal: W_e initialised as W_d^T, b_d as the geometric median of the
    data, optional unit-norm decoder rows, and Anthropic's dead-latent resampling."""

    inference_buffers = ()
    unit_norm_decoder = True
    saelens_architecture = "standard"  # SAELens' standard SAE: z = ReLU(pre), the same encoding

    def __init__(self, config: DictionaryConfig, decoder_norm: float = 1.0):
        super().__init__(config)
        d_in, n, d_out = config.d_in, config.n_latents, config.out_dim
        self.W_enc, self.W_dec = tied_linear_init(d_in, n, d_out, config.d_out is not None, decoder_norm)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        # Which latents fired since the last resample (Anthropic resamples exactly those that did not).
        self.register_buffer("fired", torch.zeros(n, dtype=torch.bool))
        self._resample_target: torch.Tensor | None = None

    @property
    def resample_period(self) -> int:
        return self.config.resample_every


    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        centred = x if self.is_transcoder else x - self.b_dec
        return centred @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activation(x).relu()



    def _encode_for_loss(self, x: torch.Tensor,
                         target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, target, recon) and the firing record every ReLU-family loss needs."""
        target = x if target is None else target
        z = self.encode(x)
        recon = (self.decode(z) - target).pow(2).sum(-1).mean()
        if self.training:
            with torch.no_grad():
                self.fired |= (z > 0).any(0)
            # after_optimizer_step only receives the input; a transcoder's resampling also needs the target.
            self._resample_target = target if self.is_transcoder and self.resample_period > 0 else None
        return z, target, recon

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None, x: torch.Tensor | None = None) -> None:
        super().after_optimizer_step(optimizer, x)
        period = self.resample_period
        if period > 0 and x is not None and (self.train_step + 1) % period == 0:
            target = self._resample_target if self.is_transcoder else None
            self.resample_dead(~self.fired, x, optimizer, target)
            self.fired.zero_()

    @torch.no_grad()
    def resample_dead(self, dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
                      target: torch.Tensor | None = None) -> int:
        """Towards Monosemanticity resampling: each dead latent i gets an input t drawn with
        probability proportional to its squared reconstruction error; W_d[i] = (t - b_d)/||t - b_d||,
        W_e[:, i] = that direction * 0.2 * mean alive encoder norm, b_e[i] = 0, and its Adam moments
        are zeroed so that stale statistics do not fling the fresh weights. Returns how many."""
        if self.is_transcoder and target is None:
            return 0
        target = x if target is None else target
        dead_idx = dead.nonzero().squeeze(1)
        n = min(len(dead_idx), len(x))
        if n == 0:
            return 0
        err = (self(x) - target).pow(2).sum(-1).double().cpu()
        if not torch.isfinite(err).all() or err.sum() <= 0:
            err = torch.ones_like(err)
        # Seeded by the step so that a resumed run resamples exactly as the uninterrupted one.
        gen = torch.Generator().manual_seed(int(self.train_step))
        chosen = torch.multinomial(err, n, replacement=False, generator=gen).to(x.device)
        idx = dead_idx[:n]
        dec_dir = target[chosen] - self.b_dec
        enc_dir = x[chosen] if self.is_transcoder else dec_dir
        dec_dir = dec_dir / dec_dir.norm(dim=1, keepdim=True).clamp_min(1e-8)
        enc_dir = enc_dir / enc_dir.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = ~dead
        enc_norm = self.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        dec_norm = 1.0 if self.keeps_unit_norm_decoder or not alive.any() else self.W_dec[alive].norm(dim=1).mean()
        self.W_dec[idx] = dec_dir * dec_norm
        self.W_enc[:, idx] = enc_dir.T * 0.2 * enc_norm
        self.b_enc[idx] = 0.0
        if optimizer is not None:
            for param, where in ((self.W_enc, (slice(None), idx)), (self.b_enc, idx), (self.W_dec, idx)):
                state = optimizer.state.get(param, {})
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if key in state:
                        state[key][where] = 0.0
        return n

    def fold_input_scale(self, scale: float) -> None:
        # pre(s x)/s = W_e (x - b_d/s) + b_e/s and ReLU commutes with a positive scale, so dividing
        # the biases by s gives latents z/s on raw x and x_hat/s = W_d (z/s) + b_d/s.
        with torch.no_grad():
            self.b_enc /= scale
            self.b_dec /= scale


@register
class ReLUSAE(_ReLUBase):
    """z = ReLU(W_e (x - b_d) + b_e),  x_hat = W_d z + b_d.

    penalty "l1":           loss = ||x - x_hat||^2 + lambda_t sum_i z_i,  ||W_d[i]|| = 1, resampling.
    penalty "decoder_norm": loss = ||x - x_hat||^2 + lambda_t sum_i z_i ||W_d[i]||, W_d free.
    lambda_t = l1_coeff * min(1, (t+1)/sparsity_warmup_steps)."""

    name = "relu_l1"
    Config = ReLUSAEConfig
    # Defaults come from papers' longer runs; on a short sweep at the final site they leave hundreds
    # of latents active (measured: relu_l1 at 3x its default still had L0 ~ 370 of 1152), so the
    # grid reaches up to 100x. The same holds for jumprelu, gated, p_anneal and structured.
    sparsity_grid = SparsityGrid("l1_coeff", (1.0, 10.0, 100.0), relative=True, default_sweep=True, order=4)
    saelens_import_default = True

    def __init__(self, config: ReLUSAEConfig):
        # April update: decoder rows start at norm 0.1 (the penalty, not a constraint, sets norms).
        super().__init__(config, decoder_norm=1.0 if config.penalty == "l1" else 0.1)

    @property
    def keeps_unit_norm_decoder(self) -> bool:
        return self.config.penalty == "l1"  # the decoder_norm penalty sets the norms instead

    @property
    def resample_period(self) -> int:
        if self.config.resample_every is None:
            return 2500 if self.config.penalty == "l1" else 0
        return self.config.resample_every

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z, target, recon = self._encode_for_loss(x, target)
        if self.config.penalty == "l1":
            penalty = z.sum(-1).mean()  # z >= 0, so this is ||z||_1
        else:
            penalty = (z * self.W_dec.norm(dim=1)).sum(-1).mean()
        coeff = self.config.l1_coeff * self.warmup_factor(self.config.sparsity_warmup_steps)
        return {"recon": recon, "l1": coeff * penalty}


@dataclass
class PAnnealConfig(DictionaryConfig):
    # Karvonen et al. 2408.00113; defaults from dictionary_learning PAnnealTrainer and I-Predict
    # App. H.3 (initial sparsity coefficient 0.1, sparsity warm-up 400 steps).
    l1_coeff: float = 0.1  # initial lambda (at p = p_start)
    p_start: float = 1.0
    # dictionary_learning anneals towards 0 with the endpoint never reached (last p = 1/9 with
    # 10 updates); 0.2 keeps the penalty's gradient p z^(p-1) within reach of Adam.
    p_end: float = 0.2
    # Fraction of training after which p starts to fall: dictionary_learning's anneal_start
    # = 15000 of the 20000-step runs in I-Predict / ConCA.
    anneal_start: float = 0.75
    n_sparsity_updates: int = 10  # p takes n_sparsity_updates + 1 values, p_start..p_end
    sparsity_warmup_steps: int = 400
    resample_every: int = 0  # PAnnealTrainer resample_steps default None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_common(self)
        if not 0 < self.p_end <= self.p_start <= 1:
            raise ConfigError(f"need 0 < p_end <= p_start <= 1, got p_start={self.p_start}, p_end={self.p_end}")
        if not 0 <= self.anneal_start <= 1:
            raise ConfigError(f"anneal_start is a fraction of training in [0, 1], got {self.anneal_start}")
        if self.n_sparsity_updates < 1:
            raise ConfigError(f"n_sparsity_updates must be >= 1, got {self.n_sparsity_updates}")
        if self.resample_every < 0:
            raise ConfigError(f"resample_every must be >= 0 (0 disables), got {self.resample_every}")


def lp_p(z: torch.Tensor, p: float) -> torch.Tensor:
    """sum_i z_i^p per token (z >= 0), mean over tokens. Zeros contribute 0 and no gradient
    (z^p has an infinite slope at 0 for p < 1, which would turn 0 * inf into NaN)."""
    active = z > 0
    return (torch.where(active, z, torch.ones_like(z)).pow(p) * active).sum(-1).mean()


@register
class PAnnealSAE(_ReLUBase):
    """ReLU SAE (unit-norm decoder) with loss ||x - x_hat||^2 + lambda_t sum_i z_i^{p_t}.

    p_t = p_start until anneal_start * total_steps, then falls in n_sparsity_updates equal steps
    to p_end, the last change landing before the end of training. At each change lambda is
    rescaled, lambda_new = lambda_old * S_{p_old} / S_{p_new} with S_p = mean_t sum_i z_i^p on the
    current batch, so the penalty keeps its value and the change does not jolt training.
    p and lambda are buffers: checkpoints carry them."""

    name = "p_anneal"
    Config = PAnnealConfig
    sparsity_grid = SparsityGrid("l1_coeff", (1.0, 10.0, 100.0), relative=True, default_sweep=True, order=6)

    def __init__(self, config: PAnnealConfig):
        super().__init__(config)
        self.register_buffer("p", torch.tensor(float(config.p_start)))
        self.register_buffer("sparsity_coeff", torch.tensor(float(config.l1_coeff)))
        self.register_buffer("p_index", torch.tensor(0, dtype=torch.long))

    def p_values(self) -> torch.Tensor:
        return torch.linspace(self.config.p_start, self.config.p_end, self.config.n_sparsity_updates + 1,
                              dtype=torch.float64)

    def schedule_index(self, step: int, total_steps: int) -> int:
        """How many p changes have happened by `step`: change j (0-based) is at
        a + floor(j (T - a) / n), a = floor(anneal_start T), so all n land in [a, T)."""
        n = self.config.n_sparsity_updates
        start = int(self.config.anneal_start * total_steps)
        if step < start:
            return 0
        return min(n, sum(1 for j in range(n) if start + (j * (total_steps - start)) // n <= step))

    @torch.no_grad()
    def _advance_schedule(self, z: torch.Tensor) -> None:
        k = self.schedule_index(self.train_step, self.total_steps)
        if k == int(self.p_index):
            return
        p_new = float(self.p_values()[k])
        old, new = lp_p(z, float(self.p)), lp_p(z, p_new)
        if new > 0 and old > 0:
            self.sparsity_coeff *= old / new
        self.p.fill_(p_new)
        self.p_index.fill_(k)

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z, target, recon = self._encode_for_loss(x, target)
        self._advance_schedule(z.detach())
        coeff = self.sparsity_coeff * self.warmup_factor(self.config.sparsity_warmup_steps)
        return {"recon": recon, "lp": coeff * lp_p(z, float(self.p))}


@dataclass
class GatedConfig(DictionaryConfig):
    # Rajamanoharan et al. 2404.16014; dictionary_learning GatedSAETrainer l1_penalty default 0.1.
    l1_coeff: float = 0.1
    sparsity_warmup_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_common(self)


@register
class GatedSAE(Dictionary):
    """Gated SAE with weight sharing (unit-norm decoder rows, the paper's main variant).

    pi_gate = W_g (x - b_d) + b_g,  pi_mag = (exp(r_mag) * W_g)(x - b_d) + b_mag,
    z = 1[pi_gate > 0] * ReLU(pi_mag),  x_hat = W_d z + b_d.
    Loss: recon ||x - x_hat||^2
        + l1       lambda_t sum_i ReLU(pi_gate)_i
        + aux_recon ||x - (sg(W_d) ReLU(pi_gate) + sg(b_d))||^2   (sg = stop-gradient)
    The Heaviside gate passes no gradient, so the L1 acts on the gate path only and does not
    shrink magnitudes; aux_recon gives the gate path the reconstruction signal it would otherwise
    lack, through a frozen copy of the decoder."""

    name = "gated"
    Config = GatedConfig
    inference_buffers = ()
    sparsity_grid = SparsityGrid("l1_coeff", (1.0, 10.0, 100.0), relative=True, default_sweep=True, order=5)
    unit_norm_decoder = True
    saelens_architecture = "gated"  # SAELens' gated SAE is this one, with W_gate named W_enc
    saelens_import_default = True

    def __init__(self, config: GatedConfig):
        super().__init__(config)
        d_in, n, d_out = config.d_in, config.n_latents, config.out_dim
        self.W_gate, self.W_dec = tied_linear_init(d_in, n, d_out, config.d_out is not None)
        self.b_gate = nn.Parameter(torch.zeros(n))
        self.r_mag = nn.Parameter(torch.zeros(n))
        self.b_mag = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_out))


    def pre_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pi_gate, pi_mag)."""
        self.check_input(x)
        centred = x if self.is_transcoder else x - self.b_dec
        pi_gate = centred @ self.W_gate + self.b_gate
        pi_mag = centred @ (self.W_gate * self.r_mag.exp()) + self.b_mag
        return pi_gate, pi_mag

    @staticmethod
    def _combine(pi_gate: torch.Tensor, pi_mag: torch.Tensor) -> torch.Tensor:
        return (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._combine(*self.pre_activations(x))



    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        target = x if target is None else target
        pi_gate, pi_mag = self.pre_activations(x)
        x_hat = self.decode(self._combine(pi_gate, pi_mag))
        gate_act = pi_gate.relu()
        aux_hat = gate_act @ self.W_dec.detach() + self.b_dec.detach()
        coeff = self.config.l1_coeff * self.warmup_factor(self.config.sparsity_warmup_steps)
        return {
            "recon": (x_hat - target).pow(2).sum(-1).mean(),
            "l1": coeff * gate_act.sum(-1).mean(),
            "aux_recon": (aux_hat - target).pow(2).sum(-1).mean(),
        }

    def fold_input_scale(self, scale: float) -> None:
        # Both pre-activations are affine in (x - b_d): dividing b_g, b_mag and b_d by s gives
        # pi(s x)/s on raw x, so the gate pattern is unchanged and magnitudes scale by 1/s.
        with torch.no_grad():
            self.b_gate /= scale
            self.b_mag /= scale
            self.b_dec /= scale

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_gate, "b_gate": self.b_gate, "r_mag": self.r_mag, "b_mag": self.b_mag,
                "W_dec": self.W_dec, "b_dec": self.b_dec}

    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saelens_tensors({("W_gate" if k == "W_enc" else k): v for k, v in tensors.items()})
