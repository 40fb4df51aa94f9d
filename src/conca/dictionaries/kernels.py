"""Fast paths for TopK-style dictionaries, each behind a plain function with a dense reference
it is tested against.

After the encoder's dense matmul, a TopK-style dictionary uses only a few selected entries of
the (tokens, latents) pre-activation matrix. Plain autograd would still form dense gradients of
that matrix (topk's backward scatters into zeros) and multiply them by the encoder's weights
twice. Here every later step costs in proportion to the selected entries instead:

- `selected_linear` re-attaches the selected pre-activations to autograd with a backward that
  gives the input gradient as an embedding_bag over the encoder's columns, and the weight and
  bias gradients as embedding_bags over the inputs grouped by latent (sparsify's fused encoder
  idea, with a per-latent gather-sum instead of an (N, k, d) index_add buffer);
- `sparse_decode` is the decoder as a gather-sum of the k active rows, with a backward of the
  same shape.

Both take an `Entries` (which entries were selected) so that the grouping by latent is computed
once per step and shared by the encoder's and the decoder's backward.

Backends: the embedding_bag path runs on every device. `triton_kernels` (CUDA + Triton only)
replaces the grouped gather-sums when it imports; see `backend()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(eq=False)
class Entries:
    """Selected entries (rows[i], cols[i]) of an (n_rows, n_cols) matrix, in row-major order.

    `per_row` is k when every row has exactly k entries (TopK), None for ragged selections
    (BatchTopK), which need explicit row offsets."""

    rows: torch.Tensor
    cols: torch.Tensor
    n_rows: int
    n_cols: int
    per_row: int | None = None
    _by_col: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _row_offsets: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def topk(cls, indices: torch.Tensor, n_cols: int) -> "Entries":
        """From (n_rows, k) column indices, one row of k per token."""
        n_rows, k = indices.shape
        rows = torch.arange(n_rows, device=indices.device).repeat_interleave(k)
        return cls(rows, indices.reshape(-1), n_rows, n_cols, per_row=k)

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_rows: int, n_cols: int) -> tuple["Entries", torch.Tensor]:
        """From flat indices row * n_cols + col (any order): the entries in row-major order, and
        the permutation that puts `flat` (and anything aligned with it) in that order."""
        flat, order = flat.sort()
        return cls(flat // n_cols, flat % n_cols, n_rows, n_cols), order

    def __len__(self) -> int:
        return self.cols.numel()

    @property
    def row_offsets(self) -> torch.Tensor:
        """Start of each row's entries (rows are sorted)."""
        if self._row_offsets is None:
            counts = torch.bincount(self.rows, minlength=self.n_rows)
            self._row_offsets = counts.cumsum(0) - counts
        return self._row_offsets

    @property
    def by_col(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, offsets): entries grouped by column, and where each column's group starts.

        Computed once and shared by every backward that uses these entries."""
        if self._by_col is None:
            order = torch.argsort(self.cols, stable=True)
            counts = torch.bincount(self.cols, minlength=self.n_cols)
            self._by_col = order, counts.cumsum(0) - counts
        return self._by_col

    def gather_rows(self, matrix: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(n_rows, d): row r = sum over its entries i of weights[i] * matrix[cols[i]]."""
        weights = weights.reshape(-1).to(matrix.dtype)
        if self.per_row is not None:
            return F.embedding_bag(self.cols.view(self.n_rows, self.per_row), matrix,
                                   per_sample_weights=weights.view(self.n_rows, self.per_row), mode="sum")
        return F.embedding_bag(self.cols, matrix, self.row_offsets, per_sample_weights=weights, mode="sum")

    def gather_cols(self, matrix: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(n_cols, d): column c = sum over its entries i of weights[i] * matrix[rows[i]].

        The transpose of `gather_rows`: this is how the weight gradients are formed, as a
        gather-sum per latent, without an (entries, d) buffer or a dense (N, n) product."""
        order, offsets = self.by_col
        weights = weights.reshape(-1).to(matrix.dtype)
        if _use_triton(matrix):
            from conca.dictionaries.triton_kernels import grouped_gather_sum

            return grouped_gather_sum(self.rows[order], weights[order], offsets, matrix, len(self))
        return F.embedding_bag(self.rows[order], matrix, offsets, per_sample_weights=weights[order], mode="sum")

    def row_dots(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per entry i: <a[rows[i]], b[cols[i]]> (the gradient of a per-entry weight)."""
        offsets = self.row_offsets if self.per_row is None else torch.arange(
            0, len(self), self.per_row, device=self.cols.device)
        try:
            # The per-sample-weight backward of embedding_bag computes exactly this without an
            # (entries, d) buffer; it is an internal op, hence the fallback below.
            return torch.ops.aten._embedding_bag_per_sample_weights_backward(
                a.contiguous(), b, self.cols, offsets, self.rows, 0, -1)
        except (RuntimeError, AttributeError):
            out = torch.empty(len(self), dtype=a.dtype, device=a.device)
            step = 16384
            for s in range(0, len(self), step):
                out[s:s + step] = (a[self.rows[s:s + step]] * b[self.cols[s:s + step]]).sum(-1)
            return out


def backend() -> str:
    """"triton" when its kernels would be used for CUDA tensors here, else "torch".

    Set CONCA_DISABLE_TRITON=1 to force the embedding_bag path."""
    if os.environ.get("CONCA_DISABLE_TRITON") == "1" or not torch.cuda.is_available():
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def _use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and backend() == "triton"


# --- encoder -----------------------------------------------------------------------------


class _SelectedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, entries):
        ctx.save_for_backward(x, weight)
        ctx.entries = entries
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):
        x, weight = ctx.saved_tensors
        entries: Entries = ctx.entries
        grad = grad_values.reshape(-1).float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # weight is (d, n); its transpose is contiguous for the tied init (see init.py), and
            # otherwise one copy per step is still far cheaper than the dense matmul it replaces.
            grad_x = entries.gather_rows(weight.t().contiguous().float(), grad).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = entries.gather_cols(x.float(), grad).t().to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(entries.n_cols, dtype=torch.float32, device=grad.device).index_add_(0, entries.cols, grad)
        return grad_x, grad_w, grad_b, None, None


def pre_activations(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ weight + bias without autograd (one fused addmm; bf16 under autocast): the only dense
    step of a TopK-style encoder. Select from it, then re-attach with `selected_linear`."""
    with torch.no_grad():
        return torch.addmm(bias, x, weight)


def selected_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, values: torch.Tensor,
                    entries: Entries) -> torch.Tensor:
    """The entries of x @ weight + bias picked by `entries`, whose values (from
    `pre_activations`) are `values`, as a differentiable function of x, weight and bias.

    The backward touches only the selected entries: d/dx as a gather-sum of k encoder columns per
    row, d/dW and d/db as gather-sums per latent."""
    return _SelectedLinear.apply(x, weight, bias, values, entries)


def selected_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, entries: Entries) -> torch.Tensor:
    """Plain autograd through the dense product: what `selected_linear` must agree with."""
    return (x @ weight + bias)[entries.rows, entries.cols]


def batch_topk(pre: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, flat indices) of the `total` largest entries of the whole matrix `pre`.

    A top-k over the flattened matrix is slow for a large batch; instead each row's top m
    (m = 4 * total / rows) are candidates, and the top `total` of the candidates are exact when
    every row's smallest candidate is below the smallest selected value (no entry left out
    could compete). Otherwise (rare: a few rows holding most of the selection) the flat top-k."""
    n_rows, n = pre.shape
    m = min(n, 4 * -(-total // n_rows))
    if m < n and total <= n_rows * m:
        candidates, columns = pre.topk(m, dim=-1, sorted=False)
        values, position = candidates.flatten().topk(total, sorted=False)
        if bool((candidates.min(-1).values < values.min()).all()):
            return values, (position // m) * n + columns.flatten()[position]
    return pre.flatten().topk(total, sorted=False)


# --- decoder -----------------------------------------------------------------------------


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, weight, entries):
        ctx.save_for_backward(values, weight)
        ctx.entries = entries
        return entries.gather_rows(weight, values)

    @staticmethod
    def backward(ctx, grad_out):
        values, weight = ctx.saved_tensors
        entries: Entries = ctx.entries
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_values = entries.row_dots(grad_out.to(weight.dtype), weight).view_as(values).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = entries.gather_cols(grad_out.to(weight.dtype), values)
        return grad_values, grad_weight, None


def sparse_decode(indices: "torch.Tensor | Entries", values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j values[:, j] * weight[indices[:, j]] (or over an `Entries` selection): a decoder pass
    that touches only the active rows of `weight`, forward and backward.

    Neither the dense (N, n_latents) code matrix nor its matmul is formed; the weight gradient is
    a gather-sum per latent."""
    entries = indices if isinstance(indices, Entries) else Entries.topk(indices, weight.shape[0])
    return _SparseDecode.apply(values.to(weight.dtype), weight, entries)


def sparse_decode_reference(indices: "torch.Tensor | Entries", values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    entries = indices if isinstance(indices, Entries) else Entries.topk(indices, weight.shape[0])
    dense = torch.zeros(entries.n_rows, weight.shape[0], dtype=weight.dtype, device=weight.device)
    return dense.index_put((entries.rows, entries.cols), values.reshape(-1).to(weight.dtype), accumulate=True) @ weight
