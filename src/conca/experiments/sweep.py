"""`conca sweep`: the SAE family over a small sparsity grid, trained side by side on the very
same batches of one site's activations, evaluated on held-out text, and drawn as
sparsity-fidelity frontiers (L0 vs explained variance and vs CE-loss recovered)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from conca.activations.stream import open_source
from conca.config import parse_key_values, save_effective_config
from conca.dictionaries.base import Dictionary, create, get_method, methods, registered
from conca.errors import ConfigError
from conca.evaluation.downstream import downstream_metrics_many
from conca.experiments.options import SweepOptions  # noqa: F401  (declared there: no torch)
from conca.experiments.pipeline import HarvestOptions, run_harvest
from conca.fileio import atomic_write_json
from conca.models.capture import site_activations
from conca.models.load import load_model
from conca.report.sweep import write_report
from conca.text.splits import check_text, contexts_for
from conca.training.trainer import TrainConfig, evaluate_batch, train



def parse_grid(text: str) -> dict[str, tuple[str, list]]:
    grid = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        method, _, rest = item.partition(":")
        knob, _, values = rest.partition("=")
        if not knob or not values:
            raise ConfigError(f"bad grid entry {item!r}: expected METHOD:KNOB=V1|V2")
        grid[method.strip()] = (knob.strip(), [parse_key_values(f"v={v}")["v"] for v in values.split("|")])
    return grid


def default_grid() -> dict[str, tuple[str, list]]:
    """Each registered method's declared sparsity knob and values (Dictionary.sparsity_grid), in sweep order.
    Relative grids are multiples of the method's default (defaults suit inputs scaled to E||x||^2 = d)."""
    declared = sorted((cls for cls in registered() if cls.sparsity_grid is not None), key=lambda c: c.sparsity_grid.order)
    return {cls.name: (cls.sparsity_grid.knob, list(cls.sparsity_grid.values)) for cls in declared}


def sae_family() -> list[str]:
    """The methods `--methods sae` (the default) sweeps."""
    return [name for name in default_grid() if get_method(name).sparsity_grid.default_sweep]


def swept_methods(opts: SweepOptions) -> dict[str, tuple[str, list]]:
    """Each method to sweep -> (its knob, the values), checked: cheap, so it runs before the model loads."""
    grid = {**default_grid(), **parse_grid(opts.grid)}
    if opts.methods in ("all", "sae"):
        family = sae_family()
        chosen = [m for m in grid if m in methods() and (opts.methods == "all" or m in family)]
    else:
        chosen = [m.strip() for m in opts.methods.split(",")]
    for method in chosen:
        get_method(method)
        if method not in grid:
            raise ConfigError(f"no sweep grid for method {method!r}: give one with --grid '{method}:KNOB=V1|V2'")
    return {method: grid[method] for method in chosen}


def build_family(opts: SweepOptions, d: int) -> dict[str, Dictionary]:
    family = {}
    for method, (knob, values) in swept_methods(opts).items():
        cls = get_method(method)
        defaults = cls.Config(d_in=d, n_latents=opts.expansion * d)
        if not hasattr(defaults, knob):
            raise ConfigError(f"method {method} has no option {knob!r}")
        declared = cls.sparsity_grid
        relative = declared is not None and declared.relative and knob == declared.knob
        # steps: a warm-up longer than the sweep would hide the penalty (config_for caps it).
        config = cls.config_for(d, opts.expansion * d, steps=opts.steps)
        for value in values:
            setting = value * getattr(defaults, knob) if relative else value
            family[f"{method}@{knob}={setting:g}"] = create(method, **{**config, knob: setting})
    if not family:
        raise ConfigError("nothing to sweep")
    return family


def run_sweep(opts: SweepOptions, log=print) -> dict:
    out = Path(opts.out)
    t0 = time.perf_counter()
    if opts.activations:  # a given store is checked before the model loads
        open_source(opts.activations, site=opts.site)
    check_text(opts.text, allow_download=opts.allow_download)
    swept_methods(opts)
    loaded = load_model(opts.model, allow_download=opts.allow_download)
    out.mkdir(parents=True, exist_ok=True)  # once the inputs are known to be good
    save_effective_config(opts, out)
    store = opts.activations or str(out / "activations")
    if not opts.activations:
        log(f"[conca sweep] harvesting {opts.train_tokens} tokens at {opts.site} ...")
        run_harvest(HarvestOptions(out=store, model=opts.model, text=opts.text, sites=opts.site, tokens=opts.train_tokens,
                                   ctx_len=opts.ctx_len, progress=opts.progress,
                                   allow_download=opts.allow_download), loaded=loaded)
    source = open_source(store, site=opts.site)
    torch.manual_seed(opts.seed)
    family = build_family(opts, source.d)
    log(f"[conca sweep] training {len(family)} dictionaries on the same batches: {', '.join(family)}")
    cfg = TrainConfig(steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed, progress=opts.progress,
                      eval_every=max(1, opts.steps // 10))
    result = train(family, source, cfg, out_dir=out / "dictionaries")
    log("[conca sweep] evaluating on held-out text ...")
    heldout = contexts_for(loaded.tokenizer, opts.text, "heldout", opts.eval_tokens, opts.ctx_len,
                           allow_download=opts.allow_download)
    x = site_activations(loaded, heldout, opts.site)
    downstream = downstream_metrics_many(loaded.model, family, opts.site, heldout)
    points = []
    for name, dictionary in family.items():
        metrics = {**evaluate_batch(dictionary, x), **downstream[name]}
        points.append({"name": name, "method": name.split("@")[0], **metrics})
    summary = {"model": loaded.name, "site": opts.site, "tokens_per_s_all": result.tokens_per_s,
               "heldout_tokens": heldout.n_tokens, "points": points, "config": asdict(opts),
               "elapsed_s": time.perf_counter() - t0}
    atomic_write_json(out / "results.json", summary)
    write_report(out / "report.html", summary, result.histories, opts)
    log(f"[conca sweep] done in {summary['elapsed_s']:.0f}s: {out / 'report.html'}")
    return summary
