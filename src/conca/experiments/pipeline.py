"""The three basic jobs -- harvest, train, evaluate -- as options dataclasses and functions.

The CLI and the demo are thin layers over these; each job writes its effective config and a
metrics.json beside its outputs."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch

from conca.activations.harvest import harvest
from conca.activations.store import ActivationStore, atomic_write_json
from conca.activations.stream import open_source, read_rows
from conca.config import save_effective_config
from conca.dictionaries.base import Dictionary, create, get_method, load_dictionary
from conca.dictionaries.provenance import check_model_width, read_recorded, resolve_target
from conca.errors import ConfigError, InputError
from conca.evaluation.downstream import downstream_metrics
from conca.evaluation.reconstruction import ReconstructionStats
# The options are declared in a light module (no torch), so the parser is built without loading torch.
from conca.experiments.options import SPLITS, EvaluateOptions, HarvestOptions, TrainFields  # noqa: F401
from conca.models.load import LoadedModel, load_model
from conca.models.sites import Site, parse_sites, run_to_sites
from conca.text.batching import Contexts, tokenize_contexts
from conca.text.corpus import DEFAULT_CORPUS, load_documents
from conca.training import distributed
from conca.training.trainer import TrainConfig, TrainResult, evaluate_batch, resolve_device, train


def parse_key_values(text: str) -> dict:
    """'a=1,b=x,c=[1,2]' -> {'a': 1, 'b': 'x', 'c': [1, 2]} (values parsed as YAML scalars/lists)."""
    import yaml

    out: dict = {}
    for item in _split_top_level(text):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad option {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "not a valid value"
            raise ConfigError(f"bad option {item.strip()!r}: {problem}") from None
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets, so list values survive."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


# --- text ------------------------------------------------------------------------------
def split_documents(documents: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic, interleaved split: a document is held out when that brings the held-out share
    of characters closer to `heldout_fraction`, so documents of very unequal length still give
    about that fraction of the text.

    Splitting documents (not contexts) keeps held-out text unseen whatever the token budget."""
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    train_docs, heldout = [], []
    held_chars = total_chars = 0
    for doc in documents:
        total_chars += len(doc)
        target = heldout_fraction * total_chars
        if abs(held_chars + len(doc) - target) < abs(held_chars - target):
            heldout.append(doc)
            held_chars += len(doc)
        else:
            train_docs.append(doc)
    if not heldout or not train_docs:
        raise InputError(f"text has {len(documents)} documents: too few to hold out a {heldout_fraction:.0%} share")
    return train_docs, heldout


def contexts_for(tokenizer, text: str | None, split: str, tokens: int, ctx_len: int,
                 heldout_fraction: float = 0.1, text_field: str = "text", allow_download: bool = False) -> Contexts:
    """About `tokens` masked-in tokens of the `split` ("train" / "heldout" / "all") part of `text`."""
    documents = load_documents(text, text_field=text_field, allow_download=allow_download)
    if split != "all":
        train_docs, heldout = split_documents(documents, heldout_fraction)
        documents = {"train": train_docs, "heldout": heldout}.get(split)
        if documents is None:
            raise ConfigError(f"unknown split {split!r}: use train, heldout or all")
    return tokenize_contexts(documents, tokenizer, ctx_len=ctx_len, max_contexts=max(1, math.ceil(tokens / (ctx_len - 1))))


def check_text(text: str | None, text_field: str = "text", allow_download: bool = False) -> None:
    """Read a local --text file once before the model loads, so that a missing, empty or unreadable
    file is refused first (the built-in corpus and hf: datasets are read when they are used)."""
    if text and text != DEFAULT_CORPUS and not text.startswith("hf:"):
        load_documents(text, text_field=text_field, allow_download=allow_download)


def check_context_length(loaded: LoadedModel, ctx_len: int) -> None:
    """Refuse contexts longer than the model has positions for, before the first forward pass."""
    config = loaded.model.config
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions", "n_ctx")]
    limit = next((v for v in limits if isinstance(v, int) and v > 0), None)
    if limit is not None and ctx_len > limit:
        raise ConfigError(f"--ctx-len {ctx_len} is longer than the context of {loaded.name} ({limit} positions)")


# --- harvest -----------------------------------------------------------------------------
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
class TrainOptions(TrainFields):
    """`conca train`'s options (the fields: TrainFields in conca.experiments.options) and how they map
    to a dictionary config and a trainer config."""

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
@torch.inference_mode()
def site_activations(loaded: LoadedModel, contexts: Contexts, site: "Site | str", batch_size: int = 8) -> torch.Tensor:
    """Masked-in activations at one site, in memory (for evaluation-sized text)."""
    site = Site.parse(site)
    out = []
    for b in range(0, len(contexts), batch_size):
        acts = run_to_sites(loaded.model, contexts.ids[b:b + batch_size], [site])[site]
        out.append(acts[contexts.mask[b:b + batch_size]].float())
    return torch.cat(out)


def evaluate_dictionary(loaded: LoadedModel, dictionary: Dictionary, site: "Site | str", contexts: Contexts,
                        batch_size: int = 8, downstream: bool = True,
                        target_site: "Site | str | None" = None) -> tuple[dict, torch.Tensor]:
    """Reconstruction and sparsity metrics on `contexts` (plus downstream ones); and firing frequencies.

    A transcoder (with `target_site`) is measured against the target site's activations; splicing
    it into the model is not measured (no downstream metrics)."""
    x = site_activations(loaded, contexts, site, batch_size)
    dictionary.check_input(x)
    y = x if target_site is None else site_activations(loaded, contexts, target_site, batch_size)
    stats = ReconstructionStats(dictionary.config.n_latents)
    with torch.no_grad():
        for i in range(0, len(x), 4096):
            z = dictionary.encode(x[i:i + 4096])
            stats.update(y[i:i + 4096], dictionary.decode(z), z)
    metrics = stats.compute()
    if downstream and target_site is None:
        metrics.update(downstream_metrics(loaded.model, dictionary, site, contexts, batch_size=batch_size))
    return metrics, stats.firing_frequency()


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


def read_json(path: "str | Path") -> dict:
    return json.loads(Path(path).read_text())


__all__ = ["HarvestOptions", "TrainOptions", "EvaluateOptions", "run_harvest", "run_train", "run_evaluate",
           "resolve_evaluate_options",
           "evaluate_dictionary", "site_activations", "contexts_for", "split_documents", "asdict"]
