"""Atomic training checkpoints: a killed run never leaves a half-written file behind."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from conca.activations.store import atomic_write_bytes
from conca.errors import CorruptDataError


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: Path) -> dict | None:
    """The saved state, or None when there is no checkpoint yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which, do not guess
        raise CorruptDataError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
