"""`conca demo`: the whole spine on the embedded default model, in a few minutes on a laptop CPU.

Harvest the final site and a middle residual layer from the training part of the default
corpus, train a TopK SAE on each, evaluate on held-out documents (reconstruction, sparsity,
CE-loss recovered, KL with the SAE spliced in) and write report.html + metrics.json.

Rerunning on the same folder redoes nothing that is finished: a complete activation store and a
finished training run are reused (both refuse other settings), and each site's evaluation is
cached in OUT/evaluations/SITE.json under the dictionary's sha256 and the evaluation settings
(see conca.experiments.eval_cache): reused when all match, recomputed when anything differs."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from conca.activations.store import MANIFEST, atomic_write_json
from conca.config import save_effective_config
from conca.experiments import eval_cache
from conca.experiments.options import DemoOptions  # noqa: F401  (declared there: no torch)
from conca.experiments.pipeline import (HarvestOptions, TrainOptions, check_text, contexts_for, evaluate_dictionary,
                                       run_harvest, run_train)
from conca.models.load import load_model
from conca.models.sites import parse_sites
from conca.report import plots
from conca.report.html import Report

HEADLINE = ("explained_variance", "fvu", "l0", "ce_loss_recovered", "ce_loss_recovered_saelens", "kl_div",
            "dead_fraction", "dense_fraction", "mse_sum", "mse_mean", "cosine_similarity", "l2_ratio",
            "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated", "ce_loss_zero_ablated_saelens",
            "kl_div_score", "kl_div_score_saelens")
# What each headline row is, shown beside it in the report.
MEANING = {
    "explained_variance": "1 − Σ‖x−x̂‖² / Σ‖x−x̄‖² (about the mean)",
    "fvu": "1 − explained_variance",
    "l0": "active latents per token",
    "ce_loss_recovered": "conca: (CE_zero − CE_sae) / (CE_zero − CE_clean), zeros at the real-token positions only",
    "ce_loss_recovered_saelens": "SAELens' ce_loss_score: the same with zeros at every position, BOS included",
    "kl_div": "KL(p_clean ‖ p_sae) per scored token (nats)",
    "dead_fraction": "latents that never fired on the held-out tokens",
    "dense_fraction": "latents firing on > 10 % of them",
    "mse_sum": "E‖x−x̂‖², summed over dimensions (SAELens' mse)",
    "mse_mean": "mse_sum / d (mean over dimensions too)",
    "cosine_similarity": "E cos(x, x̂)",
    "l2_ratio": "E ‖x̂‖ / ‖x‖",
    "ce_loss_clean": "CE of the unchanged model",
    "ce_loss_spliced": "CE with the SAE's reconstruction spliced in",
    "ce_loss_zero_ablated": "CE with zeros at the real-token positions (conca)",
    "ce_loss_zero_ablated_saelens": "CE with zeros at every position (SAELens' ce_loss_with_ablation)",
    "kl_div_score": "conca: (KL_zero − KL_sae) / KL_zero",
    "kl_div_score_saelens": "SAELens' kl_div_score (zeros at every position)",
}
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
    run_harvest(HarvestOptions(out=str(out / "activations"), model=opts.model, text=opts.text, sites=",".join(sites),
                               tokens=opts.train_tokens, ctx_len=opts.ctx_len, progress=opts.progress,
                               allow_download=opts.allow_download), loaded=loaded)
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
    elapsed = time.perf_counter() - t0
    summary = {"model": loaded.name, "sites": results, "elapsed_s": elapsed,
               "heldout_tokens": heldout.n_tokens, "config": asdict(opts)}
    atomic_write_json(out / "metrics.json", summary)
    write_report(out / "report.html", summary, histories, densities, opts)
    log(f"[conca demo] done in {elapsed:.0f}s: {out / 'report.html'} and {out / 'metrics.json'}")
    return summary


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


def write_report(path: Path, summary: dict, histories: dict, densities: dict, opts: DemoOptions) -> Path:
    report = Report("conca demo", subtitle=f"TopK SAEs on {Path(summary['model']).name}")
    report.paragraph(
        f"Each site's activations were harvested from the training documents of the corpus ({opts.text}); a TopK SAE "
        f"with {opts.expansion}x latents and k={opts.k} was trained for {opts.steps} steps of {opts.batch_size} tokens, "
        f"then evaluated on {summary['heldout_tokens']} tokens of held-out documents. Explained variance is about the "
        "mean; MSE is given both summed over dimensions per token (mse_sum, the scale of SAELens' mse) and as a "
        "per-dimension mean (mse_mean). The SAE's reconstruction replaces the site's activation at the real-text "
        "positions (BOS and EOS are left alone). CE-loss recovered is reported twice: ce_loss_recovered (conca) "
        "compares it with zero-ablation of those same positions; ce_loss_recovered_saelens is SAELens' run_evals "
        "ce_loss_score, whose zero-ablation zeroes every position, BOS included: on a Llama-type model that gives "
        "uniform predictions (CE = ln(vocab)), a milder baseline than conca's (zeros with BOS intact give confidently "
        "wrong predictions), so the same SAE scores lower. KL is KL(clean || spliced) per token."
    )
    report.heading("Metrics on held-out text")
    sites = list(summary["sites"])
    rows = [{"metric": key, **{site: summary["sites"][site].get(key) for site in sites},
             "meaning": MEANING.get(key, "")} for key in HEADLINE]
    report.table(rows, columns=["metric", *sites, "meaning"])
    report.heading("Training curves")
    report.figure(plots.training_curves(histories, keys=["loss", "fvu", "l0"]),
                  caption="Loss on training batches; FVU and L0 on a fixed sample of activations, during training.")
    report.heading("Latent density")
    report.figure(plots.density_histogram(densities),
                  caption="log10 of the fraction of held-out tokens on which each latent fires.")
    report.heading("Configuration")
    report.code(yaml.safe_dump(asdict(opts), sort_keys=False))
    return report.write(path)
