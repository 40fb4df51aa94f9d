"""Sharded on-disk activation store.

Layout of a store directory::

    manifest.json          model (and its file's sha256), sites, d_model, dtype, ctx_len, per-shard token counts and sha256
    shard_00000.safetensors   tensors "act.<site>" (n_tokens, d) for each site, "token_ids" (n_tokens,) and
                              "positions" (n_tokens, 2) int32: [global context index, position in the context]
    ...

Format 2 added "positions" (every token can be traced back to its context); a format-1 store (no
positions) still reads and trains as before, and `conca store upgrade` (conca.activations.upgrade)
adds them.

Every file is written to a temporary name and renamed into place, and the manifest is rewritten
only after its shard is complete, so a killed writer never leaves a listed shard half-written;
`ActivationStore.open` ignores anything the manifest does not list.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from conca.errors import ConfigError, CorruptDataError, InputError, ShapeError

# The atomic writers live in conca.fileio; many modules still import them from here.
from conca.fileio import atomic_write_bytes, atomic_write_json, bytes_sha256, check_plain_name

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: shards hold "positions"; 1: they do not
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def context_positions(mask: torch.Tensor, first_context: int) -> torch.Tensor:
    """The `positions` of a shard: int32 (n_tokens, 2) rows [first_context + row, column] of the
    True entries of a (contexts, ctx_len) token mask, in the order `ids[mask]` lists the tokens.
    Writers of made-up stores (tests, benchmarks) pass e.g. `context_positions(torch.ones(c, t,
    dtype=torch.bool), start)` for c contexts of t stored tokens each."""
    where = mask.nonzero().to(torch.int32)
    where[:, 0] += int(first_context)
    return where


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: use one of fp32, bf16, fp16") from None


@dataclass
class ShardInfo:
    file: str
    n_tokens: int
    sha256: str
    contexts: list[int]  # [start, stop) of the context indices this shard covers
    size: int | None = None  # bytes of the file (absent in stores written before it was recorded)


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
    def from_json(cls, obj: object, where: "Path | str" = MANIFEST) -> "Manifest":
        """A manifest from its parsed JSON, every field checked: anything else (another JSON value,
        a missing or mistyped field, a shard file outside the store) is a CorruptDataError naming
        `where`, the file it came from."""
        if not isinstance(obj, dict):
            raise CorruptDataError(f"manifest {where} holds a JSON {type(obj).__name__}, not an object: it is not a store manifest")
        obj = dict(obj)
        obj.pop("n_tokens", None)
        obj.setdefault("format_version", 1)  # the field's default is the newest format, not the oldest
        _check_fields(obj, cls, _MANIFEST_CHECKS, where, "")
        if obj["format_version"] > FORMAT_VERSION:
            raise InputError(f"store manifest {where} is format {obj['format_version']}, written by a newer conca "
                             f"(this one reads formats 1 to {FORMAT_VERSION}): upgrade conca")
        shards = []
        for i, entry in enumerate(obj.get("shards", [])):
            if not isinstance(entry, dict):
                raise CorruptDataError(f"manifest {where}: shards[{i}] is a JSON {type(entry).__name__}, not an object")
            _check_fields(entry, ShardInfo, _SHARD_CHECKS, where, f"shards[{i}].")
            check_shard_file(entry["file"], where)
            shards.append(ShardInfo(**entry))
        obj["shards"] = shards
        return cls(**obj)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return _is_int(value) and value >= 0


def _is_list_of(check):
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


# field -> (check, what it should be). Fields not listed here are not type-checked.
_MANIFEST_CHECKS = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "sites": (_is_list_of(lambda v: isinstance(v, str)), "a list of strings"),
    "d_model": (_is_count, "a non-negative integer"),
    "dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "ctx_len": (_is_count, "a non-negative integer"),
    "n_contexts_planned": (_is_count, "a non-negative integer"),
    "shards": (lambda v: isinstance(v, list), "a list"),
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "extra": (lambda v: isinstance(v, dict), "an object"),
    "format_version": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "planned_shard_tokens": (_is_list_of(_is_count), "a list of non-negative integers"),
}
_SHARD_CHECKS = {
    "file": (lambda v: isinstance(v, str), "a string"),
    "n_tokens": (_is_count, "a non-negative integer"),
    "sha256": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None, "a sha256 hex digest"),
    "contexts": (lambda v: _is_list_of(_is_count)(v) and len(v) == 2 and v[0] <= v[1], "[start, stop] context indices"),
    "size": (lambda v: v is None or _is_count(v), "a byte count"),
}


def _check_fields(obj: dict, cls: type, checks: dict, where: "Path | str", prefix: str) -> None:
    known = {f.name: f for f in fields(cls)}
    for key in obj:
        if key not in known:
            raise CorruptDataError(f"manifest {where}: unknown field '{prefix}{key}'")
    for name, f in known.items():
        required = f.default is MISSING and f.default_factory is MISSING
        if required and name not in obj:
            raise CorruptDataError(f"manifest {where}: field '{prefix}{name}' is missing")
        if name in obj and name in checks and not checks[name][0](obj[name]):
            raise CorruptDataError(f"manifest {where}: field '{prefix}{name}' is {obj[name]!r}, "
                                   f"expected {checks[name][1]}")


def check_shard_file(name: str, where: "Path | str") -> str:
    """A shard's file is a plain name inside the store, or `rank_RRR/NAME` in a store merged from
    torchrun ranks: never an absolute path or one that climbs out with '..'."""
    parts = name.split("/")
    if len(parts) == 2 and re.fullmatch(r"rank_\d{3}", parts[0]):
        check_plain_name(parts[1], Path(where), "shard file")
    else:
        check_plain_name(name, Path(where), "shard file")
    return name


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
            if old.format_version != manifest.format_version:
                raise ConfigError(f"store {path} is format {old.format_version} and this harvest writes format "
                                  f"{manifest.format_version}: run `conca store upgrade --store {shlex.quote(str(path))}` "
                                  "first, or use another --out")
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

    def append_shard(self, acts: dict[str, torch.Tensor], token_ids: torch.Tensor, contexts: tuple[int, int],
                     positions: torch.Tensor | None = None, replace: int | None = None) -> ShardInfo:
        """Write a shard and list it in the manifest: appended, or with `replace`, rewritten in place
        of that (damaged) shard, which must cover the same contexts. `positions` ((n_tokens, 2)
        [context, position] of each token; see `context_positions`) is required in a format-2
        store and must be None in a format-1 one."""
        n = int(token_ids.shape[0])
        dtype = parse_dtype(self.manifest.dtype)
        tensors = {"token_ids": token_ids.to(torch.int64).contiguous()}
        if (positions is None) != (self.manifest.format_version < 2):
            raise ValueError(f"a format-{self.manifest.format_version} store shard "
                             f"{'needs' if positions is None else 'takes no'} token positions")
        if positions is not None:
            if tuple(positions.shape) != (n, 2):
                raise ShapeError(f"shard positions: got shape {tuple(positions.shape)}, expected ({n}, 2)")
            tensors["positions"] = positions.to(torch.int32).contiguous()
        for site in self.manifest.sites:
            a = acts[site]
            if a.shape != (n, self.manifest.d_model):
                raise ShapeError(f"shard for site {site}: got shape {tuple(a.shape)}, expected ({n}, {self.manifest.d_model})")
            if not torch.isfinite(a).all():
                raise CorruptDataError(f"non-finite activations at site {site} in contexts {contexts}: refusing to store them")
            tensors[f"act.{site}"] = a.to(dtype).contiguous()
        data = st_save(tensors, metadata={"contexts": f"{contexts[0]}:{contexts[1]}"})
        if replace is None:
            name = f"shard_{len(self.manifest.shards):05d}.safetensors"
        else:
            old = self.manifest.shards[replace]
            if list(old.contexts) != list(contexts):
                raise ValueError(f"shard {replace} covers contexts {old.contexts}, not {list(contexts)}")
            name = old.file
        atomic_write_bytes(self.path / name, data)
        info = ShardInfo(file=name, n_tokens=n, sha256=bytes_sha256(data), contexts=list(contexts),
                         size=len(data))
        if replace is None:
            self.manifest.shards.append(info)
        else:
            self.manifest.shards[replace] = info
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
        where = path / MANIFEST
        try:
            obj = json.loads(where.read_text(encoding="utf-8"))
        except ValueError as exc:  # not JSON, or not UTF-8
            raise CorruptDataError(f"manifest {where} is unreadable: {exc}") from exc
        manifest = Manifest.from_json(obj, where)
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
        """Read one shard, verifying its size, checksum and contents against the manifest; with
        `site`, return only that site, token ids and (format 2) positions."""
        tensors = self._read_shard(index)
        if site is not None:
            site = self.check_site(site)
            keep = {"act": tensors[f"act.{site}"], "token_ids": tensors["token_ids"]}
            if "positions" in tensors:
                keep["positions"] = tensors["positions"]
            return keep
        return tensors

    @property
    def has_positions(self) -> bool:
        """Whether every shard records the [context, position] of its tokens (format 2 and later)."""
        return self.manifest.format_version >= 2

    def require_positions(self, command: str) -> None:
        """Refuse, for `command` (e.g. "conca inspect"), a store without token positions."""
        if not self.has_positions:
            raise InputError(f"store {self.path} has no token positions (written by an older conca, format "
                             f"{self.manifest.format_version}): re-harvest it, or run `conca store upgrade --store "
                             f"{shlex.quote(str(self.path))}` before {command}")

    def read_tokens(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token_ids int64 (n,), positions int32 (n, 2)) of shard `index`, read lazily: only those
        two tensors, and without the full-file checksum (for a store one pass has already verified)."""
        self.require_positions("reading token positions")
        info = self.manifest.shards[index]
        file = self.path / info.file
        if not file.is_file():
            raise InputError(f"shard {file} listed in the manifest is missing (re-run the same `conca harvest` to "
                             "rewrite it)")
        try:
            with safe_open(str(file), framework="pt") as f:
                token_ids, positions = f.get_tensor("token_ids"), f.get_tensor("positions")
        except Exception as exc:  # safetensors' own errors for a malformed file or a missing tensor
            raise CorruptDataError(f"shard {file} does not hold readable token ids and positions ({exc})") from exc
        if (tuple(token_ids.shape), tuple(positions.shape)) != ((info.n_tokens,), (info.n_tokens, 2)) \
                or token_ids.dtype != torch.int64 or positions.dtype != torch.int32:
            raise CorruptDataError(f"shard {file} does not match the manifest: token ids {tuple(token_ids.shape)} "
                                   f"{token_ids.dtype} and positions {tuple(positions.shape)} {positions.dtype}, "
                                   f"expected {info.n_tokens} tokens (int64) and ({info.n_tokens}, 2) int32")
        return token_ids, positions

    def _read_shard(self, index: int) -> dict[str, torch.Tensor]:
        info = self.manifest.shards[index]
        file = self.path / info.file
        repair = "re-run the same `conca harvest` to rewrite it"
        if not file.is_file():
            raise InputError(f"shard {file} listed in the manifest is missing ({repair})")
        data = file.read_bytes()
        if info.size is not None and len(data) != info.size:
            raise CorruptDataError(f"shard {file} is corrupt: it has {len(data)} bytes, the manifest records "
                                   f"{info.size} ({repair})")
        if bytes_sha256(data) != info.sha256:
            raise CorruptDataError(f"shard {file} is corrupt: its sha256 does not match the manifest ({repair})")
        try:
            tensors = st_load(data)
        except Exception as exc:  # safetensors raises its own error type for a malformed header
            raise CorruptDataError(f"shard {file} is not a readable safetensors file ({exc}; {repair})") from exc
        expected = {"token_ids": (info.n_tokens,),
                    **{f"act.{s}": (info.n_tokens, self.manifest.d_model) for s in self.manifest.sites}}
        if self.has_positions:
            expected["positions"] = (info.n_tokens, 2)
        for key, shape in expected.items():
            got = tuple(tensors[key].shape) if key in tensors else None
            if got != shape:
                raise CorruptDataError(f"shard {file} does not match the manifest: {key} has shape {got}, the "
                                       f"manifest records {info.n_tokens} tokens x {self.manifest.d_model} ({repair})")
        if self.has_positions and tensors["positions"].dtype != torch.int32:
            raise CorruptDataError(f"shard {file} holds positions of type {tensors['positions'].dtype}, not int32 ({repair})")
        return tensors

    def damaged_shards(self) -> dict[int, str]:
        """Listed shards that are missing or fail their checks, with the reason (reads the whole store)."""
        damaged = {}
        for i in range(len(self.manifest.shards)):
            try:
                self._read_shard(i)
            except InputError as exc:
                damaged[i] = str(exc)
        return damaged

    def verify(self) -> None:
        """Check every shard's size, checksum and contents (reads the whole store once)."""
        for i in range(len(self.manifest.shards)):
            self._read_shard(i)
