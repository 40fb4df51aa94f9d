"""Triton kernel for the grouped gather-sum of the sparse backward (CUDA only).

`kernels.Entries.gather_cols` uses it for CUDA tensors when Triton imports (and
CONCA_DISABLE_TRITON is not 1); everywhere else it uses embedding_bag. The kernel is checked
against embedding_bag in the test suite through Triton's CPU interpreter (TRITON_INTERPRET=1);
it has not been run on a GPU by this project's tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_gather_sum(rows_ptr, weights_ptr, starts_ptr, ends_ptr, matrix_ptr, out_ptr, width,
                        BLOCK: tl.constexpr):
    # One program per (group, block of columns): sum the group's weighted rows of `matrix`.
    group = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < width
    start = tl.load(starts_ptr + group)
    end = tl.load(ends_ptr + group)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(start, end):
        row = tl.load(rows_ptr + i)
        weight = tl.load(weights_ptr + i)
        total += weight * tl.load(matrix_ptr + row * width + columns, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + group * width + columns, total, mask=inside)


def grouped_gather_sum(rows: torch.Tensor, weights: torch.Tensor, starts: torch.Tensor, matrix: torch.Tensor,
                       n_entries: int) -> torch.Tensor:
    """(groups, d): group g = sum over i in [starts[g], starts[g+1]) of weights[i] * matrix[rows[i]]
    (the last group ends at n_entries); the same as embedding_bag(rows, matrix, starts,
    per_sample_weights=weights, mode="sum"). Accumulates in fp32."""
    matrix = matrix.contiguous()
    groups, width = starts.numel(), matrix.shape[1]
    ends = torch.cat([starts[1:], starts.new_tensor([n_entries])])
    out = torch.empty(groups, width, dtype=torch.float32, device=matrix.device)
    block = min(128, triton.next_power_of_2(width))
    _grouped_gather_sum[(groups, triton.cdiv(width, block))](
        rows.contiguous(), weights.float().contiguous(), starts.contiguous(), ends, matrix, out, width, BLOCK=block)
    return out.to(matrix.dtype)
