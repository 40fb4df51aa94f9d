"""Training throughput, peak memory and achieved FLOP/s per method, and conca's TopK against
SAELens' TopK on the same activations in the same run.

    python benchmarks/bench_train.py --out benchmarks/results/            # full (about an hour on 2 CPU cores)
    python benchmarks/bench_train.py --out benchmarks/results/ --quick    # a few minutes

Activations: real final-site activations of the default model (SmolLM2-135M, d = 576) on the
default corpus, harvested once with `conca harvest` into --cache. Every method and both
libraries train on the very same matrix with batch 4096; SAELens also gets the very same
batches in the same order. Each configuration runs in its own process so that its peak memory
is its own; conca and SAELens alternate inside one process (conca, SAELens, SAELens, conca) so
that background load hits both sides alike. Warm-up steps are excluded from the timings.
Needs sae-lens for the comparison: pip install "sae-lens>=6,<7" (the `interop` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CACHE, matmul_flops, peak_rss_mib, real_activations, run_child, sync, write_results  # noqa: E402

D = 576
K = 32
BATCH = 4096
LR = 4e-4
# ConCA in the papers' carried-forward configuration, beside the SAE family of `conca sweep`.
CONCA_REPRESENTATIVE = "conca_layernorm_softplus"


def default_methods() -> list[str]:
    """Every method of `conca sweep`'s default family (read from the registry), and ConCA."""
    from conca.experiments.sweep import sae_family

    return [*sae_family(), CONCA_REPRESENTATIVE]


# --- workers (one configuration per process) -----------------------------------------------------


def _load(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.load(spec["train"])), torch.from_numpy(np.load(spec["heldout"]))


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _conca_run(spec: dict, x: torch.Tensor, heldout: torch.Tensor) -> dict:
    from conca.activations.stream import TensorSource
    from conca.dictionaries import create, get_method
    from conca.training.trainer import TrainConfig, train

    torch.manual_seed(0)
    method = spec.get("method", "topk")
    # k is the shared target L0: the methods that have one take it, the others keep their defaults.
    dictionary = create(method, **get_method(method).config_for(D, spec["n"], target_l0=spec["k"]))
    cfg = TrainConfig(steps=spec["steps"], batch_size=BATCH, lr=LR, warmup_steps=spec["lr_warmup"], eval_every=spec["steps"],
                      checkpoint_every=spec["steps"], init_tokens=2 * BATCH, eval_tokens=BATCH, progress=False,
                      device=spec["device"], autocast=spec["autocast"], compile=spec.get("compile", False))
    result = train({"m": dictionary}, TensorSource(x), cfg)
    with torch.no_grad():
        z = dictionary.encode(heldout)
        fvu, l0 = _fvu(heldout, dictionary.decode(z)), float((z != 0).float().sum(-1).mean())
    return {"step_seconds": result.step_seconds[spec["warmup"]:], "fvu": fvu, "l0": l0}


def _saelens_run(spec: dict, x: torch.Tensor, heldout: torch.Tensor) -> dict:
    """SAELens' own TopK training SAE and SAETrainer loop with its defaults (AuxK coefficient 1,
    rescale_acts_by_decoder_norm, decoder init norm 0.1, grad-norm clipping at 1), the same lr,
    warm-up and linear decay over the last 20 %, E||x||^2 = d input scaling folded back at the
    end as conca does, fed conca's batches in conca's order."""
    from conca.activations.stream import BatchStream, TensorSource
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(0)
    device = spec["device"] if spec["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=spec["n"], k=spec["k"], device=device,
                                                normalize_activations="expected_average_only_in"))
    stamps: list[float] = []

    def provider():
        # The norm estimate reads 2 batches first: the first 8192 rows, as conca's init sample.
        for i in range(2):
            yield x[i * BATCH:(i + 1) * BATCH].to(device)
        for batch in BatchStream(TensorSource(x), BATCH, seed=0).batches():
            sync(torch.device(device))
            stamps.append(time.perf_counter())
            yield batch.to(device)

    cfg = SAETrainerConfig(total_training_samples=spec["steps"] * BATCH, train_batch_size_samples=BATCH, lr=LR, lr_end=LR,
                           lr_warm_up_steps=spec["lr_warmup"], lr_decay_steps=int(0.2 * spec["steps"]), device=device,
                           autocast=spec["autocast"] == "bf16", n_batches_for_norm_estimate=2,
                           logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg, sae, provider())
    trainer.fit()
    sync(torch.device(device))
    stamps.append(time.perf_counter())
    sae.eval()
    with torch.no_grad():
        z = sae.encode(heldout.to(device))
        fvu, l0 = _fvu(heldout, sae.decode(z).float().cpu()), float((z != 0).float().sum(-1).mean())
    return {"step_seconds": list(np.diff(stamps))[spec["warmup"]:], "fvu": fvu, "l0": l0}


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    x, heldout = _load(spec)
    baseline = peak_rss_mib()
    if spec["kind"] == "method":
        device = torch.device(spec["device"] if spec["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # The matmul ceiling measured right before and right after the timed steps, in the same
        # process: background load then weighs on both sides of the FLOP/s fraction alike.
        dtype = torch.bfloat16 if spec["autocast"] == "bf16" else torch.float32
        gemm = [matmul_flops(dtype, device)] if spec.get("measure_gemm") else []
        run = _conca_run(spec, x, heldout)
        if gemm:
            run["gemm_flops"] = max(gemm + [matmul_flops(dtype, device)])
        run["peak_rss_mib"], run["baseline_rss_mib"] = peak_rss_mib(), baseline
        if device.type == "cuda":
            run["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return run
    # conca and SAELens alternate (ABBA) in this one process.
    runs = {"conca": [], "saelens": []}
    for side in ("conca", "saelens", "saelens", "conca")[: 4 if spec["rounds"] > 1 else 2]:
        runs[side].append((_conca_run if side == "conca" else _saelens_run)(spec, x, heldout))
    return {side: {"step_seconds": [t for r in rs for t in r["step_seconds"]], "fvu": rs[0]["fvu"], "l0": rs[0]["l0"],
                   "fvu_each_round": [r["fvu"] for r in rs]} for side, rs in runs.items()}


# --- the benchmark ---------------------------------------------------------------------------------


def topk_step_flops(batch: int, d: int, n: int, k: int) -> dict:
    """FLOPs of conca's TopK step that are counted, and the formula. Only multiply-adds of the
    products actually performed count (2 per multiply-add): the dense encoder GEMM and the five
    sparse products of k latents per token. Not counted: top-k selection, bias adds, the loss,
    decoder renormalisation and Adam (elementwise, memory-bound)."""
    encoder = 2 * batch * d * n
    sparse = 5 * 2 * batch * k * d
    return {"counted": encoder + sparse, "encoder_gemm": encoder, "sparse_products": sparse,
            "dense_equivalent_not_counted": 12 * batch * d * n,
            "formula": "2·B·d·n (encoder forward GEMM) + 5 × 2·B·k·d (encoder input-grad and weight-grad gather-sums, "
                       "decoder forward, decoder value-grad and weight-grad) with B=batch, d=width, n=latents, k=32"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="one size, three methods, few steps")
    parser.add_argument("--latents", default="4608,16384")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: the SAE family of "
                                                         "`conca sweep` and conca_layernorm_softplus)")
    parser.add_argument("--steps", type=int, default=30, help="steps per method run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from timings")
    parser.add_argument("--versus-steps", type=int, default=200, help="steps of the conca-vs-SAELens runs (equal on both sides)")
    parser.add_argument("--rounds", type=int, default=2, help="1: conca then SAELens; 2: conca, SAELens, SAELens, conca")
    parser.add_argument("--autocast", default="none,bf16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--train-tokens", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default)")
    parser.add_argument("--skip-saelens", action="store_true")
    parser.add_argument("--compile", type=int, default=1, help="1: also time TopK with --compile (its compile time is "
                                                                  "in the warm-up steps, not timed)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    args.methods = args.methods or ",".join(default_methods())
    if args.quick:
        args.latents, args.methods, args.steps, args.warmup, args.versus_steps = "4608", "topk,batchtopk,jumprelu", 8, 2, 40
        args.rounds = 1
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    args.cache.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, tokens in (("train", args.train_tokens), ("heldout", 8192)):
        path = args.cache / f"{split}_{tokens}.npy"
        if not path.exists():
            np.save(path, real_activations(args.cache, split, tokens).numpy())
        data[split] = str(path)
    peaks = {name: matmul_flops(dtype, device) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    latents = [int(n) for n in args.latents.split(",")]
    encoder_peaks = {f"{name}_n{n}": matmul_flops(dtype, device, shape=(BATCH, D, n))
                     for n in latents for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    base = {**data, "k": K, "device": args.device, "threads": args.threads}
    methods, versus = [], []
    for n in latents:
        variants = [(m, False) for m in args.methods.split(",")]
        if args.compile and "topk" in args.methods.split(","):
            variants.insert(1, ("topk", True))
        for method, compiled in variants:
            for autocast in args.autocast.split(","):
                spec = {**base, "kind": "method", "method": method, "n": n, "autocast": autocast, "compile": compiled,
                        "steps": args.warmup + args.steps, "warmup": args.warmup, "lr_warmup": 5,
                        "measure_gemm": method == "topk" and not compiled}
                run = run_child(Path(__file__), spec)
                median = statistics.median(run["step_seconds"])
                methods.append({"method": method + ("+compile" if compiled else ""), "n_latents": n, "autocast": autocast, "tokens_per_s": BATCH / median,
                                "step_ms_median": 1e3 * median, "peak_rss_mib": run["peak_rss_mib"],
                                "baseline_rss_mib": run["baseline_rss_mib"], "peak_cuda_mib": run.get("peak_cuda_mib"),
                                "fvu_heldout": run["fvu"], "l0": run["l0"], "gemm_flops": run.get("gemm_flops")})
                print(json.dumps(methods[-1]), flush=True)
        if args.skip_saelens:
            continue
        for autocast in args.autocast.split(","):
            spec = {**base, "kind": "versus", "n": n, "autocast": autocast, "steps": args.versus_steps,
                    "warmup": args.warmup, "lr_warmup": max(1, args.versus_steps // 10), "rounds": args.rounds}
            run = run_child(Path(__file__), spec, timeout=6 * 3600)
            row = {"n_latents": n, "autocast": autocast, "steps": args.versus_steps}
            for side in ("conca", "saelens"):
                median = statistics.median(run[side]["step_seconds"])
                row.update({f"{side}_tokens_per_s": BATCH / median, f"{side}_fvu": run[side]["fvu"],
                            f"{side}_l0": run[side]["l0"], f"{side}_fvu_each_round": run[side]["fvu_each_round"]})
            row["speedup"] = row["conca_tokens_per_s"] / row["saelens_tokens_per_s"]
            versus.append(row)
            print(json.dumps(row), flush=True)
    flops = []
    for row in methods:
        if row["method"] != "topk":
            continue
        count = topk_step_flops(BATCH, D, row["n_latents"], K)
        achieved = count["counted"] * row["tokens_per_s"] / BATCH
        dtype = "bf16" if row["autocast"] == "bf16" else "fp32"
        peak = row["gemm_flops"] or peaks[dtype]
        flops.append({"n_latents": row["n_latents"], "autocast": row["autocast"], "achieved_flops": achieved,
                      "peak_flops": peak, "fraction_of_peak": achieved / peak,
                      "encoder_shape_gemm_flops_at_start": encoder_peaks[f"{dtype}_n{row['n_latents']}"],
                      **count})
    payload = {"config": {"d": D, "k": K, "batch": BATCH, "lr": LR, **vars(args) | {"out": str(args.out), "cache": str(args.cache)}},
               "matmul_peak_flops": peaks, "encoder_shape_gemm_flops": encoder_peaks,
               "methods": methods, "versus_saelens": versus, "flops": flops}
    tables = [
        ("Throughput and memory per method (batch 4096, d = 576, real activations)",
         ["method", "latents", "autocast", "tokens/s", "step ms", "peak RSS MiB", "FVU held-out", "L0"],
         [[r["method"], r["n_latents"], r["autocast"], r["tokens_per_s"], r["step_ms_median"], r["peak_rss_mib"],
           r["fvu_heldout"], r["l0"]] for r in methods]),
        ("TopK: conca vs SAELens, same activations, same batches, same run",
         ["latents", "autocast", "steps", "conca tokens/s", "SAELens tokens/s", "ratio", "conca FVU", "SAELens FVU"],
         [[r["n_latents"], r["autocast"], r["steps"], r["conca_tokens_per_s"], r["saelens_tokens_per_s"],
           f"{r['speedup']:.2f}×", r["conca_fvu"], r["saelens_fvu"]] for r in versus]),
        ("TopK training step: achieved FLOP/s vs the measured matmul peak",
         ["latents", "autocast", "GFLOP/step counted", "achieved GFLOP/s", "peak GFLOP/s (4096³ GEMM)", "fraction"],
         [[r["n_latents"], r["autocast"], r["counted"] / 1e9, r["achieved_flops"] / 1e9, r["peak_flops"] / 1e9,
           f"{r['fraction_of_peak']:.0%}"] for r in flops]),
    ]
    notes = [f"FLOPs counted: {topk_step_flops(BATCH, D, 1, K)['formula']}; top-k, bias adds, the loss, "
             "renormalisation and Adam are not counted; a dense implementation would perform 12·B·d·n.",
             "Timings: median step time after the warm-up steps; tokens/s = 4096 / median step time.",
             "Peak: the best of a 4096³ GEMM (fp32, or bf16 for autocast runs) timed in the TopK worker process just "
             "before and just after its timed steps.",
             "SAELens: TopKTrainingSAE + SAETrainer with its defaults (AuxK coefficient 1, rescale_acts_by_decoder_norm, "
             "decoder init norm 0.1, grad clipping 1.0, dense decoder), normalize_activations=expected_average_only_in, "
             "the same lr (4e-4), warm-up and final 20 % linear decay, fed conca's batches in conca's order.",
             "FVU: on 8192 held-out tokens (raw scale) after the same number of steps.",
             "Other methods use their default sparsity settings, so their L0 differs from TopK's k = 32.",
             "topk+compile: the same run with torch.compile of the loss; compiling happens in the warm-up steps."]
    json_path, md_path = write_results(args.out, "bench_train", payload, tables, notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
