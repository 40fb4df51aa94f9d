"""Peak memory of `conca train` from an activation store of N tokens vs 10·N tokens, same steps.

    python benchmarks/bench_memory.py --out benchmarks/results/            # N = 65,536 (stores of 150 MB and 1.5 GB)
    python benchmarks/bench_memory.py --out benchmarks/results/ --quick    # N = 16,384

The stores hold synthetic activations (d = 576, fp32, shards of 8,128 tokens as `conca harvest`
writes them): peak memory depends on shapes, not on values. Each run is a separate `conca train`
process (TopK, 4608 latents, batch 4096); its peak resident memory is read from wait4's
rusage. Streaming reads a window of 4 shards at a time, so the peak should not grow with the
store.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CACHE, write_results  # noqa: E402

D = 576
SHARD = 8128  # 64 contexts x 127 text tokens


def synthetic_store(path: Path, tokens: int) -> Path:
    from conca.activations.store import ActivationStore, Manifest

    if (path / "manifest.json").exists() and ActivationStore.open(path).manifest.complete:
        return path
    store = ActivationStore.create_or_resume(path, Manifest(model="synthetic", sites=["final"], d_model=D, dtype="fp32",
                                                            ctx_len=128, n_contexts_planned=tokens // 127))
    g = torch.Generator().manual_seed(0)
    for start in range(store.manifest.n_tokens, tokens, SHARD):
        n = min(SHARD, tokens - start)
        token = torch.arange(start, start + n)  # 127 text tokens per context, after its BOS
        store.append_shard({"final": torch.randn(n, D, generator=g) + 1.0}, torch.zeros(n, dtype=torch.long),
                           (start // 127, (start + n) // 127), torch.stack([token // 127, token % 127 + 1], dim=1))
    store.mark_complete()
    return path


def peak_rss_of(command: list[str]) -> float:
    """Peak resident memory (MiB) of a child process, from its own rusage."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=65536, help="N: the small store; the large one has 10·N")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.steps = 16384, 10
    rows, runs = [], {}
    for factor in (1, 10):
        tokens = factor * args.tokens
        store = synthetic_store(args.cache / f"synthetic_{tokens}", tokens)
        out = args.cache / f"memory_run_{tokens}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        command = [sys.executable, "-m", "conca.cli", "train", "--activations", str(store), "--out", str(out),
                   "--n-latents", "4608", "--k", "32", "--batch-size", "4096", "--steps", str(args.steps),
                   "--eval-every", str(args.steps), "--checkpoint-every", str(args.steps), "--progress", "false"]
        runs[tokens] = peak_rss_of(command)
        size_mib = tokens * D * 4 / 2**20
        rows.append([f"{factor}·N = {tokens:,}", size_mib, runs[tokens]])
        print(rows[-1], flush=True)
    growth = runs[10 * args.tokens] / runs[args.tokens]
    rows.append(["ratio 10·N / N", 10.0, growth])
    payload = {"config": {**vars(args), "out": str(args.out), "cache": str(args.cache)},
               "peak_rss_mib": {str(k): v for k, v in runs.items()}, "growth": growth}
    json_path, md_path = write_results(args.out, "bench_memory", payload,
                                       [("Peak RSS of conca train vs store size (same steps)",
                                         ["store", "store size MiB", "peak RSS MiB"], rows)],
                                       [f"TopK 4608 latents, batch 4096, {args.steps} steps; synthetic fp32 activations, "
                                        "shards of 8,128 tokens; one `conca train` process per row."])
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
