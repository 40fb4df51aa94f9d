"""The three basic jobs -- harvest, train, evaluate -- as options dataclasses and functions.

The CLI and the demo are thin layers over these; each job writes its effective config and a
metrics.json beside its outputs."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from conca.activations.harvest import harvest
from conca.activations.outliers import check_ratio
from conca.activations.store import ActivationStore
from conca.activations.stream import open_source, read_rows
from conca.config import parse_key_values, save_effective_config
from conca.dictionaries.base import create, get_method, load_dictionary
from conca.dictionaries.provenance import check_model_width, read_recorded, resolve_target
from conca.errors import ConfigError
from conca.evaluation.dictionary import evaluate_dictionary
from conca.evaluation.sparse_probing import brief_summary
from conca.evaluation.task_probing import probe_tasks
from conca.evaluation.tasks import load_tasks, parse_task_list

METRIC_TASKS = ("scr_tpp", "absorption")
# The options are declared in a light module (no torch), so the parser is built without loading torch.
from conca.experiments.options import SPLITS, EvaluateOptions, HarvestOptions, TrainFields  # noqa: F401
from conca.fileio import atomic_write_json
from conca.models.load import LoadedModel, check_context_length, load_model, load_tokenizer
from conca.models.sites import parse_sites
from conca.runtime import distributed
from conca.runtime.device import resolve_device
from conca.text.batching import Contexts
from conca.text.splits import check_text, contexts_for
from conca.training.trainer import TrainConfig, TrainResult, evaluate_batch, train


def run_harvest(opts: HarvestOptions, loaded: LoadedModel | None = None) -> ActivationStore:
    if not opts.out:
        raise ConfigError("harvest needs --out DIR")
    # Under torchrun each rank runs its own copy of the model on its own GPU (or on the CPU).
    device = distributed.local_device(resolve_device(opts.device))
    parse_sites(opts.sites)  # the names; the layers are checked against the model when it is loaded
    check_ratio(opts.max_norm_ratio)
    if loaded is None:  # cheap checks of the inputs before the model loads
        check_text(opts.text, opts.text_field, opts.allow_download)
    if loaded is None:
        loaded, contexts = _load_while_tokenizing(opts, device)
    else:
        contexts = contexts_for(loaded.tokenizer, opts.text, opts.split, opts.tokens, opts.ctx_len,
                                opts.heldout_fraction, opts.text_field, opts.allow_download)
    check_context_length(loaded, opts.ctx_len)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    save_effective_config(opts, out)
    extra = {"text": opts.text, "split": opts.split, "heldout_fraction": opts.heldout_fraction}
    return harvest(loaded, contexts, opts.sites, out, dtype=opts.dtype, batch_size=opts.batch_size,
                   shard_contexts=opts.shard_contexts, extra=extra, progress=opts.progress,
                   forward_dtype=opts.forward_dtype, max_norm_ratio=opts.max_norm_ratio, compile=opts.compile)


def _load_while_tokenizing(opts: HarvestOptions, device) -> tuple[LoadedModel, Contexts]:
    """Load the model's weights on this thread while another reads and tokenizes the text: reading
    a corpus (building the docstrings one takes ~40 s the first time) and tokenizing it overlap the
    weights' de-quantisation, which leaves the second core idle."""
    tokenizer = load_tokenizer(opts.model, allow_download=opts.allow_download)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="conca-tokenize") as pool:
        pending = pool.submit(contexts_for, tokenizer, opts.text, opts.split, opts.tokens, opts.ctx_len,
                              opts.heldout_fraction, opts.text_field, opts.allow_download)
        try:
            loaded = load_model(opts.model, device=device, allow_download=opts.allow_download, tokenizer=tokenizer)
        except BaseException:
            pending.cancel()
            raise
        check_context_length(loaded, opts.ctx_len)  # a bad --ctx-len is the first thing to report
        return loaded, pending.result()


# --- train -------------------------------------------------------------------------------
@dataclass
class TrainOptions(TrainFields):
    """`conca train`'s options (the fields: TrainFields in conca.experiments.options) and how they map
    to a dictionary config and a trainer config."""

    def dictionary_config(self, d: int, d_out: int | None = None) -> dict:
        """The method's config: its mapping of the shared settings (widths, --k as the target L0, the
        AuxK options where it has them; Dictionary.config_for), then --dict-options on top."""
        n_latents = self.expansion * d if self.n_latents is None else self.n_latents
        config = get_method(self.method).config_for(d, n_latents, d_out=d_out, target_l0=self.k, aux_k=self.aux_k,
                                                     aux_coeff=self.aux_coeff, dead_after_tokens=self.dead_after_tokens)
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
    names = parse_task_list(opts.tasks)
    metric_tasks = [n for n in names if n in METRIC_TASKS]  # SCR/TPP and absorption bring their own data
    # An unknown name or a malformed file fails before the model loads.
    tasks = load_tasks(",".join(n for n in names if n not in METRIC_TASKS))
    if loaded is None:
        check_text(opts.text, opts.text_field, opts.allow_download)
    loaded = loaded or load_model(opts.model, allow_download=opts.allow_download)
    check_model_width(read_recorded(opts.dictionary), loaded.d_model, loaded.name)
    check_context_length(loaded, opts.ctx_len)
    contexts = contexts_for(loaded.tokenizer, opts.text, opts.split, opts.tokens, opts.ctx_len,
                            opts.heldout_fraction, opts.text_field, opts.allow_download)
    metrics, _ = evaluate_dictionary(loaded, dictionary, opts.site, contexts, opts.batch_size, opts.downstream,
                                     target_site=opts.target_site)
    payload = {"site": opts.site, "target_site": opts.target_site, "model": loaded.name, "metrics": metrics}
    probing = None
    if tasks:  # SAEBench's k-sparse probing: a summary here, its own results layout in sparse_probing.json
        payload["tasks"], probing = probe_tasks(loaded, dictionary, opts.site, tasks, opts.ctx_len, opts.batch_size,
                                                dictionary_path=opts.dictionary)
    if "scr_tpp" in metric_tasks:
        from conca.evaluation.scr_data import scr_tpp_on_model

        payload["scr_tpp"] = scr_tpp_on_model(loaded, opts.site, {"dictionary": dictionary})["dictionary"]
    if "absorption" in metric_tasks:
        from conca.evaluation.absorption_data import absorption_on_model

        payload["absorption"] = absorption_on_model(loaded, opts.site, {"dictionary": dictionary})["dictionary"]
    out = Path(opts.out or opts.dictionary)
    out.mkdir(parents=True, exist_ok=True)
    save_effective_config(opts, out, name="evaluate_config.yaml")
    if probing is not None:
        atomic_write_json(out / "sparse_probing.json", probing)
    if metric_tasks:  # SCR/TPP and absorption also in SAEBench's layout: scr.json, tpp.json, absorption_first_letter.json
        from conca import __version__
        from conca.evaluation.saebench_json import metric_task_files

        for name, content in metric_task_files(payload, model=loaded.name, site=str(opts.site), dictionary=dictionary,
                                               dictionary_path=opts.dictionary, conca_version=__version__).items():
            atomic_write_json(out / name, content)
    atomic_write_json(out / "metrics.json" if opts.out else out / "eval_metrics.json", payload)
    extra = {key: payload[key] for key in ("scr_tpp", "absorption") if key in payload}
    return {**metrics, "tasks": brief_summary(payload["tasks"]), **extra} if tasks else {**metrics, **extra}


__all__ = ["HarvestOptions", "TrainOptions", "EvaluateOptions", "run_harvest", "run_train", "run_evaluate",
           "resolve_evaluate_options"]
