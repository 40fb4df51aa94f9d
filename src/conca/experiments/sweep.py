"""`conca sweep`: the SAE family over a small sparsity grid, trained side by side on the very
same batches of one site's activations, evaluated on held-out text, and drawn as
sparsity-fidelity frontiers (L0 vs explained variance and vs CE-loss recovered)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from conca.activations.store import atomic_write_json
from conca.activations.stream import open_source
from conca.config import save_effective_config
from conca.dictionaries.base import Dictionary, create, get_method, methods
from conca.errors import ConfigError
from conca.evaluation.downstream import downstream_metrics_many
from conca.experiments.options import SweepOptions  # noqa: F401  (declared there: no torch)
from conca.experiments.pipeline import (HarvestOptions, check_text, contexts_for, parse_key_values, run_harvest,
                                       site_activations)
from conca.models.load import load_model
from conca.report import plots
from conca.report.html import Report
from conca.training.trainer import TrainConfig, evaluate_batch, train

# One knob per method that moves it along the sparsity axis, and the values tried.
# Coefficients are multiples of the method's own default (the defaults suit inputs scaled to E||x||^2 = d).
GRID: dict[str, tuple[str, list]] = {
    "topk": ("k", [16, 32, 64]),
    "batchtopk": ("k", [16, 32, 64]),
    "matryoshka": ("k", [32, 64]),
    # Defaults come from papers' longer runs; on a short sweep at the final site they leave
    # hundreds of latents active (measured: relu_l1 at 3x its default still had L0 ~ 370 of 1152),
    # so the grid reaches up to 100x.
    "jumprelu": ("l0_coeff", [1.0, 10.0, 100.0]),
    "relu_l1": ("l1_coeff", [1.0, 10.0, 100.0]),
    "gated": ("l1_coeff", [1.0, 10.0, 100.0]),
    "p_anneal": ("l1_coeff", [1.0, 10.0, 100.0]),
    "structured": ("sparsity_coeff", [1.0, 10.0, 100.0]),
}
# ConCA's penalty acts on g(z_hat) of normalised latents, so it moves reconstruction rather than L0
# (every latent stays nonzero); its grid is there for `--methods conca_...`, not in the default sweep.
SAE_FAMILY = tuple(GRID)
GRID.update({name: ("alpha", [1.0, 100.0, 1000.0]) for name in
             ["conca"] + [f"conca_{n}_{g}" for n in ("layernorm", "dropout", "batchnorm", "groupnorm")
                          for g in ("selu", "softplus", "elu")]})
# Without labels an AlignSAE is its unsupervised stage (L1 on the free bank); for `--methods align` only.
GRID["align"] = ("sparse_coeff", [1e-3, 1e-1, 1.0])
MULTIPLIER_KNOBS = {"l0_coeff", "l1_coeff", "sparsity_coeff", "alpha"}
HEADLINE = ("l0", "explained_variance", "ce_loss_recovered", "kl_div", "mse_sum", "dead_fraction", "dense_fraction")


def parse_grid(text: str) -> dict[str, tuple[str, list]]:
    grid = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        method, _, rest = item.partition(":")
        knob, _, values = rest.partition("=")
        if not knob or not values:
            raise ConfigError(f"bad grid entry {item!r}: expected METHOD:KNOB=V1|V2")
        grid[method.strip()] = (knob.strip(), [parse_key_values(f"v={v}")["v"] for v in values.split("|")])
    return grid


def swept_methods(opts: SweepOptions) -> dict[str, tuple[str, list]]:
    """Each method to sweep -> (its knob, the values), checked: cheap, so it runs before the model loads."""
    grid = {**GRID, **parse_grid(opts.grid)}
    if opts.methods in ("all", "sae"):
        chosen = [m for m in grid if m in methods() and (opts.methods == "all" or m in SAE_FAMILY)]
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
        for value in values:
            setting = value * getattr(defaults, knob) if knob in MULTIPLIER_KNOBS else value
            extra = {}
            if hasattr(defaults, "sparsity_warmup_steps"):  # a warm-up longer than the sweep would hide the penalty
                extra["sparsity_warmup_steps"] = min(defaults.sparsity_warmup_steps, opts.steps // 5)
            family[f"{method}@{knob}={setting:g}"] = create(method, d_in=d, n_latents=opts.expansion * d,
                                                            **{knob: setting}, **extra)
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


def write_report(path: Path, summary: dict, histories: dict, opts: SweepOptions) -> Path:
    report = Report("conca sweep", subtitle=f"SAE family at site {summary['site']} of {Path(summary['model']).name}")
    report.paragraph(
        f"Every dictionary has {opts.expansion}x latents and was trained for {opts.steps} steps of {opts.batch_size} "
        "tokens on the very same batches (one activation stream, one optimiser per dictionary), then evaluated on "
        f"{summary['heldout_tokens']} held-out tokens. Up and to the left is better: more fidelity for fewer active latents."
    )
    for y, caption in (("explained_variance", "Sparsity vs reconstruction: L0 against explained variance (about the mean)."),
                       ("ce_loss_recovered", "Sparsity vs downstream fidelity: L0 against CE-loss recovered (vs zero-ablation).")):
        figure = plots.frontier(summary["points"], x="l0", y=y, group="method")
        figure.axes[0].set_xscale("log")  # L0 spans orders of magnitude across methods
        report.figure(figure, caption=caption + " Log-scaled L0.")
    report.heading("All points")
    report.table([{"dictionary": p["name"], **{k: p.get(k) for k in HEADLINE}} for p in summary["points"]],
                 columns=["dictionary", *HEADLINE])
    report.heading("Training curves")
    report.figure(plots.training_curves(histories, keys=["fvu", "l0"]))
    report.heading("Configuration")
    report.code(yaml.safe_dump(asdict(opts), sort_keys=False))
    return report.write(path)
