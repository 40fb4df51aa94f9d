"""Harvest throughput, fp32 vs bf16, against bare forwards of the same model, and what bf16 costs.

    python benchmarks/bench_harvest.py --out benchmarks/results/              # 32k tokens, ~8 min on 2 cores
    python benchmarks/bench_harvest.py --out DIR --tokens 8192 --steps 100    # a quick look

The default model (SmolLM2-135M) on the default corpus's training split, 128-token contexts.
Timed, in the same process, slice by slice in rotating order (so that load drifting over minutes
hits all alike):
  - bare forwards: `model(input_ids)` in fp32 (logits included), the transformer body
    `model.model(input_ids)` in fp32 (the compute a `final` harvest needs), and the body under plain
    bf16 autocast (the "bare bf16 forward");
  - harvest as it was (fp32 forward, eager, batch 8) and as it is at scale (`--forward-dtype auto`,
    which is bf16 on this CPU, `--compile on`, batch 16), both storing fp32, each resuming its
    own store slice by slice (hooks, masking, copies, serialising, checksums, atomic writes).
Tokens/s counts every position of the contexts, so ratios are ratios of times. Each method runs
once on a warm-up batch first (for the compiled harvest: compiling).

Then the accuracy cost: the max / mean absolute difference between the two stores' activations,
and a TopK SAE trained on each (same seed, batches and settings as the demo) evaluated on the
same held-out text with the fp32 model: explained variance and CE-loss recovered side by side.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sync, write_results  # noqa: E402

HARVESTS = {  # name: (forward_dtype, compile, batch_size)
    "harvest_fp32": ("fp32", "off", 8),
    "harvest_bf16": ("auto", "on", 16),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tokens", type=int, default=32768, help="training tokens harvested by each harvest run")
    parser.add_argument("--slice-contexts", type=int, default=32, help="contexts per slice (one shard each)")
    parser.add_argument("--steps", type=int, default=500, help="TopK training steps for the accuracy comparison")
    parser.add_argument("--eval-tokens", type=int, default=3072)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from conca.activations.harvest import harvest
    from conca.models.load import load_model
    from conca.models.precision import resolve_forward_dtype
    from conca.runtime.device import resolve_device
    from conca.text.splits import contexts_for

    device = resolve_device(args.device)
    loaded = load_model(device=device)
    contexts = contexts_for(loaded.tokenizer, "pydoc", "train", tokens=args.tokens, ctx_len=128)
    positions = contexts.ids.numel()
    body = loaded.model.model
    work = Path(tempfile.mkdtemp(prefix="conca_bench_harvest_"))

    @torch.inference_mode()
    def bare(module, part, batch: int = 8, autocast: bool = False) -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            for b in range(0, len(part), batch):
                module(input_ids=part.ids[b:b + batch].to(device), use_cache=False)
        sync(device)
        return time.perf_counter() - start

    def harvested(name: str, upto: int, out: Path | None = None) -> float:
        forward_dtype, compile, batch = HARVESTS[name]
        start = time.perf_counter()
        harvest(loaded, contexts.subset(0, upto), "final", out or work / name, batch_size=batch,
                shard_contexts=args.slice_contexts, progress=False, forward_dtype=forward_dtype, compile=compile)
        sync(device)
        return time.perf_counter() - start

    for name in HARVESTS:  # warm-up (and compile) on a throw-away store
        harvested(name, HARVESTS[name][2], out=work / f"warmup_{name}")
    bare(loaded.model, contexts.subset(0, 8))
    bare(body, contexts.subset(0, 8), autocast=True)

    times: dict[str, list[float]] = {"forward_fp32": [], "body_fp32": [], "body_bf16": [], **{n: [] for n in HARVESTS}}
    for i, start in enumerate(range(0, len(contexts), args.slice_contexts)):
        stop = min(start + args.slice_contexts, len(contexts))
        part = contexts.subset(start, stop)
        runs = {"forward_fp32": lambda: bare(loaded.model, part), "body_fp32": lambda: bare(body, part),
                "body_bf16": lambda: bare(body, part, autocast=True),
                **{n: (lambda n=n: harvested(n, stop)) for n in HARVESTS}}
        names = list(runs)
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(runs[name]())
    rate = {k: positions / sum(v) for k, v in times.items()}
    accuracy = compare_stores(loaded, work, args)
    resolved = resolve_forward_dtype("auto", device)

    payload = {"config": {**vars(args), "out": str(args.out), "model": loaded.name, "contexts": len(contexts),
                          "positions": positions, "stored_tokens": contexts.n_tokens, "auto_forward_dtype": resolved,
                          "harvests": HARVESTS},
               "seconds": times, "tokens_per_s": rate,
               "bf16_harvest_over_fp32_harvest": rate["harvest_bf16"] / rate["harvest_fp32"],
               "bf16_harvest_over_bare_bf16_body": rate["harvest_bf16"] / rate["body_bf16"],
               "accuracy": accuracy}
    rows = [["bare forward fp32, model(input_ids) with logits", rate["forward_fp32"], 1.0],
            ["bare forward fp32, body only (model.model)", rate["body_fp32"], rate["body_fp32"] / rate["forward_fp32"]],
            ["bare forward bf16 autocast, body only", rate["body_bf16"], rate["body_bf16"] / rate["forward_fp32"]],
            ["conca harvest, fp32 forward, batch 8 (before)", rate["harvest_fp32"],
             rate["harvest_fp32"] / rate["forward_fp32"]],
            [f"conca harvest, --forward-dtype auto ({resolved}) --compile on, batch 16", rate["harvest_bf16"],
             rate["harvest_bf16"] / rate["forward_fp32"]]]
    acc_rows = [[k, accuracy[k]["explained_variance"], accuracy[k]["ce_loss_recovered"], accuracy[k]["l0"]]
                for k in HARVESTS]
    acc_rows.append(["difference (bf16 - fp32)",
                     accuracy["harvest_bf16"]["explained_variance"] - accuracy["harvest_fp32"]["explained_variance"],
                     accuracy["harvest_bf16"]["ce_loss_recovered"] - accuracy["harvest_fp32"]["ce_loss_recovered"], ""])
    notes = [f"{len(contexts)} contexts × 128 positions = {positions} positions in slices of {args.slice_contexts} "
             "contexts, every method on every slice in rotating order; tokens/s counts every position.",
             f"bf16 harvest / fp32 harvest: {payload['bf16_harvest_over_fp32_harvest']:.2f}×; bf16 harvest / bare bf16 "
             f"body forward: {payload['bf16_harvest_over_bare_bf16_body']:.2f}×.",
             f"Activations, bf16 vs fp32 forward, same {accuracy['tokens']} tokens: max |Δ| "
             f"{accuracy['max_abs_diff']:.4g}, mean |Δ| {accuracy['mean_abs_diff']:.4g} (mean |x| {accuracy['mean_abs']:.4g}).",
             f"TopK (expansion 4, k 32, {args.steps} steps of 1024, lr 1e-3, seed 0) trained on each store, evaluated "
             f"on {accuracy['eval_tokens']} held-out pydoc tokens with the fp32 model."]
    json_path, md_path = write_results(args.out, "bench_harvest", payload,
                                       [("Harvest vs bare forwards, same model and contexts",
                                         ["what", "tokens/s", "vs bare fp32 forward"], rows),
                                        ("Accuracy: a TopK SAE trained on each harvest",
                                         ["store", "EV", "CE-loss recovered", "L0"], acc_rows)], notes)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {json_path} and {md_path}")


def compare_stores(loaded, work: Path, args) -> dict:
    from conca.activations.store import ActivationStore
    from conca.evaluation.dictionary import evaluate_dictionary
    from conca.experiments.pipeline import TrainOptions, run_train
    from conca.text.splits import contexts_for

    acts = {}
    for name in HARVESTS:
        store = ActivationStore.open(work / name)
        acts[name] = torch.cat([store.load_shard(i)["act.final"] for i in range(len(store.manifest.shards))])
    diff = (acts["harvest_bf16"] - acts["harvest_fp32"]).abs()
    heldout = contexts_for(loaded.tokenizer, "pydoc", "heldout", tokens=args.eval_tokens, ctx_len=128)
    result = {"tokens": int(diff.shape[0]), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
              "mean_abs": float(acts["harvest_fp32"].abs().mean()), "eval_tokens": heldout.n_tokens}
    for name in HARVESTS:
        opts = TrainOptions(activations=str(work / name), out=str(work / f"train_{name}"), method="topk", expansion=4,
                            k=32, steps=args.steps, batch_size=1024, lr=1e-3, seed=0, progress=False,
                            dead_after_tokens=20 * 1024, eval_every=max(1, args.steps // 5))
        trained, _ = run_train(opts, name="topk")
        metrics, _ = evaluate_dictionary(loaded, trained.dictionaries["topk"], "final", heldout)
        result[name] = {k: float(metrics[k]) for k in ("explained_variance", "ce_loss_recovered", "l0")}
    return result


if __name__ == "__main__":
    main()
