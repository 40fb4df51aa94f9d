"""Structured SAE of "I Predict Therefore I Am" (Liu et al., arXiv:2503.08980 v3, eqs. 87-92).

Two ReLU branches share one decoder:

    S = ReLU(W_s (x - b_d) + b_s)          sparse branch, Lp penalty with p-annealing
    R = ReLU(W_r (x - b_d) + b_r)          structured ("LoRa") branch, nuclear-norm penalty
    z = S + R,   x_hat = W_d z + b_d       unit-norm decoder rows

    L = ||x - x_hat||^2 + lambda_t * w_t * ( Lp(S) + gamma * ||R_batch||_* )

following the authors' trainer `PAnnealTrainerLoRa` (YichaoCai1/dictionary_learning,
`dictionary_learning/trainers/p_anneal_lora.py`): Lp(S) = mean_tokens (sum_i S_i^p)^(1/p), p annealed
from p_start towards p_end with lambda_t rescaled at every change of p (Karvonen et al. 2024,
arXiv:2408.00113), w_t a linear sparsity warm-up, and the nuclear norm of the (batch x n_latents)
matrix R computed by a randomised SVD only every `nuclear_interval` steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from conca.dictionaries.base import Dictionary, DictionaryConfig, SparsityGrid, register
from conca.dictionaries.init import tied_linear_init
from conca.errors import ConfigError, ShapeError

SPARSITY_FUNCTIONS = ("Lp", "Lp^p")


def randomized_nuclear_norm(matrix: torch.Tensor, rank: int | None, oversample: int = 10, power_iters: int = 2,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """sum_{i <= rank} sigma_i(Q^T M) ~ ||M||_* (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

    Q is an orthonormal basis of range(M Omega), Omega a (cols x (rank + oversample)) Gaussian
    sketch refined by `power_iters` QR-stabilised subspace iterations. Since sigma_i(Q^T M) <=
    sigma_i(M) (interlacing), the result never exceeds the exact truncated sum, hence never the
    exact nuclear norm; it equals ||M||_* when rank(M) <= rank. `rank=None` (or rank >= min(M.shape))
    is the exact reference `torch.linalg.matrix_norm(M, ord="nuc")`.

    The gradient flows through Q^T M and its small SVD (d/dM = Q U_k V_k^T); Q is held constant.
    When Q spans range(M) the terms from dQ vanish exactly (Q^T dQ is skew-symmetric and U^T(.)U
    of a skew matrix has a zero diagonal), so this is the exact gradient U_k V_k^T, while avoiding
    the ill-conditioned backward of QR through the power iterations on rank-deficient sketches."""
    if matrix.ndim != 2:
        raise ShapeError(f"nuclear norm needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be >= 1 or None (exact), got {rank}")
    if oversample < 0 or power_iters < 0:
        raise ConfigError(f"oversample and power_iters must be >= 0, got {oversample}, {power_iters}")
    m = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()  # QR/SVD need fp32+
    rows, cols = m.shape
    if rank is None or rank >= min(rows, cols):
        return torch.linalg.matrix_norm(m, ord="nuc")
    width = min(rank + oversample, rows, cols)
    with torch.no_grad():
        device = generator.device if generator is not None else m.device
        omega = torch.randn(cols, width, generator=generator, device=device, dtype=m.dtype).to(m.device)
        q = torch.linalg.qr(m @ omega).Q
        for _ in range(power_iters):
            q = torch.linalg.qr(m.T @ q).Q
            q = torch.linalg.qr(m @ q).Q
    return torch.linalg.svdvals(q.T @ m)[:rank].sum()


@dataclass
class StructuredConfig(DictionaryConfig):
    # Defaults: I-Predict v3 App. H.3 and the authors' `p_anneal_lora.py` / `train_sae_lora.py`.
    sparsity_coeff: float = 0.1  # initial lambda_s (App. H.3 "initial sparsity coefficient 0.1")
    sparsity_warmup_steps: int = 400  # App. H.3: sparsity warm-up 400 steps
    sparsity_function: str = "Lp"  # trainer default: mean (sum S^p)^(1/p); "Lp^p": mean sum S^p (the paper's eq.)
    p_start: float = 1.0  # trainer default
    p_end: float = 0.0  # trainer default; the last scheduled value is never reached (it falls on the final step)
    # Fraction of training after which p anneals: the trainer's anneal_start=15000 of the paper's
    # 20,000 steps. A fraction (not a step) so that runs of any length anneal; 1.0 = never (plain L1
    # when p_start=1), which is what train_sae_lora.py's 12,000 steps with anneal_start 15,000 did.
    anneal_start: float = 0.75
    n_sparsity_updates: int = 10  # trainer default: p takes linspace(p_start, p_end, 10)
    sparsity_queue_length: int = 10  # trainer default: batches averaged for the lambda rescaling
    nuclear_coeff: float = 0.1  # gamma = lora_coeff_scale, relative to lambda_t (App. H.3: gamma = 0.1)
    nuclear_rank: int | None = 64  # trainer: k = 64 singular values; None = exact nuclear norm
    nuclear_interval: int = 10  # trainer: compute_every=10 (term absent on the other steps)
    oversample: int = 10  # Halko et al.'s usual p = 10; the trainer used a plain k-column sketch (0)
    power_iters: int = 1  # trainer: n_iter=1
    # Dead-latent resampling every `resample_steps` (train_sae_lora.py passes 2500), off by default:
    # the released trainer's resampling assigns into copies (`w[deads][:n] = ...`), so the runs behind
    # the paper's numbers never changed weights that way.
    resample_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity_function not in SPARSITY_FUNCTIONS:
            raise ConfigError(f"sparsity_function must be one of {SPARSITY_FUNCTIONS}, got {self.sparsity_function!r}")
        if not 0 < self.p_start <= 1 or not 0 <= self.p_end <= self.p_start:
            raise ConfigError(f"need 0 < p_start <= 1 and 0 <= p_end <= p_start, got {self.p_start}, {self.p_end}")
        if not 0 <= self.anneal_start <= 1:
            raise ConfigError(f"anneal_start is a fraction of training in [0, 1], got {self.anneal_start}")
        if self.n_sparsity_updates < 1 or self.sparsity_queue_length < 1:
            raise ConfigError("n_sparsity_updates and sparsity_queue_length must be >= 1")
        if self.sparsity_coeff < 0 or self.nuclear_coeff < 0 or self.sparsity_warmup_steps < 0:
            raise ConfigError("sparsity_coeff, nuclear_coeff and sparsity_warmup_steps must be >= 0")
        if self.nuclear_rank is not None and self.nuclear_rank < 1:
            raise ConfigError(f"nuclear_rank must be >= 1 or None (exact), got {self.nuclear_rank}")
        if self.nuclear_interval < 1 or self.oversample < 0 or self.power_iters < 0:
            raise ConfigError("need nuclear_interval >= 1, oversample >= 0, power_iters >= 0")
        if self.resample_steps is not None:
            if self.resample_steps < 2:
                raise ConfigError(f"resample_steps must be >= 2 or None, got {self.resample_steps}")
            if self.d_out is not None:
                raise ConfigError("resample_steps is for autoencoders, not transcoders (new directions are drawn from the inputs)")


@register
class StructuredSAE(Dictionary):
    """z = ReLU(W_s (x - b_d) + b_s) + ReLU(W_r (x - b_d) + b_r),  x_hat = W_d z + b_d.

    Loss terms: "recon" ||x - x_hat||^2 (summed over dims, mean over tokens); "sparsity"
    lambda_t w_t mean_tokens Lp_{p_t}(S); "nuclear" gamma lambda_t w_t ||R||_* on steps divisible by
    `nuclear_interval` only (skipped, not reused, in between, as the authors' trainer does: a stale
    value would carry no gradient anyway)."""

    name = "structured"
    Config = StructuredConfig
    inference_buffers = ()
    sparsity_grid = SparsityGrid("sparsity_coeff", (1.0, 10.0, 100.0), relative=True, default_sweep=True, order=7)
    unit_norm_decoder = True  # ConstrainedAdam, as the authors' trainer

    def __init__(self, config: StructuredConfig):
        super().__init__(config)
        d_in, n, d_out = config.d_in, config.n_latents, config.out_dim
        # Sparse encoder tied to W_d^T at init (dictionary_learning's AutoEncoder); the structured
        # encoder's init is not in any released file [RECON]: nn.Linear's default range, so S and R
        # start different and R is alive (an all-zero R would get no gradient through its ReLU).
        self.W_enc, self.W_dec = tied_linear_init(d_in, n, d_out, config.d_out is not None)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_enc_r = nn.Parameter((torch.rand(d_in, n) * 2 - 1) / d_in**0.5)
        self.b_enc_r = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        # Training state (checkpointed with the trainer's state_dict, not written by save()).
        self.register_buffer("p_index", torch.zeros((), dtype=torch.long))  # p-schedule updates applied
        self.register_buffer("lambda_t", torch.tensor(float(config.sparsity_coeff)))
        self.register_buffer("lp_queue", torch.zeros(config.sparsity_queue_length, 2))
        self.register_buffer("lp_queue_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_since_active", torch.zeros(n, dtype=torch.long))


    # --- inference ---------------------------------------------------------------
    def encode_branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, R), each (N, n_latents) and non-negative."""
        self.check_input(x)
        centred = x if self.is_transcoder else x - self.b_dec
        return (centred @ self.W_enc + self.b_enc).relu(), (centred @ self.W_enc_r + self.b_enc_r).relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        s, r = self.encode_branches(x)
        return s + r



    # --- p-annealing schedule ------------------------------------------------------
    def _update_steps(self) -> list[int]:
        """Steps at which p moves to the next of linspace(p_start, p_end, n) (floor, as the trainer's
        integer linspace); the last one equals total_steps, so p_end itself is never used."""
        total, n = self.total_steps, self.config.n_sparsity_updates
        start = math.ceil(self.config.anneal_start * total)
        return [start] if n == 1 else [start + (total - start) * j // (n - 1) for j in range(n)]

    def _p_value(self, index: int) -> float:
        """p after `index` schedule updates (update j sets p = linspace(p_start, p_end, n)[j])."""
        c, n = self.config, self.config.n_sparsity_updates
        if index <= 0:
            return c.p_start
        if index > n:
            return c.p_end
        return c.p_start if n == 1 else c.p_start + (c.p_end - c.p_start) * (index - 1) / (n - 1)

    @property
    def p(self) -> float:
        return self._p_value(int(self.p_index))

    @property
    def next_p(self) -> float:
        return self._p_value(int(self.p_index) + 1)

    def lp_norm(self, s: torch.Tensor, p: float) -> torch.Tensor:
        """mean_tokens (sum_i S_i^p)^(1/p) ("Lp") or mean_tokens sum_i S_i^p ("Lp^p")."""
        powered = s.pow(p).sum(-1)
        return (powered if self.config.sparsity_function == "Lp^p" else powered.pow(1 / p)).mean()

    @torch.no_grad()
    def _advance_schedule(self, s: torch.Tensor) -> None:
        """Apply every p update due by train_step; on a change of p rescale lambda by
        mean Lp_old / mean Lp_new over the last queued batches, so that the sparsity term keeps its size.

        Outside a scheduled run (total_steps == 1, before the trainer calls set_progress) p stays put."""
        if self.total_steps <= 1:
            return
        due = sum(step <= self.train_step for step in self._update_steps())
        while int(self.p_index) < due:
            old_p, new_p = self.p, self.next_p
            if new_p != old_p:
                count = min(int(self.lp_queue_count), self.config.sparsity_queue_length)
                if count > 0:
                    old_lp, new_lp = self.lp_queue[:count, 0].mean(), self.lp_queue[:count, 1].mean()
                else:  # e.g. several updates due at once: estimate on this batch
                    old_lp, new_lp = self.lp_norm(s, old_p), self.lp_norm(s, new_p)
                if new_lp > 0:
                    self.lambda_t *= old_lp / new_lp
            self.p_index += 1
            self.lp_queue_count.zero_()  # the queued values were for the previous next_p

    # --- training ----------------------------------------------------------------
    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        c = self.config
        target = x if target is None else target
        s, r = self.encode_branches(x)
        z = s + r
        terms = {"recon": (self.decode(z) - target).pow(2).sum(-1).mean()}
        if self.training:
            self._advance_schedule(s)
        p = self.p
        lp = self.lp_norm(s, p)
        if self.training:
            with torch.no_grad():
                # p = 0 only ever comes due on the final step (never run); Lp_0 has no 1/p.
                if self.next_p != p and self.next_p > 0:
                    slot = int(self.lp_queue_count) % c.sparsity_queue_length
                    self.lp_queue[slot, 0] = lp.detach()
                    self.lp_queue[slot, 1] = self.lp_norm(s, self.next_p)
                    self.lp_queue_count += 1
                fired = (z > 0).any(0)
                self.steps_since_active += 1
                self.steps_since_active[fired] = 0
        weight = self.lambda_t * self.warmup_factor(c.sparsity_warmup_steps)
        terms["sparsity"] = weight * lp
        if c.nuclear_coeff > 0 and self.train_step % c.nuclear_interval == 0:
            # The sketch is seeded by the step, so a resumed run draws the same one.
            generator = torch.Generator(device=r.device).manual_seed(int(self.train_step))
            nuclear = randomized_nuclear_norm(r, c.nuclear_rank, c.oversample, c.power_iters, generator)
            terms["nuclear"] = c.nuclear_coeff * weight * nuclear
        return terms

    @classmethod
    def fit_options(cls, n_latents: int, defaults: dict) -> dict:
        rank = defaults.get("nuclear_rank")
        return {"nuclear_rank": min(rank, n_latents)} if isinstance(rank, int) else {}

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None,
                             x: torch.Tensor | None = None) -> None:
        super().after_optimizer_step(optimizer, x)
        every = self.config.resample_steps
        if every is not None and x is not None and self.train_step % every == every - 1:
            self.resample_dead(self.steps_since_active > every // 2, x, optimizer)

    @torch.no_grad()
    def resample_dead(self, dead: torch.Tensor, x: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Re-point dead latents at inputs drawn with probability ~ ||x - x_hat|| (Anthropic's
        resampling as in the authors' trainer): encoder columns of both branches = x * 0.2 * mean
        alive encoder norm, decoder row = x / ||x||, biases 0, and their Adam moments reset."""
        which = dead.nonzero()[:, 0][: len(x)]
        if len(which) == 0:
            return 0
        losses = (x - self(x)).norm(dim=-1)
        weights = losses + 1e-12  # every row stays drawable, even if x is reconstructed exactly
        vecs = x[torch.multinomial(weights, len(which), replacement=False)]
        alive = ~dead
        for w in (self.W_enc, self.W_enc_r):
            norm = w[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
            w[:, which] = vecs.T * norm * 0.2
        self.W_dec[which] = vecs / vecs.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.b_enc[which] = 0.0
        self.b_enc_r[which] = 0.0
        self.steps_since_active[which] = 0
        if optimizer is not None:
            for param, index in ((self.W_enc, (slice(None), which)), (self.W_enc_r, (slice(None), which)),
                                 (self.W_dec, which), (self.b_enc, which), (self.b_enc_r, which)):
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in optimizer.state.get(param, {}):
                        optimizer.state[param][key][index] = 0.0
        return len(which)

    def fold_input_scale(self, scale: float) -> None:
        # ReLU(W(s x - b_d) + b)/s = ReLU(W(x - b_d/s) + b/s) and x_hat(s x)/s = W_d (z/s) + b_d/s:
        # dividing every bias by s gives both branches on raw x with latents scaled by 1/s.
        with torch.no_grad():
            self.b_enc /= scale
            self.b_enc_r /= scale
            self.b_dec /= scale
