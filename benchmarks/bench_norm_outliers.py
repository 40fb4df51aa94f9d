"""Norm outliers on the default model: how many tokens `--max-norm-ratio` drops, and what dropping
them does to a TopK SAE.

    python benchmarks/bench_norm_outliers.py --out benchmarks/results/     # ~6 min on 2 cores

For each site (the final-norm output and the middle layer's residual stream), harvest the demo's
training tokens twice (all tokens; tokens above --ratio x the shard's median norm dropped), report
the distribution of norm / shard-median norm, train the demo's TopK SAE on each store (same seed
and settings) and evaluate both on the same held-out text, outliers included, with the SAE
spliced into the model. If the two agree within 0.005 in EV and CE-loss recovered, the rule
changes nothing on this model and stays off by default.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

RATIOS = (3.0, 5.0, 10.0, 20.0, 50.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--eval-tokens", type=int, default=3072)
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args(argv)

    from conca.activations.harvest import harvest
    from conca.evaluation.dictionary import evaluate_dictionary
    from conca.experiments.pipeline import TrainOptions, run_train
    from conca.models.load import load_model
    from conca.text.splits import contexts_for

    loaded = load_model()
    sites = ["final", f"resid.{loaded.n_layers // 2}"]
    train = contexts_for(loaded.tokenizer, "pydoc", "train", tokens=args.tokens, ctx_len=128)
    heldout = contexts_for(loaded.tokenizer, "pydoc", "heldout", tokens=args.eval_tokens, ctx_len=128)
    work = Path(tempfile.mkdtemp(prefix="conca_bench_outliers_"))
    results, rows, metric_rows = {}, [], []
    for site in sites:
        stores = {}
        for rule, ratio in (("all tokens", 0.0), (f"ratio {args.ratio:g}", args.ratio)):
            stores[rule] = harvest(loaded, train, site, work / f"{site}_{ratio:g}", progress=False, max_norm_ratio=ratio)
        everything = stores["all tokens"]
        ratios = torch.cat([_ratios(everything.load_shard(i)[f"act.{site}"])
                            for i in range(len(everything.manifest.shards))])
        share = {r: float((ratios > r).float().mean()) for r in RATIOS}
        results[site] = {"tokens": int(ratios.numel()), "max_ratio": float(ratios.max()),
                         "p99_9_ratio": float(ratios.quantile(0.999)), "share_above": share, "metrics": {}}
        rows.append([site, int(ratios.numel()), float(ratios.max()), float(ratios.quantile(0.999)),
                     *[f"{100 * share[r]:.3f} %" for r in RATIOS]])
        for rule, store in stores.items():
            opts = TrainOptions(activations=str(store.path), out=str(work / f"train_{site}_{store.path.name}"),
                                site=site, method="topk", expansion=4, k=32, steps=args.steps, batch_size=1024,
                                lr=1e-3, seed=0, progress=False, dead_after_tokens=20 * 1024,
                                eval_every=max(1, args.steps // 5))
            trained, _ = run_train(opts, name="topk")
            metrics, _ = evaluate_dictionary(loaded, trained.dictionaries["topk"], site, heldout)
            kept = {k: float(metrics[k]) for k in ("explained_variance", "ce_loss_recovered", "dead_fraction")}
            results[site]["metrics"][rule] = {**kept, "train_tokens": store.manifest.n_tokens}
            metric_rows.append([site, rule, store.manifest.n_tokens, kept["explained_variance"],
                                kept["ce_loss_recovered"], kept["dead_fraction"]])
    shutil.rmtree(work, ignore_errors=True)
    notes = [f"{args.tokens} training tokens of the default corpus (demo's), ratio = a token's norm / the median norm "
             "of its shard (64 contexts) at that site; BOS and other special tokens are never stored.",
             f"TopK (expansion 4, k 32, {args.steps} steps of 1024, lr 1e-3, seed 0), evaluated on "
             f"{heldout.n_tokens} held-out tokens (all of them) with the SAE spliced in."]
    json_path, md_path = write_results(
        args.out, "bench_norm_outliers", {"config": {**vars(args), "out": str(args.out), "model": loaded.name},
                                          "sites": results},
        [("Norm / shard median norm", ["site", "tokens", "max", "99.9th pct",
                                       *[f"share > {r:g}×" for r in RATIOS]], rows),
         (f"A TopK SAE trained with and without the rule (--max-norm-ratio {args.ratio:g})",
          ["site", "training store", "tokens", "EV", "CE-loss recovered", "dead"], metric_rows)], notes)
    print(f"wrote {json_path} and {md_path}")


def _ratios(acts: torch.Tensor) -> torch.Tensor:
    norms = acts.float().norm(dim=-1)
    return norms / norms.median()


if __name__ == "__main__":
    main()
