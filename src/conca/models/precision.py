"""The arithmetic precision of a model's forward pass during harvest.

`bf16` runs the forward under bfloat16 autocast, with the Linear layers' weights converted to
bfloat16 once for the whole harvest (autocast would otherwise cast every weight again on every
forward: the model's parameters do not require grad, so autocast does not cache the casts).
The result is bit-identical to plain autocast; norms, softmax and the residual stream stay in
fp32, so the stored activations are fp32 tensors carrying bf16 matmul rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from conca.errors import ConfigError

FORWARD_DTYPES = ("auto", "fp32", "bf16")


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where a bf16 forward is
    about twice as fast as fp32; elsewhere oneDNN emulates bf16 and it can be slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_forward_dtype(forward_dtype: str, device: "torch.device | str") -> str:
    """'auto' -> 'bf16' on a CUDA device that supports it or a CPU with native bf16, else 'fp32'."""
    if forward_dtype not in FORWARD_DTYPES:
        raise ConfigError(f"forward dtype must be one of {', '.join(FORWARD_DTYPES)}, got {forward_dtype!r}")
    if forward_dtype != "auto":
        return forward_dtype
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def _bf16_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Linear layers whose weights can be converted: fp32 ones not tied to another module (a tied
    LM head shares the embedding matrix, which the embedding lookup needs in its own dtype)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embedding.weight if embedding is not None else None
    return [m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 and m.weight is not tied]


@contextlib.contextmanager
def forward_precision(model: torch.nn.Module, forward_dtype: str) -> Iterator[str]:
    """Within the block, forwards of `model` run at `forward_dtype` ('fp32', 'bf16' or 'auto' for
    the device's default); yields the resolved dtype. The fp32 weights are restored on exit, so the
    model is unchanged for whatever runs after (evaluation splices at fp32)."""
    device = next(model.parameters()).device
    resolved = resolve_forward_dtype(forward_dtype, device)
    if resolved == "fp32":
        yield resolved
        return
    saved = []
    try:
        for linear in _bf16_linears(model):
            saved.append((linear, linear.weight, linear.bias))
            linear.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
            if linear.bias is not None:
                linear.bias = torch.nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield resolved
    finally:
        for linear, weight, bias in saved:
            linear.weight = weight
            if bias is not None:
                linear.bias = bias
