"""`conca store upgrade`: give a store written by an older conca (format 1) its token positions.

The recorded text is tokenised again with the model's tokenizer (no weights are loaded) and every
shard's tokens are checked against it before anything is written; the upgrade is done in place
(conca.activations.upgrade)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from conca.activations.store import ActivationStore
from conca.activations.upgrade import upgrade_store
from conca.errors import ConfigError
from conca.experiments.options import StoreUpgradeOptions
from conca.fileio import DirectoryLock
from conca.models.load import load_tokenizer, resolve_model_spec


@dataclass
class StoreUpgrade:
    store: ActivationStore
    upgraded: bool  # False: the store already had positions

    def summary(self) -> str:
        return (f"upgraded {self.store.path}: {len(self.store.manifest.shards)} shards, {self.store.n_tokens} tokens "
                "now carry positions")


def run_store_upgrade(opts: StoreUpgradeOptions) -> StoreUpgrade:
    if not opts.store:
        raise ConfigError("store upgrade needs --store DIR")
    if opts.model is not None:
        resolve_model_spec(opts.model)  # a bad --model is reported whatever the store holds
    store = ActivationStore.open(Path(opts.store))
    # One writer per folder: a harvest into this store (which holds the same lock) waits its turn.
    with DirectoryLock(store.path, f"conca store upgrade --store {store.path}"):
        if store.has_positions:
            upgrade_store(store.path)  # finishes an upgrade cut short after its manifest switched
            print(f"conca store upgrade: note: store {store.path} already has token positions (format "
                  f"{store.manifest.format_version}): nothing to upgrade", file=sys.stderr)
            return StoreUpgrade(ActivationStore.open(store.path), upgraded=False)
        tokenizer = load_tokenizer(opts.model or store.manifest.model, allow_download=opts.allow_download)
        upgraded = upgrade_store(store.path, tokenizer, allow_download=opts.allow_download, text_field=opts.text_field)
    return StoreUpgrade(upgraded, upgraded=True)
