"""Upgrading a format-1 activation store (no token positions) to format 2, without the model.

A format-1 shard lists its tokens' ids but not where they came from. Every harvest records the
text, split and context length it read, so the contexts can be rebuilt with the model's tokenizer
alone (no weights): the shard covering contexts [a, b) holds exactly the masked-in tokens of those
contexts, in order. That is checked token by token before anything is written; a store whose
tokens do not match (outlier tokens dropped at harvest, a text that has changed since, another
tokenizer) is refused and must be harvested again.

The new shards are written under new names next to the old ones, then the manifest is replaced
atomically, then the old files are removed: an upgrade killed at any point leaves a store that
opens (the old one until the manifest is replaced, the new one after), and running it again
finishes the job."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from conca.activations.store import FORMAT_VERSION, MANIFEST, ActivationStore, ShardInfo, context_positions
from conca.errors import ConfigError, CorruptDataError, InputError
from conca.fileio import atomic_write_bytes, atomic_write_json, bytes_sha256
from conca.text.batching import Contexts
from conca.text.splits import contexts_for

REHARVEST = "re-harvest the store (`conca harvest` into a new --out)"


def upgraded_name(file: str) -> str:
    """The format-2 file of a format-1 shard: shard_00000.safetensors -> shard_00000.v2.safetensors
    (rank_RRR/ prefixes kept)."""
    return f"{file.removesuffix('.safetensors')}.v{FORMAT_VERSION}.safetensors"


def recorded_contexts(store: ActivationStore, tokenizer, text_field: str = "text",
                      allow_download: bool = False) -> Contexts:
    """The contexts a store was harvested from, rebuilt from its manifest (text, split,
    held-out fraction, context length, number of contexts) with `tokenizer`."""
    m = store.manifest
    missing = [key for key in ("text", "split", "heldout_fraction") if key not in m.extra]
    if missing:
        raise InputError(f"store {store.path} does not record the {', '.join(missing)} it was harvested from, so its "
                         f"token positions cannot be rebuilt: {REHARVEST}")
    if m.n_contexts_planned < 1 or m.ctx_len < 2:
        raise InputError(f"store {store.path} records {m.n_contexts_planned} contexts of {m.ctx_len} tokens: {REHARVEST}")
    # contexts_for reads ceil(tokens / (ctx_len - 1)) contexts: exactly the harvest's number.
    contexts = contexts_for(tokenizer, m.extra["text"], m.extra["split"], m.n_contexts_planned * (m.ctx_len - 1),
                            m.ctx_len, m.extra["heldout_fraction"], text_field, allow_download)
    if len(contexts) != m.n_contexts_planned or contexts.ctx_len != m.ctx_len:
        raise InputError(f"the tokens of store {store.path} do not match the recorded text {m.extra['text']!r}: it now "
                         f"gives {len(contexts)} contexts of {contexts.ctx_len} tokens, the harvest had "
                         f"{m.n_contexts_planned} of {m.ctx_len}: {REHARVEST}")
    return contexts


def _stored_token_ids(store: ActivationStore, index: int) -> torch.Tensor:
    """A shard's token ids alone (a cheap read: the full, checksummed read comes when it is rewritten)."""
    file = store.path / store.manifest.shards[index].file
    if not file.is_file():
        raise InputError(f"shard {file} listed in the manifest is missing: {REHARVEST}")
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor("token_ids")
    except Exception as exc:  # safetensors' own errors for a malformed file
        raise CorruptDataError(f"shard {file} is not a readable safetensors file ({exc}): {REHARVEST}") from exc


def _check_tokens(store: ActivationStore, index: int, token_ids: torch.Tensor, contexts: Contexts) -> None:
    start, stop = store.manifest.shards[index].contexts
    expected = contexts.ids[start:stop][contexts.mask[start:stop]]
    if not torch.equal(token_ids.to(torch.int64), expected):
        dropped = store.manifest.extra.get("max_norm_ratio") or 0
        why = (f" (this harvest dropped norm-outlier tokens, max_norm_ratio={dropped}, so its tokens cannot be "
               "placed in their contexts)" if dropped else "")
        raise InputError(f"the tokens of shard {index} of store {store.path} (contexts {start}:{stop}) do not match the "
                         f"recorded text {store.manifest.extra.get('text')!r} and tokenizer{why}: {REHARVEST}")


def check_upgrade_space(store: ActivationStore) -> None:
    """Refuse an upgrade whose new shards (a copy of every shard, with positions) would not fit."""
    needed = sum((s.size or (store.path / s.file).stat().st_size) + 8 * s.n_tokens for s in store.manifest.shards)
    free = shutil.disk_usage(store.path).free
    if needed > free:
        raise ConfigError(f"upgrading store {store.path} writes a new copy of its shards, about "
                          f"{needed / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB is free there")


def upgrade_store(path: "Path | str", tokenizer=None, allow_download: bool = False,
                  text_field: str = "text") -> ActivationStore:
    """Give every shard of the format-1 store at `path` its token positions (format 2) and return
    the upgraded store. A store that already has them is returned as it is (after finishing an
    upgrade that was cut short once its manifest had switched). `tokenizer` defaults to the one of
    the store's recorded model (conca.models.load.load_tokenizer, no weights)."""
    store = ActivationStore.open(path)
    if store.has_positions:
        _finish_upgrade(store)
        return store
    if tokenizer is None:
        from conca.models.load import load_tokenizer

        tokenizer = load_tokenizer(store.manifest.model, allow_download=allow_download)
    contexts = recorded_contexts(store, tokenizer, text_field, allow_download)
    for i, info in enumerate(store.manifest.shards):  # every shard checked before anything is written
        if info.contexts[1] > len(contexts):
            raise CorruptDataError(f"shard {i} of store {store.path} covers contexts {info.contexts}, beyond the "
                                   f"{len(contexts)} the manifest plans")
        _check_tokens(store, i, _stored_token_ids(store, i), contexts)
    check_upgrade_space(store)
    written: list[Path] = []
    try:
        upgraded = [_write_upgraded_shard(store, i, contexts, written) for i in range(len(store.manifest.shards))]
        new = replace(store.manifest, shards=upgraded, format_version=FORMAT_VERSION)
        atomic_write_json(store.path / MANIFEST, new.to_json())  # the switch to the new shards
    except BaseException:
        for file in written:  # the old store is still the one listed: leave it as it was
            file.unlink(missing_ok=True)
        raise
    store = ActivationStore(store.path, new)
    _finish_upgrade(store)
    return store


def _write_upgraded_shard(store: ActivationStore, index: int, contexts: Contexts, written: list[Path]) -> ShardInfo:
    """Shard `index` rewritten under its new name with positions (read in full and verified first)."""
    info = store.manifest.shards[index]
    tensors = store.load_shard(index)  # checks its size and sha256
    _check_tokens(store, index, tensors["token_ids"], contexts)
    start, stop = info.contexts
    tensors["positions"] = context_positions(contexts.mask[start:stop], start)
    data = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"contexts": f"{start}:{stop}"})
    name = upgraded_name(info.file)
    atomic_write_bytes(store.path / name, data)
    written.append(store.path / name)
    return replace(info, file=name, sha256=bytes_sha256(data), size=len(data))


def _finish_upgrade(store: ActivationStore) -> None:
    """After the manifest has switched: point the rank sub-manifests of a store merged from torchrun
    ranks at the new files (a resumed torchrun harvest reads them), then remove the old files. Does
    nothing to a store with nothing left to finish."""
    listed = {info.file: info for info in store.manifest.shards}
    ranks = sorted({file.split("/")[0] for file in listed if "/" in file})
    for rank in ranks:
        sub = ActivationStore.open(store.path / rank).manifest
        if sub.format_version >= FORMAT_VERSION:
            continue
        new = {s.file: listed.get(f"{rank}/{upgraded_name(s.file)}") for s in sub.shards}
        if all(new.values()):  # the sub-store this merge listed, shard for shard
            shards = [replace(new[s.file], file=upgraded_name(s.file)) for s in sub.shards]
            atomic_write_json(store.path / rank / MANIFEST,
                              replace(sub, shards=shards, format_version=FORMAT_VERSION).to_json())
    suffix = f".v{FORMAT_VERSION}.safetensors"
    for file in listed:
        old = file[:-len(suffix)] + ".safetensors"
        if file.endswith(suffix) and old not in listed:
            (store.path / old).unlink(missing_ok=True)
