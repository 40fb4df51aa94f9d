"""The three basic jobs -- harvest, train, evaluate -- as options dataclasses and functions.

The CLI and the demo are thin layers over these; each job writes its effective config and a
metrics.json beside its outputs."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch

from conca.activations.harvest import harvest
from conca.activations.store import DTYPES, ActivationStore
from conca.activations.stream import open_source, read_rows
from conca.config import option, parse_key_values, save_effective_config
from conca.dictionaries.base import create, get_method, load_dictionary
from conca.dictionaries.provenance import check_model_width, read_recorded, resolve_target
from conca.errors import ConfigError
from conca.evaluation.dictionary import evaluate_dictionary
from conca.fileio import atomic_write_json
from conca.models.load import LoadedModel, check_context_length, load_model
from conca.models.sites import parse_sites
from conca.runtime import distributed
from conca.runtime.device import resolve_device
from conca.text.splits import SPLITS, check_text, contexts_for
from conca.training.trainer import TrainConfig, TrainResult, evaluate_batch, train


@dataclass
class HarvestOptions:
    out: str = option("", "output directory of the activation store (required)", path="out_dir")
    model: str = option("smollm2", "model: 'smollm2' (embedded default), a .gguf file, a local HF directory or a cached HF id")
    text: str = option("pydoc", "text: 'pydoc' (offline default corpus), a .txt/.jsonl/.parquet file, or hf:NAME[:SPLIT]")
    text_field: str = option("text", "field/column holding the text in .jsonl/.parquet")
    sites: str = option("final", "comma-separated capture sites: final, resid.L, mlp_out.L, attn_out.L, mlp_in.L")
    tokens: int = option(32768, "number of text tokens to harvest (special tokens excluded)", min=1)
    ctx_len: int = option(128, "tokens per context", min=2)
    split: str = option("train", "which part of the text: train, heldout (about --heldout-fraction of the documents) or all",
                        choices=SPLITS)
    heldout_fraction: float = option(0.1, "fraction of documents held out for evaluation", gt=0, lt=1)
    dtype: str = option("fp32", "storage dtype: fp32, bf16 or fp16", choices=tuple(DTYPES))
    batch_size: int = option(8, "contexts per forward pass", min=1)
    shard_contexts: int = option(64, "contexts per shard (the unit of resumption)", min=1)
    device: str = option("auto", "device of the model: auto (CUDA when available), cpu, cuda or cuda:N; under "
                                 "torchrun each rank takes cuda:LOCAL_RANK")
    allow_download: bool = option(False, "download a hub model or hf: dataset when not in the local cache (off: offline, no network request)")
    progress: bool = option(True, "show progress bars")


def run_harvest(opts: HarvestOptions, loaded: LoadedModel | None = None) -> ActivationStore:
    if not opts.out:
        raise ConfigError("harvest needs --out DIR")
    # Under torchrun each rank runs its own copy of the model on its own GPU (or on the CPU).
    device = distributed.local_device(resolve_device(opts.device))
    parse_sites(opts.sites)  # the names; the layers are checked against the model when it is loaded
    if loaded is None:  # cheap checks of the inputs before the model loads
        check_text(opts.text, opts.text_field, opts.allow_download)
    loaded = loaded or load_model(opts.model, device=device, allow_download=opts.allow_download)
    check_context_length(loaded, opts.ctx_len)
    contexts = contexts_for(loaded.tokenizer, opts.text, opts.split, opts.tokens, opts.ctx_len,
                            opts.heldout_fraction, opts.text_field, opts.allow_download)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    save_effective_config(opts, out)
    extra = {"text": opts.text, "split": opts.split, "heldout_fraction": opts.heldout_fraction}
    return harvest(loaded, contexts, opts.sites, out, dtype=opts.dtype, batch_size=opts.batch_size,
                   shard_contexts=opts.shard_contexts, extra=extra, progress=opts.progress)


# --- train -------------------------------------------------------------------------------
@dataclass
class TrainOptions:
    activations: str = option("", "activation store directory or a (tokens, d) .npy matrix (required)")
    out: str = option("", "output directory (required); an unfinished run there is resumed", path="out_dir")
    site: str | None = option(None, "site to train on when the store holds several")
    target_site: str | None = option(None, "transcoder mode: reconstruct this site of the same store from --site "
                                           "(e.g. --site mlp_in.3 --target-site mlp_out.3)")
    method: str = option("topk", "dictionary method (see `conca methods`)")
    dict_options: str = option("", "method-specific options as KEY=VALUE[,KEY=VALUE...], e.g. l1_coeff=5,penalty=l1 "
                                   "(the fields of the method's config)")
    n_latents: int | None = option(None, "number of latents (default: expansion x d)", min=1)
    expansion: int = option(8, "latents per input dimension when --n-latents is not given", min=1)
    k: int = option(32, "active latents per token (TopK)", min=1)
    aux_k: int | None = option(None, "dead latents used by the AuxK loss (default d/2)", min=1)
    aux_coeff: float = option(1 / 32, "AuxK loss weight", min=0)
    dead_after_tokens: int = option(10_000_000, "tokens without firing after which a latent counts as dead", min=1)
    steps: int = option(1000, "optimiser steps", min=1)
    batch_size: int = option(1024, "tokens per batch", min=1)
    lr: float = option(4e-4, "peak Adam learning rate", gt=0)
    warmup_steps: int = option(50, "linear lr warm-up steps", min=0)
    decay_start: float = option(0.8, "fraction of training after which lr decays linearly to 0", gt=0, max=1)
    normalize_input: bool = option(True, "scale activations to E||x||^2 = d while training (folded back on save)")
    eval_every: int = option(100, "steps between evaluations on held-out activations", min=1)
    checkpoint_every: int = option(250, "steps between checkpoints", min=1)
    seed: int = option(0, "random seed", min=0)
    device: str = option("auto", "training device: auto (CUDA when available), cpu, cuda or cuda:N")
    autocast: str = option("none", "bf16: compute the loss in bfloat16 autocast (CPU and CUDA; weights stay fp32)",
                           choices=("none", "bf16"))
    prefetch: int = option(2, "batches read ahead by a background thread (0: read in the training loop)", min=0)
    compile: bool = option(False, "torch.compile the loss (pays off in long runs; compiling takes about a minute on CPU)")
    follow: bool = option(False, "train while `conca harvest` is still writing the store: wait for each shard as it "
                                 "is needed, reading the first epoch in shard order")
    progress: bool = option(True, "show progress bars")

    def dictionary_config(self, d: int, d_out: int | None = None) -> dict:
        """The method's config: widths, the shared options it has (k, AuxK, ...) and --dict-options."""
        fields_of_method = {f.name for f in dataclass_fields(get_method(self.method).Config)}
        config = {"d_in": d, "n_latents": self.expansion * d if self.n_latents is None else self.n_latents}
        if d_out is not None:  # transcoder, even when both sites have the same width
            config["d_out"] = d_out
        for key in ("k", "aux_k", "aux_coeff", "dead_after_tokens"):
            if key in fields_of_method:
                config[key] = getattr(self, key)
        config.update(parse_key_values(self.dict_options))
        return config

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                           decay_start=self.decay_start, normalize_input=self.normalize_input,
                           eval_every=self.eval_every, checkpoint_every=self.checkpoint_every, seed=self.seed,
                           progress=self.progress, device=self.device,
                           autocast=self.autocast, prefetch=self.prefetch, compile=self.compile)


def run_train(opts: TrainOptions, eval_x: torch.Tensor | None = None, name: str = "dictionary") -> tuple[TrainResult, dict]:
    """Train one dictionary; write OUT/<name>/ (weights), OUT/config.yaml and OUT/metrics.json."""
    if not opts.activations or not opts.out:
        raise ConfigError("train needs --activations (store or .npy) and --out DIR")
    resolve_device(opts.device)  # a bad --device fails before any data is read
    source = open_source(opts.activations, site=opts.site, follow=opts.follow)
    target_source = open_source(opts.activations, site=opts.target_site, follow=opts.follow) if opts.target_site else None
    d_out = target_source.d if target_source is not None else None
    torch.manual_seed(opts.seed)  # the same --seed gives the same initial dictionary
    dictionary = create(opts.method, **opts.dictionary_config(source.d, d_out))
    out = Path(opts.out)

    def write_config() -> None:  # once the trainer has checked the data and any checkpoint there
        out.mkdir(parents=True, exist_ok=True)
        save_effective_config(opts, out)

    # A .npy records no site: the one given with --site is what the dictionary will remember.
    result = train({name: dictionary}, source, opts.train_config(), out_dir=out, eval_x=eval_x,
                   target_source=target_source, provenance={"site": opts.site, "target_site": opts.target_site},
                   on_start=write_config)
    if not distributed.is_main_process():  # under torchrun, rank 0 reports for everyone
        return result, {"tokens_per_s": result.tokens_per_s, "fvu": None}
    # Fidelity on the training matrix itself (what the user gave us), in raw units.
    x = read_rows(source, 65536)
    target = read_rows(target_source, 65536) if target_source is not None else None
    train_metrics = evaluate_batch(dictionary, x, target)
    metrics = {"method": opts.method, "source": source.description, "tokens_per_s": result.tokens_per_s,
               "fvu": train_metrics["fvu"], "train_metrics": train_metrics, "resumed_from_step": result.resumed_from_step,
               "history": result.histories[name]}
    atomic_write_json(out / "metrics.json", metrics)
    return result, metrics


# --- evaluate ----------------------------------------------------------------------------
@dataclass
class EvaluateOptions:
    dictionary: str = option("", "directory of a saved dictionary (required)")
    out: str = option("", "output directory for metrics.json (default: the dictionary's directory)", path="out_dir")
    site: str | None = option(None, "site the dictionary reads and is spliced into (default: the one it was trained "
                                    "on, recorded in its config.json; 'final' for a dictionary that records none)")
    model: str | None = option(None, "model to splice into, as for harvest (default: the one the dictionary was "
                                     "trained on; 'smollm2' for a dictionary that records none)")
    target_site: str | None = option(None, "transcoders: the site they reconstruct (default: the recorded one)")
    text: str = option("pydoc", "text to evaluate on (its held-out split by default)")
    text_field: str = option("text", "field/column holding the text in .jsonl/.parquet")
    split: str = option("heldout", "which part of the text: heldout, train or all", choices=SPLITS)
    heldout_fraction: float = option(0.1, "fraction of documents held out (must match harvest)", gt=0, lt=1)
    tokens: int = option(4096, "evaluation tokens", min=1)
    ctx_len: int = option(128, "tokens per context", min=2)
    batch_size: int = option(8, "contexts per forward pass", min=1)
    downstream: bool = option(True, "splice into the model for CE-loss recovered and KL")
    allow_download: bool = option(False, "download a hub model or hf: dataset when not in the local cache (off: offline, no network request)")


def resolve_evaluate_options(opts: EvaluateOptions) -> EvaluateOptions:
    """`opts` with model, site and target site filled from the dictionary's record (or checked
    against it): fails on a mismatch without loading the model. Notes on fallbacks go to stderr."""
    if not opts.dictionary:
        raise ConfigError("evaluate needs --dictionary DIR")
    recorded = read_recorded(opts.dictionary)
    target = resolve_target(recorded, opts.site, opts.model, opts.target_site)
    if recorded.d_out is not None and target.target_site is None:
        raise ConfigError(f"dictionary {opts.dictionary} is a transcoder that records no target site: give --target-site")
    for note in target.notes:
        print(f"conca evaluate: note: {note}", file=sys.stderr)
    return replace(opts, site=target.site, model=target.model, target_site=target.target_site)


def run_evaluate(opts: EvaluateOptions, loaded: LoadedModel | None = None) -> dict:
    opts = resolve_evaluate_options(opts)
    dictionary = load_dictionary(opts.dictionary)
    if loaded is None:
        check_text(opts.text, opts.text_field, opts.allow_download)
    loaded = loaded or load_model(opts.model, allow_download=opts.allow_download)
    check_model_width(read_recorded(opts.dictionary), loaded.d_model, loaded.name)
    check_context_length(loaded, opts.ctx_len)
    contexts = contexts_for(loaded.tokenizer, opts.text, opts.split, opts.tokens, opts.ctx_len,
                            opts.heldout_fraction, opts.text_field, opts.allow_download)
    metrics, _ = evaluate_dictionary(loaded, dictionary, opts.site, contexts, opts.batch_size, opts.downstream,
                                     target_site=opts.target_site)
    out = Path(opts.out or opts.dictionary)
    out.mkdir(parents=True, exist_ok=True)
    save_effective_config(opts, out, name="evaluate_config.yaml")
    atomic_write_json(out / "metrics.json" if opts.out else out / "eval_metrics.json",
                      {"site": opts.site, "target_site": opts.target_site, "model": loaded.name, "metrics": metrics})
    return metrics


__all__ = ["HarvestOptions", "TrainOptions", "EvaluateOptions", "run_harvest", "run_train", "run_evaluate",
           "resolve_evaluate_options"]
