"""`conca demo`: the whole spine on the embedded default model, in a few minutes on a laptop CPU.

Harvest the final site and a middle residual layer from the training part of the default
corpus, train a TopK SAE on each, evaluate on held-out documents (reconstruction, sparsity,
CE-loss recovered, KL with the SAE spliced in) and write report.html + metrics.json."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from conca.activations.store import atomic_write_json
from conca.config import option, save_effective_config
from conca.experiments.pipeline import HarvestOptions, TrainOptions, contexts_for, evaluate_dictionary, run_harvest, run_train
from conca.models.load import load_model
from conca.models.sites import parse_sites
from conca.report import plots
from conca.report.html import Report

HEADLINE = ("explained_variance", "fvu", "l0", "ce_loss_recovered", "kl_div", "dead_fraction", "dense_fraction",
            "mse_sum", "mse_mean", "cosine_similarity", "l2_ratio", "ce_loss_clean", "ce_loss_spliced",
            "ce_loss_zero_ablated")


@dataclass
class DemoOptions:
    out: str = option("demo_out", "output directory (an interrupted demo there is resumed)", path="out_dir")
    model: str = option("smollm2", "model: 'smollm2' (embedded default), a .gguf file, a local HF directory or a cached HF id")
    text: str = option("pydoc", "text: 'pydoc' (offline default corpus) or a .txt/.jsonl/.parquet file")
    sites: str = option("final,resid.mid", "comma-separated sites; 'resid.mid' means the middle layer's residual stream")
    train_tokens: int = option(32768, "training tokens harvested per site", min=1)
    eval_tokens: int = option(3072, "held-out evaluation tokens", min=1)
    ctx_len: int = option(128, "tokens per context", min=2)
    expansion: int = option(4, "latents per input dimension", min=1)
    k: int = option(32, "active latents per token", min=1)
    steps: int = option(500, "training steps per site", min=1)
    batch_size: int = option(1024, "tokens per training batch", min=1)
    lr: float = option(1e-3, "peak learning rate", gt=0)
    seed: int = option(0, "random seed", min=0)
    progress: bool = option(True, "show progress bars")
    allow_download: bool = option(False, "let transformers download a hub model (off: offline only)")


def run_demo(opts: DemoOptions, log=print) -> dict:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    save_effective_config(opts, out)
    t0 = time.perf_counter()
    print_ = log

    def log(message: str) -> None:
        print_(f"[{time.perf_counter() - t0:6.0f}s] {message}")

    log(f"[conca demo] loading model {opts.model} ...")
    loaded = load_model(opts.model, allow_download=opts.allow_download)
    mid = loaded.n_layers // 2
    site_names = [s.strip().replace("resid.mid", f"resid.{mid}") for s in opts.sites.split(",") if s.strip()]
    sites = [str(s) for s in parse_sites(site_names)]
    log(f"[conca demo] {loaded.name}: {loaded.n_layers} layers, d={loaded.d_model}; sites {', '.join(sites)}")

    log(f"[conca demo] harvesting {opts.train_tokens} training tokens ...")
    run_harvest(HarvestOptions(out=str(out / "activations"), model=opts.model, text=opts.text, sites=",".join(sites),
                               tokens=opts.train_tokens, ctx_len=opts.ctx_len, progress=opts.progress), loaded=loaded)
    heldout = contexts_for(loaded.tokenizer, opts.text, "heldout", opts.eval_tokens, opts.ctx_len)

    results, histories, densities = {}, {}, {}
    for site in sites:
        log(f"[conca demo] training a TopK SAE (k={opts.k}, {opts.expansion}x) on {site} ...")
        train_opts = TrainOptions(activations=str(out / "activations"), out=str(out / "train" / site), site=site,
                                  method="topk", expansion=opts.expansion, k=opts.k, steps=opts.steps,
                                  batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed, progress=opts.progress,
                                  dead_after_tokens=20 * opts.batch_size, eval_every=max(1, opts.steps // 20))
        result, train_metrics = run_train(train_opts, name="topk")
        log(f"[conca demo] evaluating {site} on {heldout.n_tokens} held-out tokens (with the SAE spliced in) ...")
        metrics, freqs = evaluate_dictionary(loaded, result.dictionaries["topk"], site, heldout)
        metrics["train_tokens_per_s"] = train_metrics["tokens_per_s"]
        results[site] = metrics
        histories[site] = result.histories["topk"]
        densities[site] = freqs
        log("[conca demo]   " + ", ".join(f"{k}={metrics[k]:.4g}" for k in
                                          ("explained_variance", "l0", "ce_loss_recovered", "kl_div", "dead_fraction")))
    elapsed = time.perf_counter() - t0
    summary = {"model": loaded.name, "sites": results, "elapsed_s": elapsed,
               "heldout_tokens": heldout.n_tokens, "config": asdict(opts)}
    atomic_write_json(out / "metrics.json", summary)
    write_report(out / "report.html", summary, histories, densities, opts)
    log(f"[conca demo] done in {elapsed:.0f}s: {out / 'report.html'} and {out / 'metrics.json'}")
    return summary


def write_report(path: Path, summary: dict, histories: dict, densities: dict, opts: DemoOptions) -> Path:
    report = Report("conca demo", subtitle=f"TopK SAEs on {Path(summary['model']).name}")
    report.paragraph(
        f"Each site's activations were harvested from the training documents of the corpus ({opts.text}); a TopK SAE "
        f"with {opts.expansion}x latents and k={opts.k} was trained for {opts.steps} steps of {opts.batch_size} tokens, "
        f"then evaluated on {summary['heldout_tokens']} tokens of held-out documents. Explained variance is about the "
        "mean; MSE is given both summed over dimensions (per token) and as a per-dimension mean. CE-loss recovered "
        "compares the SAE splice with zero-ablation at the same positions; KL is KL(clean || spliced) per token."
    )
    report.heading("Metrics on held-out text")
    sites = list(summary["sites"])
    rows = [{"metric": key, **{site: summary["sites"][site].get(key) for site in sites}} for key in HEADLINE]
    report.table(rows, columns=["metric", *sites])
    report.heading("Training curves")
    report.figure(plots.training_curves(histories, keys=["loss", "fvu", "l0"]),
                  caption="Loss on training batches; FVU and L0 on a fixed sample of activations, during training.")
    report.heading("Latent density")
    report.figure(plots.density_histogram(densities),
                  caption="log10 of the fraction of held-out tokens on which each latent fires.")
    report.heading("Configuration")
    report.code(yaml.safe_dump(asdict(opts), sort_keys=False))
    return report.write(path)
