"""Sharded on-disk activation store.

Layout of a store directory::

    manifest.json          model (and its file's sha256), sites, d_model, dtype, ctx_len, per-shard token counts and sha256
    shard_00000.safetensors   tensors "act.<site>" (n_tokens, d) for each site, "token_ids" (n_tokens,)
    ...

Every file is written to a temporary name and renamed into place, and the manifest is rewritten
only after its shard is complete, so a killed writer never leaves a listed shard half-written;
`ActivationStore.open` ignores anything the manifest does not list.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from conca.errors import ConfigError, CorruptDataError, InputError, ShapeError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: use one of fp32, bf16, fp16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@dataclass
class ShardInfo:
    file: str
    n_tokens: int
    sha256: str
    contexts: list[int]  # [start, stop) of the context indices this shard covers


@dataclass
class Manifest:
    model: str
    sites: list[str]
    d_model: int
    dtype: str
    ctx_len: int
    n_contexts_planned: int
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # Tokens of every shard the harvest will write, known before it runs (from the contexts'
    # masks), so that training can follow a store that is still being written.
    planned_shard_tokens: list[int] = field(default_factory=list)
    # sha256 of a single-file model (a .gguf), hashed once at harvest; "" for directories and hub ids.
    model_digest: str = ""

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def contexts_done(self) -> int:
        return self.shards[-1].contexts[1] if self.shards else 0

    def to_json(self) -> dict:
        out = asdict(self)
        out["n_tokens"] = self.n_tokens
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "Manifest":
        obj = dict(obj)
        obj.pop("n_tokens", None)
        obj["shards"] = [ShardInfo(**s) for s in obj.get("shards", [])]
        return cls(**obj)


class ActivationStore:
    """A directory of activation shards described by a manifest."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest

    # --- creating and appending -------------------------------------------------------
    @classmethod
    def create_or_resume(cls, path: Path, manifest: Manifest) -> "ActivationStore":
        """Open an existing compatible store to continue it, or start a new one.

        A store written for another model, sites, dtype or context length is refused rather
        than mixed."""
        path = Path(path)
        if (path / MANIFEST).exists():
            store = cls.open(path)
            old = store.manifest
            for key in ("model", "sites", "d_model", "dtype", "ctx_len", "extra"):
                if getattr(old, key) != getattr(manifest, key):
                    raise ConfigError(
                        f"store {path} was harvested with {key}={getattr(old, key)!r}, not {getattr(manifest, key)!r}: "
                        "use another --out directory or delete this one"
                    )
            old.n_contexts_planned = manifest.n_contexts_planned
            old.planned_shard_tokens = list(manifest.planned_shard_tokens)
            return store
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path, manifest)
        store._write_manifest()
        return store

    def append_shard(self, acts: dict[str, torch.Tensor], token_ids: torch.Tensor, contexts: tuple[int, int]) -> ShardInfo:
        n = int(token_ids.shape[0])
        dtype = parse_dtype(self.manifest.dtype)
        tensors = {"token_ids": token_ids.to(torch.int64).contiguous()}
        for site in self.manifest.sites:
            a = acts[site]
            if a.shape != (n, self.manifest.d_model):
                raise ShapeError(f"shard for site {site}: got shape {tuple(a.shape)}, expected ({n}, {self.manifest.d_model})")
            if not torch.isfinite(a).all():
                raise CorruptDataError(f"non-finite activations at site {site} in contexts {contexts}: refusing to store them")
            tensors[f"act.{site}"] = a.to(dtype).contiguous()
        data = st_save(tensors, metadata={"contexts": f"{contexts[0]}:{contexts[1]}"})
        name = f"shard_{len(self.manifest.shards):05d}.safetensors"
        atomic_write_bytes(self.path / name, data)
        info = ShardInfo(file=name, n_tokens=n, sha256=hashlib.sha256(data).hexdigest(), contexts=list(contexts))
        self.manifest.shards.append(info)
        self._write_manifest()
        return info

    def mark_complete(self) -> None:
        self.manifest.complete = True
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest.to_json())

    # --- reading ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> "ActivationStore":
        path = Path(path)
        if not path.exists():
            raise InputError(f"activation store not found: {path}")
        if not (path / MANIFEST).exists():
            raise InputError(f"{path} is not an activation store (no {MANIFEST}); run `conca harvest` first")
        try:
            manifest = Manifest.from_json(json.loads((path / MANIFEST).read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise CorruptDataError(f"manifest {path / MANIFEST} is unreadable: {exc}") from exc
        return cls(path, manifest)

    @property
    def sites(self) -> list[str]:
        return list(self.manifest.sites)

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    def check_site(self, site: str) -> str:
        site = str(site)
        if site not in self.manifest.sites:
            raise ConfigError(f"site {site!r} is not in store {self.path} (it has {', '.join(self.manifest.sites)})")
        return site

    def load_shard(self, index: int, site: str | None = None) -> dict[str, torch.Tensor]:
        """Read one shard, verifying its checksum; with `site`, return only that site and token ids."""
        info = self.manifest.shards[index]
        file = self.path / info.file
        if not file.exists():
            raise InputError(f"shard {file} listed in the manifest is missing")
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise CorruptDataError(f"shard {file} is corrupt: its sha256 does not match the manifest (re-harvest it)")
        tensors = st_load(data)
        if site is not None:
            site = self.check_site(site)
            return {"act": tensors[f"act.{site}"], "token_ids": tensors["token_ids"]}
        return tensors

    def verify(self) -> None:
        """Check every shard's checksum (reads the whole store once)."""
        for i in range(len(self.manifest.shards)):
            self.load_shard(i)
