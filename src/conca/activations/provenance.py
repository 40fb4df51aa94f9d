"""Where training data came from: fingerprints of activation sources, and the model's identity.

A fingerprint is a plain JSON-able dict (strings, lists, bools), so it goes into a training
checkpoint and a dictionary's config.json as it is:

    store:  {"kind": "store", "path", "site", "manifest_sha256", "identity_sha256", "shard_sha256", "complete"}
    .npy:   {"kind": "npy", "path", "sha256"}
    paired: {"kind": "paired", "inputs": <store or npy>, "targets": <store or npy>}   (transcoders)

`manifest_sha256` is the sha256 of the manifest's canonical JSON (sorted keys, no spaces).
A store that is still being harvested (`--follow`) grows its manifest, so two fingerprints of one
store are "the same source" when their identity (model, model digest, sites, d_model, dtype,
ctx_len, extra) matches and every shard both list has the same sha256 (see `check_same_source`).
In-memory sources (TensorSource) have no fingerprint (None): nothing is checked for them.

Model digests: the sha256 of the model file for a single-file model (a .gguf), computed once at
harvest and recorded in the store manifest (`model_digest`); directories and Hugging Face ids are
identified by their resolved directory or id (a hub cache path names the snapshot's commit).
"""

from __future__ import annotations

import os
from pathlib import Path

from conca.activations.store import ActivationStore, Manifest
from conca.errors import ConfigError
from conca.fileio import canonical_sha256, file_sha256

IDENTITY_KEYS = ("model", "model_digest", "sites", "d_model", "dtype", "ctx_len", "extra")


def manifest_digest(manifest: Manifest) -> str:
    return canonical_sha256(manifest.to_json())


def manifest_identity_digest(manifest: Manifest) -> str:
    """The part of a manifest that does not grow while a harvest runs."""
    data = manifest.to_json()
    return canonical_sha256({k: data.get(k) for k in IDENTITY_KEYS})


def model_key(name: str | None) -> str | None:
    """A model name as recorded in provenance: an absolute path when it names a local file or folder
    (so a relative --model stays meaningful from another directory), else the id unchanged."""
    if not name:
        return None
    return os.path.abspath(name) if os.path.exists(name) else name


def model_digest(name: str | None) -> str | None:
    """sha256 of a single-file model (a .gguf); None for directories, hub ids and missing files."""
    if name and os.path.isfile(name):
        return file_sha256(name)
    return None


def _store_fingerprint(store: ActivationStore, site: str) -> dict:
    try:  # the latest manifest on disk: a followed store has grown since the source opened it
        manifest = ActivationStore.open(store.path).manifest
    except Exception:  # noqa: BLE001 -- a store removed after reading: what was read still describes it
        manifest = store.manifest
    return {"kind": "store", "path": str(Path(store.path).resolve()), "site": str(site),
            "manifest_sha256": manifest_digest(manifest), "identity_sha256": manifest_identity_digest(manifest),
            "shard_sha256": [s.sha256 for s in manifest.shards], "complete": bool(manifest.complete)}


def source_fingerprint(source, target_source=None) -> dict | None:
    """The fingerprint of a StoreSource, NpySource or PairedSource of those (or of `source` paired
    with `target_source`, for transcoders); None for other sources."""
    from conca.activations.stream import NpySource, PairedSource, StoreSource

    if target_source is not None:
        inputs, targets = source_fingerprint(source), source_fingerprint(target_source)
        return None if inputs is None or targets is None else {"kind": "paired", "inputs": inputs, "targets": targets}
    if isinstance(source, StoreSource):
        return _store_fingerprint(source.store, source.site)
    if isinstance(source, NpySource):
        return {"kind": "npy", "path": str(Path(source.path).resolve()), "sha256": file_sha256(source.path)}
    if isinstance(source, PairedSource):
        inputs, targets = source_fingerprint(source.inputs), source_fingerprint(source.targets)
        if inputs is None or targets is None:
            return None
        return {"kind": "paired", "inputs": inputs, "targets": targets}
    return None


def source_provenance(source, target_source=None) -> dict:
    """What a dictionary trained on `source` (and `target_source`) records about its data:
    model (name, sha256), site, target_site and the source fingerprint without its shard list."""
    from conca.activations.stream import StoreSource

    fingerprint = source_fingerprint(source, target_source)
    model = None
    if isinstance(source, StoreSource):
        manifest = source.store.manifest
        recorded = getattr(manifest, "model_digest", "") or None
        model = {"name": model_key(manifest.model), "sha256": recorded}
    return {"model": model,
            "site": source.site if isinstance(source, StoreSource) else None,
            "target_site": target_source.site if isinstance(target_source, StoreSource) else None,
            "source": _without_shards(fingerprint)}


def _without_shards(fingerprint: dict | None) -> dict | None:
    if fingerprint is None:
        return None
    if fingerprint["kind"] == "paired":
        return {**fingerprint, "inputs": _without_shards(fingerprint["inputs"]),
                "targets": _without_shards(fingerprint["targets"])}
    return {k: v for k, v in fingerprint.items() if k != "shard_sha256"}


def describe_source(fingerprint: dict | None) -> str:
    """One phrase naming a fingerprinted source, e.g. `store /data/s [resid.3] (manifest sha256 1a2b3c4d5e6f)`."""
    if fingerprint is None:
        return "an in-memory source"
    kind = fingerprint.get("kind")
    if kind == "paired":
        return f"{describe_source(fingerprint['inputs'])} -> {describe_source(fingerprint['targets'])}"
    if kind == "store":
        return (f"store {fingerprint['path']} [{fingerprint['site']}] "
                f"(manifest sha256 {fingerprint['manifest_sha256'][:12]})")
    return f"{fingerprint.get('path')} (sha256 {str(fingerprint.get('sha256'))[:12]})"


def same_source(recorded: dict | None, current: dict | None) -> bool:
    """Whether two fingerprints name the same data (None on either side: nothing to compare).

    Stores match on site, identity and the sha256 of every shard both list, so a store still
    being harvested matches itself later, and a store copied elsewhere matches its original."""
    if recorded is None or current is None:
        return True
    if recorded.get("kind") != current.get("kind"):
        return False
    kind = recorded["kind"]
    if kind == "paired":
        return same_source(recorded["inputs"], current["inputs"]) and same_source(recorded["targets"], current["targets"])
    if kind == "store":
        if recorded["site"] != current["site"] or recorded["identity_sha256"] != current["identity_sha256"]:
            return False
        common = min(len(recorded["shard_sha256"]), len(current["shard_sha256"]))
        return recorded["shard_sha256"][:common] == current["shard_sha256"][:common]
    return recorded.get("sha256") == current.get("sha256")


def check_same_source(recorded: dict | None, current: dict | None, checkpoint: "str | Path") -> None:
    """Refuse to continue a checkpoint on other data: ConfigError naming both sources."""
    if not same_source(recorded, current):
        raise ConfigError(f"{checkpoint} was trained on {describe_source(recorded)}; the activations given now are "
                          f"{describe_source(current)}, another source: resume with the same --activations "
                          "(and --site), or use a new output directory")


__all__ = ["manifest_digest", "manifest_identity_digest", "model_key",
           "model_digest", "source_fingerprint", "source_provenance", "describe_source", "same_source",
           "check_same_source"]
