"""`conca demo`: the whole spine on the embedded default model, in a few minutes on a laptop CPU.

Harvest the final site and a middle residual layer from the training part of the default
corpus, train a TopK SAE on each, evaluate on held-out documents (reconstruction, sparsity,
CE-loss recovered, KL with the SAE spliced in) and write report.html + metrics.json.

Rerunning on the same folder redoes nothing that is finished: a complete activation store and a
finished training run are reused (both refuse other settings), and each site's evaluation is
cached in OUT/evaluations/SITE.json under the dictionary's sha256 and the evaluation settings
(see conca.evaluation.cache): reused when all match, recomputed when anything differs."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path


from conca.activations.store import MANIFEST
from conca.atlas.build import AtlasSettings, build_atlas
from conca.config import save_effective_config
from conca.dictionaries.base import load_dictionary
from conca.evaluation import cache as eval_cache
from conca.evaluation.dictionary import evaluate_dictionary
from conca.experiments.options import DemoOptions  # noqa: F401  (declared there: no torch)
from conca.experiments.pipeline import HarvestOptions, TrainOptions, run_harvest, run_train
from conca.fileio import atomic_write_json
from conca.models.load import load_model
from conca.models.sites import parse_sites
from conca.report.demo import HEADLINE, write_report
from conca.text.splits import check_text, contexts_for

EVAL_SPLIT, EVAL_HELDOUT_FRACTION, EVAL_BATCH_SIZE = "heldout", 0.1, 8


def run_demo(opts: DemoOptions, log=print) -> dict:
    out = Path(opts.out)
    t0 = time.perf_counter()
    print_ = log

    def log(message: str) -> None:
        print_(f"[{time.perf_counter() - t0:6.0f}s] {message}")

    check_text(opts.text, allow_download=opts.allow_download)
    parse_sites([s.replace("resid.mid", "resid.0") for s in opts.sites.split(",")])  # names; layers once loaded
    log(f"[conca demo] loading model {opts.model} ...")
    loaded = load_model(opts.model, allow_download=opts.allow_download)
    mid = loaded.n_layers // 2
    site_names = [s.strip().replace("resid.mid", f"resid.{mid}") for s in opts.sites.split(",") if s.strip()]
    sites = [str(s) for s in parse_sites(site_names)]
    out.mkdir(parents=True, exist_ok=True)  # once the model and the sites are known to be good
    save_effective_config(opts, out)
    log(f"[conca demo] {loaded.name}: {loaded.n_layers} layers, d={loaded.d_model}; sites {', '.join(sites)}")

    log(f"[conca demo] {_harvest_plan(out / 'activations', loaded, opts)}")
    if not _complete_old_store(out / "activations", loaded, opts):  # an older conca's complete store trains as it is
        _upgrade_old_store(out / "activations", loaded, opts, log)
        run_harvest(HarvestOptions(out=str(out / "activations"), model=opts.model, text=opts.text,
                                   sites=",".join(sites), tokens=opts.train_tokens, ctx_len=opts.ctx_len,
                                   progress=opts.progress, allow_download=opts.allow_download), loaded=loaded)
    heldout = contexts_for(loaded.tokenizer, opts.text, EVAL_SPLIT, opts.eval_tokens, opts.ctx_len,
                           EVAL_HELDOUT_FRACTION, allow_download=opts.allow_download)

    results, histories, densities = {}, {}, {}
    for site in sites:
        log(f"[conca demo] {_train_plan(out / 'train' / site, site, opts)}")
        train_opts = TrainOptions(activations=str(out / "activations"), out=str(out / "train" / site), site=site,
                                  method="topk", expansion=opts.expansion, k=opts.k, steps=opts.steps,
                                  batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed, progress=opts.progress,
                                  dead_after_tokens=20 * opts.batch_size, eval_every=max(1, opts.steps // 20))
        result, train_metrics = run_train(train_opts, name="topk")
        metrics, freqs = _evaluate(out, loaded, result.dictionaries["topk"], site, heldout, opts, log)
        metrics["train_tokens_per_s"] = train_metrics["tokens_per_s"]
        results[site] = metrics
        histories[site] = result.histories["topk"]
        densities[site] = freqs
        log("[conca demo]   " + ", ".join(f"{k}={metrics[k]:.4g}" for k in
                                          ("explained_variance", "l0", "ce_loss_recovered", "ce_loss_recovered_saelens",
                                           "kl_div", "dead_fraction")))
    atlases = _atlases(out, loaded, sites, opts, log) if opts.atlas else {}
    elapsed = time.perf_counter() - t0
    summary = {"model": loaded.name, "sites": results, "elapsed_s": elapsed,
               "heldout_tokens": heldout.n_tokens, "atlases": atlases, "config": asdict(opts)}
    atomic_write_json(out / "metrics.json", summary)
    write_report(out / "report.html", summary, histories, densities, opts)
    log(f"[conca demo] done in {elapsed:.0f}s: {out / 'report.html'} and {out / 'metrics.json'}")
    return summary


def _atlases(out: Path, loaded, sites: list[str], opts: DemoOptions, log) -> dict:
    """Each site's latent atlas (OUT/atlas/SITE/) read from a store of held-out text harvested for it
    (OUT/atlas_activations, both sites in one forward; reused when complete), and what the report shows
    of it: the link, the highlights, the counts and the time taken."""
    from conca.activations.store import ActivationStore

    store_dir = out / "atlas_activations"
    if (store_dir / MANIFEST).exists() and ActivationStore.open(store_dir).manifest.complete:
        log(f"[conca demo] atlas: reusing the held-out activations in {store_dir}")
    else:
        log(f"[conca demo] atlas: harvesting {opts.atlas_tokens} held-out tokens at {', '.join(sites)} ...")
    run_harvest(HarvestOptions(out=str(store_dir), model=opts.model, text=opts.text, sites=",".join(sites),
                               split=EVAL_SPLIT, heldout_fraction=EVAL_HELDOUT_FRACTION, tokens=opts.atlas_tokens,
                               ctx_len=opts.ctx_len, progress=opts.progress, allow_download=opts.allow_download),
                loaded=loaded)
    store = ActivationStore.open(store_dir)
    settings = AtlasSettings(describe=opts.describe, progress=opts.progress, seed=opts.seed)
    atlases = {}
    for site in sites:
        log(f"[conca demo] atlas of {site}: one card per latent ...")
        path = out / "train" / site / "topk"
        summary = build_atlas(out / "atlas" / site, load_dictionary(path), loaded, site, store=store,
                              source_label=f"{store.n_tokens:,} held-out tokens of {opts.text}",
                              dictionary_label=str(path), settings=settings,
                              log=lambda m, site=site: log(f"[conca demo]   atlas {site}: {m}"))
        atlases[site] = {"index": f"atlas/{site}/index.html", "highlights": summary["highlights"],
                         "elapsed_s": summary["elapsed_s"], "n_cards": summary["n_cards"],
                         "dead": summary["dead"], "dense": summary["dense"], "n_tokens": summary["n_tokens"]}
    return atlases


def _complete_old_store(store_dir: Path, loaded, opts: DemoOptions) -> bool:
    """A complete format-1 store (an older conca's demo) holding every planned context: training needs no
    positions, and upgrading it would change its shards' checksums, which the finished training runs
    record as their source."""
    from conca.activations.store import ActivationStore

    if not (store_dir / MANIFEST).exists():
        return False
    manifest = ActivationStore.open(store_dir).manifest
    if manifest.format_version >= 2 or not manifest.complete:
        return False
    planned = len(contexts_for(loaded.tokenizer, opts.text, "train", opts.train_tokens, opts.ctx_len,
                               allow_download=opts.allow_download))
    return manifest.contexts_done >= planned


def _upgrade_old_store(store_dir: Path, loaded, opts: DemoOptions, log) -> None:
    """A demo folder from an older conca holds a format-1 store (no token positions), which the harvest
    refuses to continue: add the positions in place (conca.activations.upgrade) rather than stop."""
    if not (store_dir / MANIFEST).exists():
        return
    from conca.activations.store import ActivationStore
    from conca.activations.upgrade import upgrade_store

    if not ActivationStore.open(store_dir).has_positions:
        log(f"[conca demo] {store_dir} was written by an older conca: adding token positions (conca store upgrade) ...")
        upgrade_store(store_dir, loaded.tokenizer, allow_download=opts.allow_download)


def _harvest_plan(store_dir: Path, loaded, opts: DemoOptions) -> str:
    """What the harvest step will do, from the store's manifest and the contexts it is asked for."""
    try:
        manifest = json.loads((store_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"harvesting {opts.train_tokens} training tokens ..."
    planned = len(contexts_for(loaded.tokenizer, opts.text, "train", opts.train_tokens, opts.ctx_len,
                               allow_download=opts.allow_download))
    shards = manifest.get("shards") or []
    done = shards[-1]["contexts"][1] if shards else 0
    n_tokens = sum(s["n_tokens"] for s in shards)
    if manifest.get("complete") and done >= planned:
        return f"activations: reusing {store_dir} (complete, {n_tokens} tokens)"
    return f"activations: resuming {store_dir} at context {done} of {planned} ({n_tokens} tokens so far) ..."


def _train_plan(run_dir: Path, site: str, opts: DemoOptions) -> str:
    """What the training step will do: reuse a finished run, resume an interrupted one, or train."""
    try:
        history = json.loads((run_dir / "metrics.json").read_text()).get("history") or []
    except (OSError, ValueError, AttributeError):
        history = []
    if history and history[-1].get("step") == opts.steps and (run_dir / "topk").is_dir():
        return f"train {site}: reusing finished dictionary ({opts.steps} steps, {run_dir / 'topk'})"
    if (run_dir / "checkpoint.pt").exists():
        return f"train {site}: resuming the interrupted run in {run_dir} ..."
    return f"training a TopK SAE (k={opts.k}, {opts.expansion}x) on {site} ..."


def _evaluate(out: Path, loaded, dictionary, site: str, heldout, opts: DemoOptions, log):
    """Metrics and firing frequencies of `dictionary` at `site` on the held-out contexts, reused from
    OUT/evaluations/SITE.json when the dictionary digest and every evaluation setting match."""
    path = out / "evaluations" / f"{site}.json"
    key = eval_cache.evaluation_key(dictionary, heldout, model=opts.model, model_name=loaded.name, site=site,
                                    text=opts.text, tokens=opts.eval_tokens, ctx_len=opts.ctx_len, split=EVAL_SPLIT,
                                    heldout_fraction=EVAL_HELDOUT_FRACTION, batch_size=EVAL_BATCH_SIZE,
                                    downstream=True)
    cached = eval_cache.load_evaluation(path, key, required=HEADLINE)
    if cached is not None:
        log(f"[conca demo] evaluate {site}: reusing metrics (same dictionary digest and eval settings, {path})")
        return dict(cached[0]), cached[1]
    changed = eval_cache.differences(path, key) if path.exists() else []
    reason = f" ({', '.join(changed)} changed)" if changed else ""
    log(f"[conca demo] evaluating {site} on {heldout.n_tokens} held-out tokens (with the SAE spliced in){reason} ...")
    metrics, freqs = evaluate_dictionary(loaded, dictionary, site, heldout, batch_size=EVAL_BATCH_SIZE)
    eval_cache.save_evaluation(path, key, metrics, freqs)
    return metrics, freqs
