"""Compiling a model's decoder layers for a long harvest.

Each decoder layer's `forward` is wrapped in `torch.compile` for the duration of a block, so that
the elementwise work around the matmuls (norms, rotary embeddings, the gated MLP's product, the
casts of a bf16 forward) is fused; measured on a 2-core CPU this is about a quarter of a bf16
forward's time. Hooks stay outside the compiled code: the module's own forward hooks run around the
compiled forward, and a layer that holds a hooked submodule (an attn_out / mlp site) is left eager.
All layers share one compiled graph (the layers differ only in their weights, which are inputs), so
compiling costs seconds, once per batch shape: harvest pads its last batch to the full size.
A compiler that cannot run here (no C++ toolchain, an unsupported device) falls back to eager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from conca.models.sites import Site, layer_list, resolve

COMPILE_MIN_TOKENS = 100_000  # 'auto' compiles harvests at least this long (compiling takes ~5-10 s)


def should_compile(compile: str, n_tokens: int) -> bool:
    """'on' / 'off', or 'auto': on for harvests of at least COMPILE_MIN_TOKENS tokens."""
    return compile == "on" or (compile == "auto" and n_tokens >= COMPILE_MIN_TOKENS)


def _hooked_inside(layer: torch.nn.Module, model: torch.nn.Module, sites: list[Site]) -> bool:
    modules = {id(resolve(model, site)[0]) for site in sites}
    return any(id(sub) in modules for name, sub in layer.named_modules() if name)


@contextlib.contextmanager
def compiled_layers(model: torch.nn.Module, sites: list[Site], enabled: bool = True) -> Iterator[int]:
    """Within the block the decoder layers of `model` run compiled; yields how many were. The
    layers are restored on exit."""
    if not enabled:
        yield 0
        return
    import torch._dynamo

    layers = [layer for layer in layer_list(model) if not _hooked_inside(layer, model, sites)]
    previous = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = True  # a backend that fails to compile runs eagerly instead
    try:
        for layer in layers:
            layer.forward = torch.compile(layer.forward, dynamic=False)
        yield len(layers)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        torch._dynamo.config.suppress_errors = previous
