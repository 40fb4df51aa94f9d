"""`conca inspect`: a browsable atlas of a dictionary's latents.

One streaming pass of activations (a harvested store, or the model run over held-out text)
through the dictionary keeps, per latent, its top contexts, a uniform sample of its firing
tokens and its firing count; then every latent gets a card (top and quantile contexts, an
activation histogram, the vocabulary projection of its decoder direction, an intervention-based
description, its matched supervised concept and its stability across seeds) and the cards are
written as a static site, OUT/index.html, that opens from file:// with no network.

Everything is checked before the model loads or anything is written: a dictionary whose width
differs from the store, a store from another model, a store without token positions (format 1),
an empty store, a latent out of range."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from conca.activations.store import ActivationStore
from conca.atlas.build import AtlasSettings, build_atlas, parse_latents
from conca.config import save_effective_config
from conca.dictionaries.base import load_dictionary
from conca.dictionaries.provenance import check_model_width, read_recorded, resolve_target, same_model
from conca.errors import ConfigError, InputError, ShapeError
from conca.experiments.options import InspectOptions
from conca.fileio import atomic_write_json
from conca.models.load import LoadedModel, check_context_length, load_model

DEFAULT_TEXT = "pydoc"
from conca.text.splits import check_text, contexts_for


def resolve_inspect_options(opts: InspectOptions) -> tuple[InspectOptions, ActivationStore | None]:
    """`opts` with the site and model filled in (from the store and the dictionary's record) and
    the store opened and checked; every mismatch fails here, before any weights are read."""
    if not opts.dictionary:
        raise ConfigError("inspect needs --dictionary DIR")
    if opts.activations and opts.text:
        raise ConfigError("give --activations (a store) or --text (run the model over it), not both")
    if not opts.activations:
        opts = replace(opts, text=opts.text or DEFAULT_TEXT)
    recorded = read_recorded(opts.dictionary)
    store = None
    model = opts.model
    if opts.activations:
        store = ActivationStore.open(Path(opts.activations))
        if store.n_tokens == 0:
            raise InputError(f"store {store.path} holds no tokens: nothing to inspect (is its harvest still running?)")
        if model is not None and not same_model(store.manifest.model, store.manifest.model_digest, model):
            raise ConfigError(f"store {store.path} was harvested from model {store.manifest.model}; --model {model} is "
                              "another model (omit --model to use the store's)")
        if recorded.model is not None and not same_model(recorded.model, recorded.model_sha256 or "",
                                                         store.manifest.model):
            raise ConfigError(f"dictionary {opts.dictionary} was trained on {recorded.origin}, but store {store.path} "
                              f"was harvested from model {store.manifest.model}")
        model = model or store.manifest.model
    target = resolve_target(recorded, opts.site, model)
    for note in target.notes:
        print(f"conca inspect: note: {note}", file=sys.stderr)
    if store is not None:
        store.check_site(target.site)
        if store.manifest.d_model != recorded.d_in:
            raise ShapeError(f"dictionary {opts.dictionary} reads width {recorded.d_in}, but store {store.path} holds "
                             f"width {store.manifest.d_model}")
        store.require_positions("inspect")
    return replace(opts, site=target.site, model=target.model), store


def run_inspect(opts: InspectOptions, loaded: LoadedModel | None = None, log=print) -> dict:
    t0 = time.perf_counter()
    opts, store = resolve_inspect_options(opts)
    recorded = read_recorded(opts.dictionary)
    dictionary = load_dictionary(opts.dictionary)
    latents = parse_latents(opts.latents, dictionary.config.n_latents)
    concepts_file = _concepts_file(opts.concepts, opts.site) if opts.concepts else None
    compare = [load_dictionary(path) for path in _paths(opts.compare)] or None
    for path, other in zip(_paths(opts.compare), compare or []):
        if other.config.d_in != dictionary.config.d_in:
            raise ShapeError(f"--compare {path} reads width {other.config.d_in}, the dictionary width "
                             f"{dictionary.config.d_in}: compare the same method trained on the same site")
    if store is None:
        check_text(opts.text, opts.text_field, opts.allow_download)
    loaded = loaded or load_model(opts.model, allow_download=opts.allow_download)
    check_model_width(recorded, loaded.d_model, loaded.name)
    if store is None:
        check_context_length(loaded, opts.ctx_len)
        contexts = contexts_for(loaded.tokenizer, opts.text, "heldout", opts.tokens, opts.ctx_len,
                                opts.heldout_fraction, opts.text_field, opts.allow_download)
        source_label = f"{contexts.n_tokens:,} held-out tokens of {opts.text}"
    else:
        contexts = None
        source_label = f"store {store.path} ({store.n_tokens:,} tokens)"
    settings = AtlasSettings(top=opts.top, quantile_groups=opts.quantile_groups, per_group=opts.per_group,
                             window=opts.window, sample=opts.sample, describe=opts.describe,
                             describe_tokens=opts.describe_tokens, clamp=opts.clamp, highlights=opts.highlights,
                             batch_size=opts.batch_size, seed=opts.seed, progress=opts.progress)
    summary = build_atlas(Path(opts.out), dictionary, loaded, opts.site, store=store, contexts=contexts,
                          out_site=recorded.target_site, latents=latents, concepts=concepts_file, compare=compare,
                          compare_label=opts.compare, source_label=source_label, dictionary_label=opts.dictionary,
                          settings=settings, log=lambda m: log(f"[conca inspect] {m}"))
    summary["elapsed_s"] = time.perf_counter() - t0
    summary["config"] = asdict(opts)
    save_effective_config(opts, Path(opts.out))
    atomic_write_json(Path(opts.out) / "results.json", summary)
    log(f"[conca inspect] wrote {Path(opts.out) / 'index.html'} ({summary['n_cards']} cards) in {summary['elapsed_s']:.0f}s")
    return summary


def _paths(spec: str) -> list[str]:
    return [part.strip() for part in (spec or "").split(",") if part.strip()]


def _concepts_file(path: str, site: str) -> Path:
    """The `conca concepts` results.json named by `path` (a file or its folder), checked to be about `site`."""
    file = Path(path)
    file = file / "results.json" if file.is_dir() else file
    if not file.is_file():
        raise InputError(f"--concepts {path}: no such file (give a `conca concepts` results.json or its folder)")
    try:
        recorded_site = json.loads(file.read_text(encoding="utf-8")).get("site")
    except (ValueError, AttributeError) as exc:
        raise InputError(f"--concepts {file} is not a `conca concepts` results.json ({exc})") from None
    if recorded_site is not None and str(recorded_site) != str(site):
        raise ConfigError(f"--concepts {file} scores site {recorded_site}, but the dictionary reads {site}")
    return file


__all__ = ["InspectOptions", "run_inspect", "resolve_inspect_options"]
