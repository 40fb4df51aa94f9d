"""Harvest throughput against a bare forward pass of the same model over the same contexts.

    python benchmarks/bench_harvest.py --out benchmarks/results/            # ~16k tokens
    python benchmarks/bench_harvest.py --out benchmarks/results/ --quick    # ~4k tokens

The default model (SmolLM2-135M) on the default corpus, batch 8 contexts of 128 tokens. Each
round times, in turn, (a) the bare forward `model(input_ids)` (logits included), (b) the bare
forward of the transformer body only (`model.model(input_ids)`, what the `final` site needs), and
(c) `harvest` of the `final` site into a fresh store (hooks, masking, copies, serialising,
checksumming and atomically writing shards on a background thread). The contexts are cut into
slices of --slice-contexts; for each slice the three run back to back (in rotating order), so
that background load drifting over minutes hits all three alike. A method's rate is its total
positions over its total time; the spread over slices is reported too. Tokens/s counts every
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
    parser.add_argument("--slice-contexts", type=int, default=16, help="contexts per slice (one harvest shard each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sites", default="final")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens = 4096

    from conca.activations.harvest import harvest
    from conca.text.splits import contexts_for
    from conca.models.load import load_model
    from conca.runtime.device import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(device=device)
    contexts = contexts_for(loaded.tokenizer, "pydoc", "train", tokens=args.tokens, ctx_len=128)
    positions = contexts.ids.numel()
    body = getattr(loaded.model, "model", None)

    @torch.inference_mode()
    def bare(module, part) -> float:
        start = time.perf_counter()
        for b in range(0, len(part), args.batch_size):
            module(input_ids=part.ids[b:b + args.batch_size].to(device), use_cache=False)
        sync(device)
        return time.perf_counter() - start

    def harvested(part) -> float:
        out = Path(tempfile.mkdtemp(prefix="conca_bench_harvest_"))
        try:
            start = time.perf_counter()
            harvest(loaded, part, args.sites, out, batch_size=args.batch_size, shard_contexts=len(part), progress=False)
            sync(device)
            return time.perf_counter() - start
        finally:
            shutil.rmtree(out, ignore_errors=True)

    runs = {"forward": lambda part: bare(loaded.model, part), "harvest": harvested}
    if body is not None:
        runs["body"] = lambda part: bare(body, part)
    bare(loaded.model, contexts.subset(0, min(len(contexts), args.batch_size)))  # warm-up
    times = {name: [] for name in runs}
    slices = range(0, len(contexts), args.slice_contexts)
    for i, start in enumerate(slices):
        part = contexts.subset(start, min(start + args.slice_contexts, len(contexts)))
        names = list(runs)
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(runs[name](part))
    rate = {k: positions / sum(v) for k, v in times.items()}
    payload = {"config": {**vars(args), "out": str(args.out), "model": loaded.name, "contexts": len(contexts),
                          "positions": positions, "stored_tokens": int(contexts.mask.sum())},
               "seconds": times, "tokens_per_s": rate,
               "harvest_over_forward": rate["harvest"] / rate["forward"],
               "harvest_over_body": rate["harvest"] / rate["body"] if "body" in rate else None}
    spread = {k: [min(v), max(v)] for k, v in times.items()}
    payload["slice_seconds_min_max"] = spread
    rows = [["bare forward, model(input_ids) with logits", rate["forward"], 1.0]]
    if "body" in rate:
        rows.append(["bare forward, transformer body only (model.model)", rate["body"], rate["body"] / rate["forward"]])
    rows.append([f"conca harvest --sites {args.sites} (writes shards)", rate["harvest"], rate["harvest"] / rate["forward"]])
    notes = [f"{len(contexts)} contexts × 128 positions = {positions} positions, batch {args.batch_size}, in slices of "
             f"{args.slice_contexts} contexts run back to back by all three; tokens/s counts every position for all rows.",
             "harvest stops the forward after the deepest requested site, so for `final` it skips the unembedding that "
             "the full forward computes; the body-only row is the like-for-like compute."]
    json_path, md_path = write_results(args.out, "bench_harvest", payload,
                                       [("Harvest vs bare forward, same model and contexts", ["what", "tokens/s", "vs bare forward"], rows)],
                                       notes)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
