"""Capture sites: where in a causal LM an activation is read (or written).

A site is named by kind and layer: ``resid.L`` (residual stream after block L), ``mlp_out.L``,
``attn_out.L``, ``mlp_in.L`` (the input of the MLP, for transcoders) and ``final`` (the
final-norm output, i.e. the representation fed to the unembedding, which the seed papers use).
Module lookup is structural, so it works for Llama, GPT-2, GPT-NeoX, Gemma 3 and most HF causal LMs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from conca.errors import ConfigError

KINDS = ("resid", "mlp_out", "attn_out", "mlp_in", "final")
# Within one block, sites fire in this order; used to stop the forward after the deepest one.
_ORDER = {"mlp_in": 1, "attn_out": 0, "mlp_out": 2, "resid": 3}

_LAYER_LIST_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
# Blocks that norm each sublayer's output before adding it to the residual stream (Gemma 2/3, OLMo 2:
# post_attention_layernorm after the attention, post_feedforward_layernorm after the MLP; in Llama
# post_attention_layernorm is the norm *before* the MLP). There attn_out / mlp_out are the outputs of
# those norms, i.e. what the sublayer adds to the stream, as TransformerLens' hook_attn_out / hook_mlp_out.
_POST_MLP_NORM = "post_feedforward_layernorm"
_POST_ATTN_NORM = "post_attention_layernorm"


@dataclass(frozen=True, order=True)
class Site:
    kind: str
    layer: int | None = None

    @classmethod
    def parse(cls, text: "str | Site") -> "Site":
        if isinstance(text, Site):
            return text
        text = text.strip()
        if text == "final":
            return cls("final")
        kind, _, layer = text.partition(".")
        if kind not in KINDS or kind == "final" or not layer.lstrip("-").isdigit():
            raise ConfigError(
                f"unknown site {text!r}: use 'final' or KIND.LAYER with KIND in {', '.join(KINDS[:-1])} (e.g. resid.6)"
            )
        return cls(kind, int(layer))

    def __str__(self) -> str:
        return "final" if self.kind == "final" else f"{self.kind}.{self.layer}"

    def depth(self, n_layers: int) -> tuple[int, int]:
        return (n_layers, 0) if self.kind == "final" else (self.layer, _ORDER[self.kind])


def parse_sites(spec: "str | list[str] | list[Site]") -> list[Site]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    sites = [Site.parse(s) for s in items if str(s).strip()]
    if not sites:
        raise ConfigError("no sites given")
    return list(dict.fromkeys(sites))


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    node = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def layer_list(model: nn.Module) -> nn.ModuleList:
    for path in _LAYER_LIST_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList):
            return found
    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__}")


def _child(block: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise ConfigError(f"cannot find the {what} module in {type(block).__name__} (looked for {', '.join(names)})")


def final_norm(model: nn.Module) -> nn.Module:
    layers = layer_list(model)
    for _, module in model.named_modules():
        for name in _FINAL_NORM_NAMES:
            child = getattr(module, name, None)
            if isinstance(child, nn.Module) and any(c is layers for c in module.children()):
                return child
    raise ConfigError(f"cannot find the final norm of {type(model).__name__}")


def n_layers(model: nn.Module) -> int:
    return len(layer_list(model))


def resolve(model: nn.Module, site: Site) -> tuple[nn.Module, bool]:
    """The module for `site` and whether the site is that module's *input* (not output)."""
    if site.kind == "final":
        return final_norm(model), False
    layers = layer_list(model)
    if not -len(layers) <= site.layer < len(layers):
        raise ConfigError(f"site {site}: layer {site.layer} out of range, the model has {len(layers)} layers (0..{len(layers) - 1})")
    block = layers[site.layer]
    if site.kind == "resid":
        return block, False
    if site.kind in ("attn_out", "mlp_out") and isinstance(getattr(block, _POST_MLP_NORM, None), nn.Module):
        return _child(block, (_POST_ATTN_NORM if site.kind == "attn_out" else _POST_MLP_NORM,), "output norm"), False
    if site.kind == "attn_out":
        return _child(block, _ATTN_NAMES, "attention"), False
    return _child(block, _MLP_NAMES, "MLP"), site.kind == "mlp_in"


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def capture(model: nn.Module, sites: list[Site], stop_early: bool = True) -> Iterator[dict[Site, torch.Tensor]]:
    """Record the activation (batch, seq, d) at each site during forwards inside the block.

    With `stop_early`, the forward is cut right after the deepest site fires; call
    `run_to_sites` rather than the model directly so that the cut is caught."""
    captured: dict[Site, torch.Tensor] = {}
    total = n_layers(model)
    deepest = max(sites, key=lambda s: s.depth(total))
    handles = []

    def make_hook(site: Site, is_input: bool):
        def hook(module, args, output):
            captured[site] = (args[0] if is_input else _first(output)).detach()
            if stop_early and site == deepest and all(s in captured for s in sites):
                raise _StopForward

        return hook

    try:
        for site in sites:
            module, is_input = resolve(model, site)
            handles.append(module.register_forward_hook(make_hook(site, is_input)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def run_to_sites(model: nn.Module, input_ids: torch.Tensor, sites: list[Site], attention_mask=None) -> dict[Site, torch.Tensor]:
    """Activations at `sites` for a batch of token ids; the forward stops after the deepest site."""
    with capture(model, sites) as captured:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    missing = [str(s) for s in sites if s not in captured]
    if missing:
        raise ConfigError(f"sites {missing} did not fire during the forward pass")
    return dict(captured)


@contextlib.contextmanager
def replace_output(model: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the activation at `site` is replaced by fn(activation) on every forward.

    The hook is removed on exit, even on error."""
    module, is_input = resolve(model, site)
    if is_input:
        def pre_hook(mod, args):
            return (fn(args[0]),) + tuple(args[1:])

        handle = module.register_forward_pre_hook(pre_hook)
    else:
        def hook(mod, args, output):
            if isinstance(output, tuple):
                return (fn(output[0]),) + output[1:]
            return fn(output)

        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
