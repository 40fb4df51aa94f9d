"""conca's TopK training against EleutherAI's sparsify (PyPI eai-sparsify) on the same activations
and the same batches in the same order: tokens/s, peak GPU memory and held-out FVU.

    python benchmarks/bench_sparsify.py --out DIR                      # real SmolLM2 final-site activations
    python benchmarks/bench_sparsify.py --out DIR --npy acts.npy       # any (tokens, d) matrix

Both sides train TopK with the same latents, k, batch, steps, peak lr and warm-up steps; conca
through its public API (conca.dictionaries + conca.training.train), sparsify through its own
SparseCoder with the training step of its Trainer replicated (see `sparsify_run`). They alternate
in this one process (conca, sparsify, sparsify, conca) so that background load hits both alike;
the first --warmup steps of every run are not timed. Batches come from conca's BatchStream
(seed 0) through conca's read-ahead thread on both sides, so data feeding is identical.
Needs sparsify: pip install --no-deps eai-sparsify, plus its small deps (einops, natsort,
schedulefree, simple-parsing) without letting pip touch torch or transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CACHE, real_activations, sync, write_results


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - explained variance on the held-out rows, raw scale, the same for both libraries."""
    x, x_hat = x.double(), x_hat.double().cpu()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def conca_run(args: argparse.Namespace, x: torch.Tensor, heldout: torch.Tensor, device: torch.device, autocast: str) -> dict:
    from conca.activations.stream import TensorSource
    from conca.dictionaries import create, get_method
    from conca.training.trainer import TrainConfig, train

    torch.manual_seed(0)
    config = get_method("topk").config_for(x.shape[1], args.latents, target_l0=args.k)
    dictionary = create("topk", **{**config, "dead_after_tokens": args.dead_tokens, "aux_coeff": args.auxk_coeff})
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.lr_warmup,
                      eval_every=args.steps, checkpoint_every=args.steps, init_tokens=2 * args.batch,
                      eval_tokens=args.batch, progress=False, device=str(device), autocast=autocast)
    result = train({"m": dictionary}, TensorSource(x), cfg)
    with torch.no_grad():
        z = dictionary.encode(heldout)  # trained weights come back on the CPU, input scale folded in
        fvu, l0 = _fvu(heldout, dictionary.decode(z)), float((z != 0).float().sum(-1).mean())
    return {"step_seconds": result.step_seconds[args.warmup:], "fvu": fvu, "l0": l0, "lr": args.lr}


def import_sparsify():
    """sparsify's package imports its whole Trainer, and with it Hugging Face `datasets` for a type
    hint and its data loaders, none of which this benchmark uses: where `datasets` is not installed
    (a bare GPU machine) a placeholder module stands in for it, so that only sparsify's small
    pure-Python needs (einops, natsort, schedulefree, simple-parsing) have to travel."""
    import importlib.util
    import types

    if importlib.util.find_spec("datasets") is None:
        stub = types.ModuleType("datasets")
        stub.Dataset = stub.DatasetDict = type("Unavailable", (), {})
        sys.modules["datasets"] = stub
    import sparsify

    return sparsify


def sparsify_lr(args: argparse.Namespace) -> float:
    """--sparsify-lr, or --lr for Adam, or sparsify's own width-scaled default (Trainer.__init__):
    Adam 2e-4 / sqrt(n / 2^14), signum 5e-3 / sqrt(n / 2^14)."""
    if args.sparsify_lr == "same":
        return args.lr
    if args.sparsify_lr != "auto":
        return float(args.sparsify_lr)
    base = 2e-4 if args.sparsify_optimizer == "adam" else 5e-3
    return base / (args.latents / 2**14) ** 0.5


def sparsify_run(args: argparse.Namespace, x: torch.Tensor, heldout: torch.Tensor, device: torch.device, autocast: str) -> dict:
    """sparsify's SparseCoder trained as its Trainer does for loss_fn="fvu", one micro-batch:
    b_dec = mean of the first batch; before every forward the decoder rows are set to unit norm;
    loss = fvu + auxk_alpha * auxk_loss (dead = more than dead_feature_threshold tokens since a
    latent was last among a token's top k); the gradient parallel to each decoder row is removed
    before the optimiser step; Adam with transformers' linear warm-up then linear decay to 0 over
    the run (torch Adam: its bitsandbytes Adam8bit only when bitsandbytes is installed), or its
    default signum (SignSGD in a schedule-free wrapper, momentum 0.95, no schedule; its averaged
    weights are swapped in for the evaluation as its checkpoints do)."""
    from schedulefree import ScheduleFreeWrapper

    from conca.activations.stream import BatchStream, TensorSource, prefetch

    import_sparsify()
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=args.latents, k=args.k), device=device, dtype=torch.float32)
    lr = sparsify_lr(args)
    if args.sparsify_optimizer == "adam":
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        schedule = get_linear_schedule_with_warmup(opt, args.lr_warmup, args.steps)
    else:
        opt, schedule = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=lr), momentum=0.95), None
        opt.train()
    # SparseCoder.forward is decorated with CUDA bf16 autocast (on whenever the GPU supports bf16),
    # and Trainer.fit sets TF32 matmuls: both are kept for --autocast bf16 (sparsify as shipped);
    # --autocast none calls the undecorated forward in full fp32, like conca's fp32 run.
    bf16 = autocast == "bf16"
    forward = SparseCoder.forward if bf16 else SparseCoder.forward.__wrapped__
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and device.type == "cpu" else contextlib.nullcontext()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if bf16 else precision)
    since_fired = torch.zeros(args.latents, dtype=torch.long, device=device)
    did_fire = torch.zeros(args.latents, dtype=torch.bool, device=device)
    stream = prefetch(BatchStream(TensorSource(x), args.batch, seed=0).batches(), 2, pin_memory=device.type == "cuda")
    seconds = []
    try:
        for step in range(args.steps):
            start = time.perf_counter()
            batch = next(stream).to(device, non_blocking=True)
            if step == 0:
                sae.b_dec.data = batch.mean(0)
            sae.set_decoder_norm_to_unit_norm()
            dead = since_fired > args.dead_tokens if args.auxk_coeff > 0 else None
            total_variance = (batch - batch.mean(0)).pow(2).sum()
            with cast:
                out = forward(sae, batch, batch, dead_mask=dead, total_variance=total_variance)
            did_fire[out.latent_indices.flatten()] = True
            float(out.fvu.detach())  # its loop reads the batch FVU back every step (avg_fvu, a device sync)
            (out.fvu + args.auxk_coeff * out.auxk_loss + out.multi_topk_fvu / 8).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            if schedule is not None:
                schedule.step()
            with torch.no_grad():
                since_fired += len(batch)
                since_fired[did_fire] = 0
                did_fire.zero_()
            if step == args.steps - 1:
                sync(device)  # the queued GPU work counts in the last step, as in conca's end-of-run evaluation
            seconds.append(time.perf_counter() - start)
    finally:
        stream.close()
        torch.set_float32_matmul_precision(precision)
    if schedule is None:
        opt.eval()
    with torch.no_grad():
        acts, indices, _ = sae.encode(heldout.to(device))
        fvu, l0 = _fvu(heldout, sae.decode(acts, indices)), float((acts > 0).float().sum(-1).mean())
    return {"step_seconds": seconds[args.warmup:], "fvu": fvu, "l0": l0, "lr": lr}


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train rows, held-out rows, description): --npy and --heldout-npy, or --npy split into its
    last rows (at most 8192, at most a fifth) held out and the rest, or the cached real
    activations that bench_train.py also uses."""
    if args.npy and args.heldout_npy:
        x, heldout = (torch.from_numpy(np.load(p)).float() for p in (args.npy, args.heldout_npy))
        return x, heldout, f"{args.npy}: {len(x)} train rows; {args.heldout_npy}: {len(heldout)} held-out rows"
    if args.npy:
        data = torch.from_numpy(np.load(args.npy)).float()
        hold = min(8192, len(data) // 5)
        return data[:-hold], data[-hold:], f"{args.npy}: {len(data) - hold} train rows, last {hold} held out"
    args.cache.mkdir(parents=True, exist_ok=True)
    out = []
    for split, tokens in (("train", args.train_tokens), ("heldout", 8192)):
        path = args.cache / f"{split}_{tokens}.npy"
        if not path.exists():
            np.save(path, real_activations(args.cache, split, tokens).numpy())
        out.append(torch.from_numpy(np.load(path)))
    return out[0], out[1], f"SmolLM2-135M final-site activations: {args.train_tokens} train tokens, 8192 held-out tokens"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200, help="steps per run (the first --warmup not timed)")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the timings")
    parser.add_argument("--lr", type=float, default=4e-4, help="peak lr of both (conca's default)")
    parser.add_argument("--lr-warmup", type=int, default=None, help="lr warm-up steps of both (default: steps // 10)")
    parser.add_argument("--autocast", default="none", help="none, bf16, or both comma-separated")
    parser.add_argument("--sparsify-optimizer", choices=("adam", "signum"), default="adam",
                        help="adam (like conca's) or signum (sparsify's default)")
    parser.add_argument("--sparsify-lr", default=None, help="same (= --lr), auto (sparsify's width-scaled default) or "
                                                           "a number; default: same for adam, auto for signum")
    parser.add_argument("--auxk-coeff", type=float, default=1 / 32, help="AuxK weight of both (conca's default; "
                                                                          "sparsify's auxk_alpha defaults to 0)")
    parser.add_argument("--dead-tokens", type=int, default=10_000_000, help="tokens without firing after which a "
                                                                           "latent is dead for AuxK (both default to 10M)")
    parser.add_argument("--rounds", type=int, default=2, help="1: conca then sparsify; 2: conca, sparsify, sparsify, conca")
    parser.add_argument("--npy", type=Path, help="a (tokens, d) .npy to use instead of the real activations")
    parser.add_argument("--heldout-npy", type=Path, help="held-out rows for --npy (default: its last rows)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--train-tokens", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    args.lr_warmup = max(1, args.steps // 10) if args.lr_warmup is None else args.lr_warmup
    args.sparsify_lr = args.sparsify_lr or ("same" if args.sparsify_optimizer == "adam" else "auto")
    if args.heldout_npy and not args.npy:
        parser.error("--heldout-npy needs --npy")
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    x, heldout, described = load_data(args)
    print(described, flush=True)
    rows = []
    for autocast in args.autocast.split(","):
        runs = {"conca": [], "sparsify": []}
        for side in ("conca", "sparsify", "sparsify", "conca")[: 4 if args.rounds > 1 else 2]:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            run = (conca_run if side == "conca" else sparsify_run)(args, x, heldout, device, autocast)
            run["peak_cuda_mib"] = _peak_mib(device)
            runs[side].append(run)
            print(side, autocast, {k: v for k, v in run.items() if k != "step_seconds"}, flush=True)
        row = {"n_latents": args.latents, "k": args.k, "batch": args.batch, "steps": args.steps, "autocast": autocast}
        for side, rs in runs.items():
            seconds = [t for r in rs for t in r["step_seconds"]]
            row.update({f"{side}_tokens_per_s": args.batch / statistics.median(seconds),
                        f"{side}_tokens_per_s_mean_step": args.batch / statistics.mean(seconds),
                        f"{side}_step_ms_median": 1e3 * statistics.median(seconds), f"{side}_fvu": rs[0]["fvu"],
                        f"{side}_fvu_each_round": [r["fvu"] for r in rs], f"{side}_l0": rs[0]["l0"], f"{side}_lr": rs[0]["lr"],
                        f"{side}_peak_cuda_mib": max((r["peak_cuda_mib"] or 0) for r in rs) or None})
        row["speedup"] = row["conca_tokens_per_s"] / row["sparsify_tokens_per_s"]
        rows.append(row)
    sparsify = import_sparsify()
    payload = {"config": {**vars(args), "out": str(args.out), "cache": str(args.cache), "npy": str(args.npy) if args.npy else None,
                          "heldout_npy": str(args.heldout_npy) if args.heldout_npy else None,
                          "device_used": str(device), "data": described, "d": x.shape[1]},
               "sparsify_version": sparsify.__version__, "sparsify_decoder": sparsify.utils.decoder_impl.__name__, "rows": rows}
    tables = [(f"TopK: conca vs sparsify {sparsify.__version__}, same activations, same batches, same run ({device.type})",
               ["latents", "k", "autocast", "steps", "conca tokens/s", "sparsify tokens/s", "ratio", "conca FVU",
                "sparsify FVU", "conca peak MiB", "sparsify peak MiB"],
               [[r["n_latents"], r["k"], r["autocast"], r["steps"], r["conca_tokens_per_s"], r["sparsify_tokens_per_s"],
                 f"{r['speedup']:.2f}×", r["conca_fvu"], r["sparsify_fvu"], r["conca_peak_cuda_mib"] or "-",
                 r["sparsify_peak_cuda_mib"] or "-"] for r in rows])]
    notes = [
        (f"Data: {described}; batch {args.batch}; both sides get conca's BatchStream batches (seed 0) in the same order "
         "through the same read-ahead thread."),
        (f"Timings: median step time after {args.warmup} warm-up steps of every run, pooled over the rounds; tokens/s = "
         "batch / median step time. Peak MiB: torch.cuda.max_memory_allocated per run (GPU only)."),
        ("FVU: 1 - explained variance on the held-out rows, raw scale, computed by the same function for both, after the "
         "same number of steps (first round)."),
        (f"Matched: latents, k, batch, steps, peak lr, lr warm-up steps ({args.lr_warmup}), AuxK weight "
         f"({args.auxk_coeff:g}) and dead threshold ({args.dead_tokens:,} tokens; neither run declares any latent dead "
         "before that many tokens, so in short runs AuxK is computed by neither), unit-norm decoder rows with the radial "
         "gradient removed, fp32 parameters."),
        (f"sparsify optimiser: {args.sparsify_optimizer}, lr {sparsify_lr(args):.3g} ({args.sparsify_lr}); its own "
         f"default would be signum with 5e-3/sqrt(n/2^14) = {5e-3 / (args.latents / 2**14) ** 0.5:.3g} (Adam: "
         f"2e-4/sqrt(n/2^14) = {2e-4 / (args.latents / 2**14) ** 0.5:.3g}) and auxk_alpha 0."),
        ("Differs: initialisation (conca: random unit decoder rows, encoder = decoder transposed, b_dec = geometric median "
         "of 2 batches; sparsify: nn.Linear encoder, decoder = its unit-normed copy, b_dec = mean of the first batch); "
         "input normalisation (conca scales inputs to E||x||^2 = d and folds the scale back; sparsify trains on raw "
         "inputs); loss (conca: squared error summed over dims, mean over tokens; sparsify: FVU of the batch); "
         "lr schedule (conca: warm-up, flat, linear decay over the last 20 %; sparsify: warm-up then linear decay over "
         "the whole run); AuxK normalisation (conca: by the residual's variance; sparsify: by the batch variance); "
         "Adam (conca: fused torch Adam; sparsify: torch Adam without bitsandbytes); sparse kernels "
         f"(sparsify's decoder here: {sparsify.utils.decoder_impl.__name__}, Triton's when installed, else embedding_bag; "
         "its encoder backward index_adds a (batch, k, d) product)."),
        ("Autocast: bf16 runs conca's loss under bf16 autocast and sparsify as shipped (its forward's CUDA bf16 "
         "autocast and TF32 matmuls on a GPU; CPU bf16 autocast around its forward on a CPU); none runs both in full fp32 "
         "(sparsify's undecorated forward)."),
    ]
    json_path, md_path = write_results(args.out, "bench_sparsify", payload, tables, notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
