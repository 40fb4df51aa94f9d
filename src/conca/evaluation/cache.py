"""Reusing a finished evaluation: a site's metrics are cached in the run folder under a key made
of everything they depend on, and recomputed as soon as any part of the key differs.

The key holds the dictionary's digest (method, config and every inference tensor, see
:func:`dictionary_digest`), the evaluation settings the caller names (model, site, text, tokens,
ctx_len, split, held-out fraction, ...), a digest of the very token ids and mask evaluated on,
the conca version and :data:`EVAL_FORMAT`. The cache file is written atomically, so a killed run
leaves either the old file or the new one."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

import conca
from conca.dictionaries.base import Dictionary
from conca.fileio import atomic_write_json
from conca.text.batching import Contexts

# Bump when what an evaluation computes changes without a conca version bump, so that metrics
# cached by the older code are not reused.
EVAL_FORMAT = 2  # 2: SAELens' CE-loss variant (ce_loss_recovered_saelens, ...) added


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()  # any dtype, bf16 included


def dictionary_digest(dictionary: Dictionary) -> str:
    """sha256 of the dictionary's method, config and inference tensors (names, dtypes, shapes, bytes):
    equal digests encode and decode identically."""
    h = hashlib.sha256()
    h.update(json.dumps({"method": dictionary.name, "config": asdict(dictionary.config)}, sort_keys=True,
                        default=str).encode())
    for name, tensor in sorted(dictionary.inference_state().items()):
        h.update(f"\n{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def contexts_digest(contexts: Contexts) -> str:
    """sha256 of the token ids and mask (the exact evaluation input, whatever text produced it)."""
    h = hashlib.sha256()
    h.update(f"{tuple(contexts.ids.shape)}\n".encode())
    h.update(_tensor_bytes(contexts.ids.long()))
    h.update(_tensor_bytes(contexts.mask.bool()))
    return h.hexdigest()


def evaluation_key(dictionary: Dictionary, contexts: Contexts, **settings) -> dict:
    """The cache key: digests, the given settings, conca's version and the cache format."""
    key = {"dictionary_sha256": dictionary_digest(dictionary), "contexts_sha256": contexts_digest(contexts),
           **settings, "conca_version": conca.__version__, "eval_format": EVAL_FORMAT}
    return json.loads(json.dumps(key, default=str))  # as it reads back from the file


def load_evaluation(path: "str | Path", key: dict, required: tuple[str, ...] = ()) -> tuple[dict, torch.Tensor] | None:
    """(metrics, firing frequencies) cached at `path` under exactly `key` and holding every
    `required` metric; None when there is no such file, it is unreadable or anything differs."""
    try:
        cached = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    metrics, freqs = cached.get("metrics"), cached.get("firing_frequency")
    if not isinstance(metrics, dict) or not isinstance(freqs, list) or any(k not in metrics for k in required):
        return None
    return metrics, torch.tensor(freqs, dtype=torch.float64)


def save_evaluation(path: "str | Path", key: dict, metrics: dict, freqs: torch.Tensor) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "metrics": metrics,
                             "firing_frequency": freqs.detach().cpu().double().tolist()})


def differences(path: "str | Path", key: dict) -> list[str]:
    """Names of the key entries that differ from the ones cached at `path` (for the log)."""
    try:
        old = json.loads(Path(path).read_text()).get("key") or {}
    except (OSError, ValueError, AttributeError):
        return []
    return sorted(k for k in set(key) | set(old) if key.get(k) != old.get(k))
