"""Harvest throughput against a bare forward pass of the same model over the same contexts.

    python benchmarks/bench_harvest.py --out benchmarks/results/            # ~16k tokens
    python benchmarks/bench_harvest.py --out benchmarks/results/ --quick    # ~4k tokens

The default model (SmolLM2-135M) on the default corpus, batch 8 contexts of 128 tokens. Each
round times, in turn, (a) the bare forward `model(input_ids)` (logits included), (b) the bare
forward of the transformer body only (`model.model(input_ids)`, what the `final` site needs), and
(c) `harvest` of the `final` site into a fresh store (hooks, masking, copies, serialising,
checksumming and atomically writing shards on a background thread). Rounds alternate so that
background load hits all three alike; the best round of each counts. Tokens/s counts every
position of the contexts for all three, so the ratio is a ratio of times.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sites", default="final")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds = 4096, 2

    from conca.activations.harvest import harvest
    from conca.experiments.pipeline import contexts_for
    from conca.models.load import load_model
    from conca.training.trainer import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(device=device)
    contexts = contexts_for(loaded.tokenizer, "pydoc", "train", tokens=args.tokens, ctx_len=128)
    positions = contexts.ids.numel()
    body = getattr(loaded.model, "model", None)

    @torch.inference_mode()
    def bare(module) -> float:
        start = time.perf_counter()
        for b in range(0, len(contexts), args.batch_size):
            module(input_ids=contexts.ids[b:b + args.batch_size].to(device), use_cache=False)
        sync(device)
        return time.perf_counter() - start

    def harvested() -> float:
        out = Path(tempfile.mkdtemp(prefix="conca_bench_harvest_"))
        try:
            start = time.perf_counter()
            harvest(loaded, contexts, args.sites, out, batch_size=args.batch_size, progress=False)
            sync(device)
            return time.perf_counter() - start
        finally:
            shutil.rmtree(out, ignore_errors=True)

    bare(loaded.model)  # warm-up
    times = {"forward": [], "body": [], "harvest": []}
    for _ in range(args.rounds):
        times["forward"].append(bare(loaded.model))
        if body is not None:
            times["body"].append(bare(body))
        times["harvest"].append(harvested())
    best = {k: min(v) for k, v in times.items() if v}
    rate = {k: positions / t for k, t in best.items()}
    payload = {"config": {**vars(args), "out": str(args.out), "model": loaded.name, "contexts": len(contexts),
                          "positions": positions, "stored_tokens": int(contexts.mask.sum())},
               "seconds": times, "tokens_per_s": rate,
               "harvest_over_forward": rate["harvest"] / rate["forward"],
               "harvest_over_body": rate["harvest"] / rate["body"] if "body" in rate else None}
    rows = [["bare forward, model(input_ids) with logits", rate["forward"], 1.0]]
    if "body" in rate:
        rows.append(["bare forward, transformer body only (model.model)", rate["body"], rate["body"] / rate["forward"]])
    rows.append([f"conca harvest --sites {args.sites} (writes shards)", rate["harvest"], rate["harvest"] / rate["forward"]])
    notes = [f"{len(contexts)} contexts × 128 positions = {positions} positions, batch {args.batch_size}, best of {args.rounds} "
             "alternating rounds; tokens/s counts every position for all rows.",
             "harvest stops the forward after the deepest requested site, so for `final` it skips the unembedding that "
             "the full forward computes; the body-only row is the like-for-like compute."]
    json_path, md_path = write_results(args.out, "bench_harvest", payload,
                                       [("Harvest vs bare forward, same model and contexts", ["what", "tokens/s", "vs bare forward"], rows)],
                                       notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
