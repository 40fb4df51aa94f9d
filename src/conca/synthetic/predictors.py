"""Next-token predictors trained on the synthetic worlds; their last hidden layer is f(x).

* `MaskedMLP`, the papers' masked-prediction network (I-Predict App. G.1; ConCA App. M): one
  observed variable x_j is masked, the rest and the mask go through an embedding layer, then
  3 layers of Linear(256) + BatchNorm + ReLU, and a linear classifier predicts x_j. The input to
  that classifier is the representation f(x) of the softmax model p(y|x) ∝ exp(f(x)ᵀ g(y)) (here
  y = (j, x_j): the classifier's weight rows for variable j are g(y)). Adam, lr 1e-4 (paper).
* `TargetMLP`, the same network for the diverse objective (`conca.synthetic.diversity`): every
  observable visible, the last layer purely linear (the softmax model needs an unconstrained f),
  and one shared f(x) predicting `vocab`-valued targets: the head's rows are g(y).
* `CausalTransformer`, a small pre-LayerNorm decoder for the token world: from [BOS, t_1..t_{s}]
  it predicts t_{s+1}; its final (normalised) hidden state at position s is f(t_1..t_s).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conca.errors import ConfigError, ShapeError

MASK_VALUE = 2  # embedding id of the masked observable (values are 0/1)


class MaskedMLP(nn.Module):
    """Masked-variable predictor over `n_observed` binary observables.

    The last of the `n_layers` blocks has width `representation_dim` (ConCA App. M uses 10, the
    number of stacked marginal log-posteriors of 5 binary concepts); the others have `hidden`."""

    def __init__(self, n_observed: int, representation_dim: int = 256, hidden: int = 256, n_layers: int = 3,
                 embed_dim: int = 8):
        super().__init__()
        if min(n_observed, representation_dim, hidden, n_layers, embed_dim) < 1:
            raise ConfigError("n_observed, representation_dim, hidden, n_layers and embed_dim must be positive")
        self.n_observed = n_observed
        # One embedding row per (position, value-or-mask): the mask is part of the embedded input.
        self.embed = nn.Embedding(n_observed * 3, embed_dim)
        widths = [n_observed * embed_dim] + [hidden] * (n_layers - 1) + [representation_dim]
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(representation_dim, n_observed * 2)

    @property
    def representation_dim(self) -> int:
        return self.head.in_features

    def _check(self, x: torch.Tensor, masked: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.n_observed:
            raise ShapeError(f"observations must be (N, {self.n_observed}), got {tuple(x.shape)}")
        if masked.shape != (x.shape[0],):
            raise ShapeError(f"need one masked index per row, got shape {tuple(masked.shape)}")

    def features(self, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """f(x): (N, representation_dim), x (N, n) in {0, 1}, masked (N,) the hidden variable."""
        self._check(x, masked)
        ids = x.long().clone()
        ids[torch.arange(len(ids)), masked.long()] = MASK_VALUE
        ids = ids + 3 * torch.arange(self.n_observed, device=ids.device)[None, :]
        return self.body(self.embed(ids).flatten(1))

    def forward(self, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """(N, 2) logits of the masked variable's value."""
        logits = self.head(self.features(x, masked)).view(len(x), self.n_observed, 2)
        return logits[torch.arange(len(x)), masked.long()]


class TargetMLP(nn.Module):
    """f(x) from all `n_observed` binary observables; a linear head gives logits over `vocab` targets."""

    def __init__(self, n_observed: int, vocab: int, representation_dim: int = 10, hidden: int = 256,
                 n_layers: int = 3, embed_dim: int = 8):
        super().__init__()
        if min(n_observed, vocab, representation_dim, hidden, n_layers, embed_dim) < 1:
            raise ConfigError("n_observed, vocab, representation_dim, hidden, n_layers and embed_dim must be positive")
        self.n_observed = n_observed
        self.embed = nn.Embedding(n_observed * 2, embed_dim)  # one row per (position, value)
        widths = [n_observed * embed_dim] + [hidden] * (n_layers - 1)
        blocks: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
        self.body = nn.Sequential(*blocks, nn.Linear(widths[-1], representation_dim))
        self.head = nn.Linear(representation_dim, vocab)

    @property
    def representation_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): (N, representation_dim) from x (N, n_observed) in {0, 1}."""
        if x.ndim != 2 or x.shape[1] != self.n_observed:
            raise ShapeError(f"observations must be (N, {self.n_observed}), got {tuple(x.shape)}")
        ids = x.long() + 2 * torch.arange(self.n_observed, device=x.device)[None, :]
        return self.body(self.embed(ids).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_target_mlp(model: TargetMLP, x: np.ndarray, y: np.ndarray, steps: int = 2000, batch_size: int = 256,
                     lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Adam on the cross-entropy of every target token of each sampled context (y: (N, n_targets)),
    all predicted from the one shared f(x). Returns the loss of every step."""
    if steps < 1 or batch_size < 2 or lr <= 0:
        raise ConfigError(f"steps >= 1, batch_size >= 2 and lr > 0 needed (got {steps}, {batch_size}, {lr})")
    data, targets = torch.as_tensor(np.asarray(x), dtype=torch.long), torch.as_tensor(np.asarray(y), dtype=torch.long)
    if data.ndim != 2 or data.shape[1] != model.n_observed or targets.ndim != 2 or len(targets) != len(data):
        raise ShapeError(f"need x (N, {model.n_observed}) and y (N, targets), got {tuple(data.shape)}, {tuple(targets.shape)}")
    if len(data) < 2:
        raise ConfigError("need at least 2 training samples (BatchNorm needs a batch)")
    k = targets.shape[1]

    def loss(rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(data[rows]).repeat_interleave(k, 0), targets[rows].flatten())

    return _adam_steps(model, len(data), loss, steps, batch_size, lr, seed)


def _adam_steps(model: nn.Module, n: int, loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor], steps: int,
                batch_size: int, lr: float, seed: int) -> list[float]:
    """Adam on `loss(rows, generator)` over uniformly drawn batches of row indices; the loss of every step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)  # fewer Python-level ops per step on CPU
    model.train()
    losses = []
    for _ in range(steps):
        value = loss(torch.randint(n, (min(batch_size, n),), generator=g), g)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(value.item())
    model.eval()
    return losses


class CausalTransformer(nn.Module):
    """A small pre-LN causal transformer over `vocab` tokens plus a BOS id (= vocab)."""

    def __init__(self, vocab: int, max_len: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.vocab, self.max_len = vocab, max_len
        self.tok = nn.Embedding(vocab + 1, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, d_model): position s has seen BOS + t_1..t_s, i.e. it is f(prefix of length s)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
            raise ShapeError(f"tokens must be (N, T <= {self.max_len}), got {tuple(tokens.shape)}")
        bos = torch.full((len(tokens), 1), self.vocab, dtype=torch.long, device=tokens.device)
        inputs = torch.cat([bos, tokens.long()[:, :-1]], dim=1)
        T = inputs.shape[1]
        h = self.tok(inputs) + self.pos(torch.arange(T, device=inputs.device))[None]
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=inputs.device)
        return self.norm(self.blocks(h, mask=causal, is_causal=True))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, vocab) logits: entry s predicts t_{s+1} from t_1..t_s."""
        return self.head(self.features(tokens))


def train_masked_mlp(model: MaskedMLP, x: np.ndarray, steps: int = 2000, batch_size: int = 256, lr: float = 1e-4,
                     seed: int = 0) -> list[float]:
    """Adam on the masked-variable cross-entropy; one uniformly random masked index per row.

    Returns the loss of every step."""
    if steps < 1 or batch_size < 2 or lr <= 0:
        raise ConfigError(f"steps >= 1, batch_size >= 2 and lr > 0 needed (got {steps}, {batch_size}, {lr})")
    data = torch.as_tensor(np.asarray(x), dtype=torch.long)
    if data.ndim != 2 or data.shape[1] != model.n_observed:
        raise ShapeError(f"training observations must be (N, {model.n_observed}), got {tuple(data.shape)}")
    if len(data) < 2:
        raise ConfigError("need at least 2 training samples (BatchNorm needs a batch)")

    def loss(rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        xb = data[rows]
        masked = torch.randint(model.n_observed, (len(xb),), generator=g)
        return F.cross_entropy(model(xb, masked), xb[torch.arange(len(xb)), masked])

    return _adam_steps(model, len(data), loss, steps, batch_size, lr, seed)


def train_causal_transformer(model: CausalTransformer, tokens: np.ndarray, steps: int = 1000, batch_size: int = 64,
                             lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Adam on next-token cross-entropy over every position; returns the loss of every step."""
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"steps, batch_size and lr must be positive (got {steps}, {batch_size}, {lr})")
    data = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)  # fewer Python-level ops per step on CPU
    model.train()
    losses = []
    for _ in range(steps):
        batch = data[torch.randint(len(data), (min(batch_size, len(data)),), generator=g)]
        loss = F.cross_entropy(model(batch).flatten(0, 1), batch.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def representations(model: "MaskedMLP | TargetMLP | CausalTransformer", x: np.ndarray, masked: np.ndarray | None = None,
                    batch_size: int = 8192) -> np.ndarray:
    """f(x) in eval mode as float64 numpy: (N, dim) for the MLP (needs `masked`), (N, T, dim) for
    the transformer (position s = prefix of length s)."""
    was_training = model.training
    model.eval()
    try:
        xt = torch.as_tensor(np.asarray(x), dtype=torch.long)
        out = []
        for i in range(0, len(xt), batch_size):
            if isinstance(model, MaskedMLP):
                if masked is None:
                    raise ConfigError("the masked-prediction MLP needs the masked index of every row")
                m = torch.as_tensor(np.asarray(masked)[i:i + batch_size], dtype=torch.long)
                out.append(model.features(xt[i:i + batch_size], m))
            else:  # TargetMLP: f(x) of every observable; CausalTransformer: f at every prefix
                out.append(model.features(xt[i:i + batch_size]))
        return torch.cat(out).double().numpy()
    finally:
        model.train(was_training)
