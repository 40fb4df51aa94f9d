"""Devices by name: the one place that turns a --device value into a torch.device."""

from __future__ import annotations

import torch

from conca.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available else cpu; a named CUDA device without CUDA is refused by name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine (use --device cpu or auto)")
    return device
