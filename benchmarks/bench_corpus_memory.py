"""Peak memory of reading a text corpus of N vs 10·N bytes, per format (.txt, .jsonl, .parquet).

    python benchmarks/bench_corpus_memory.py --out benchmarks/results/            # N = 20 MB
    python benchmarks/bench_corpus_memory.py --out benchmarks/results/ --mb 5     # quicker

The corpora are synthetic (documents of random English-like words, written once to --cache).
Each measurement is a fresh child process that reports its own peak resident memory (VmHWM of
/proc/self/status: wait4's ru_maxrss would carry over the parent's peak from before the exec):

Every child first imports what it needs (conca.text; pyarrow for parquet; torch for contexts):
"after imports" is its resident memory then, "peak" its high-water mark after reading.

- iterate: `iter_documents` over the whole corpus, counting characters (the streaming reader);
- contexts: `contexts_for(..., split="heldout")` with a whitespace tokenizer stub and a budget of
  200,000 tokens (the split runs over the stream; tokenising stops at the budget);
- list: `load_documents`, the whole corpus as a list of strings (what every reader did before
  streaming), for contrast.

The goal: the iterate peak at 10·N within 10 % of the peak at N.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

FORMATS = ("txt", "jsonl", "parquet")
MODES = ("iterate", "contexts", "list")


# --------------------------------------------------------------------------- corpora
def _words(rng: random.Random, n: int) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 5.9, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9, 1.5, 1, .8, .2, .15, .1, .07]
    return ["".join(rng.choices(letters, weights, k=rng.choice([1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8, 9, 11])))
            for _ in range(n)]


def _document_block(seed: int = 0, target_bytes: int = 2 << 20) -> list[str]:
    """About `target_bytes` of documents: sentences of words from a Zipf-ish vocabulary."""
    rng = random.Random(seed)
    vocab = _words(rng, 5000)
    weights = [1 / (rank + 1) for rank in range(len(vocab))]
    docs, size = [], 0
    while size < target_bytes:
        sentences = []
        for _ in range(rng.randint(2, 30)):
            words = rng.choices(vocab, weights, k=rng.randint(4, 25))
            sentences.append(" ".join(words).capitalize() + ".")
        doc = " ".join(sentences)
        docs.append(doc)
        size += len(doc) + 2
    return docs


def write_corpus(path: Path, fmt: str, total_bytes: int, block: list[str]) -> Path:
    """`path` holding about `total_bytes` of text: `block` repeated, each copy's documents numbered."""
    if path.exists():
        return path
    tmp = path.with_suffix(path.suffix + ".part")
    copies = max(1, round(total_bytes / sum(len(d) + 2 for d in block)))
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(tmp, pa.schema([("text", pa.string())])) as writer:
            for copy in range(copies):
                writer.write_table(pa.table({"text": [f"{copy}. {d}" for d in block]}), row_group_size=2048)
    else:
        import json

        with tmp.open("w", encoding="utf-8") as fh:
            for copy in range(copies):
                if fmt == "txt":
                    fh.write("".join(f"{copy}. {d}\n\n" for d in block))
                else:
                    fh.write("".join(json.dumps({"text": f"{copy}. {d}"}) + "\n" for d in block))
    tmp.rename(path)
    return path


# --------------------------------------------------------------------------- child side
class WhitespaceTokenizer:
    """Words as token ids (hashed into 50,000), BOS 0 and EOS 1: enough for contexts_for."""

    bos_token_id, eos_token_id, all_special_ids = 0, 1, [0, 1]

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + hash(w) % 50_000 for w in t.split()] for t in texts]}


def _status_kib(field: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(field + ":")).split()[1])


def child(mode: str, path: str) -> None:
    """Read `path` as `mode` says; print the resident memory after the imports and the peak."""
    from conca.text.corpus import iter_documents, load_documents

    if mode == "contexts":
        from conca.text.splits import contexts_for  # imports torch (the reader alone does not)
    if path.endswith(".parquet"):
        import pyarrow.parquet  # noqa: F401
    print("imports_KiB", _status_kib("VmRSS"))
    if mode == "iterate":
        chars = docs = 0
        for doc in iter_documents(path):
            chars += len(doc)
            docs += 1
        print(docs, chars)
    elif mode == "contexts":
        ctx = contexts_for(WhitespaceTokenizer(), path, "heldout", tokens=200_000, ctx_len=128)
        print(len(ctx))
    elif mode == "list":
        print(len(load_documents(path)))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("VmHWM_KiB", _status_kib("VmHWM"))


# --------------------------------------------------------------------------- parent side
def measure(mode: str, path: Path) -> tuple[float, float, float]:
    """(peak RSS, RSS after the imports, both in MiB; seconds) of one child process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {path} failed: {done.stderr[-2000:]}")
    seconds = time.perf_counter() - start
    found = dict(line.split() for line in done.stdout.splitlines() if "_KiB " in line)
    return int(found["VmHWM_KiB"]) / 1024, int(found["imports_KiB"]) / 1024, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--mb", type=float, default=20.0, help="N in MB of text; the large corpora hold 10·N")
    parser.add_argument("--cache", type=Path, default=None, help="where the corpora are written (default: the "
                                                                  "benchmark cache, $CONCA_BENCH_CACHE)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import DEFAULT_CACHE, write_results

    cache = (args.cache or DEFAULT_CACHE / "corpus_memory") / f"{args.mb:g}MB"
    cache.mkdir(parents=True, exist_ok=True)
    block = _document_block()
    sizes = {"N": int(args.mb * 1e6), "10N": int(10 * args.mb * 1e6)}
    rows, results = [], []
    for fmt in FORMATS:
        peaks = {}
        for label, total in sizes.items():
            path = write_corpus(cache / f"{label}.{fmt}", fmt, total, block)
            for mode in MODES:
                peak, imports, seconds = measure(mode, path)
                peaks[label, mode] = peak, imports
                results.append({"format": fmt, "size": label, "file_mb": path.stat().st_size / 1e6, "mode": mode,
                                "peak_rss_mib": round(peak, 1), "rss_after_imports_mib": round(imports, 1),
                                "seconds": round(seconds, 2)})
                print(f"{fmt:8s} {label:4s} {mode:9s} {peak:8.1f} MiB ({imports:.1f} after imports) {seconds:6.1f} s",
                      flush=True)
        for mode in MODES:
            (small, small_base), (large, large_base) = peaks["N", mode], peaks["10N", mode]
            rows.append([fmt, mode, round(small, 1), round(large, 1), f"{large / small:.3f}",
                         round(small - small_base, 1), round(large - large_base, 1),
                         ("yes" if large <= 1.1 * small else "no") if mode != "list" else "(contrast)"])
    files = {fmt: {label: (cache / f"{label}.{fmt}").stat().st_size / 1e6 for label in sizes} for fmt in FORMATS}
    header = ["format", "reading", "peak N (MiB)", "peak 10N (MiB)", "ratio 10N/N", "peak above imports N",
              "peak above imports 10N", "within 10 %"]
    notes = [f"N = {args.mb:g} MB of text; file sizes (MB): "
             + "; ".join(f"{fmt} {v['N']:.0f} / {v['10N']:.0f}" for fmt, v in files.items()),
             "peak = the child process's VmHWM (includes the Python interpreter and its imports: pyarrow for parquet, torch for contexts); "
             "above imports = peak minus its resident memory once the imports were done",
             "iterate = iter_documents over the whole corpus; contexts = contexts_for(split='heldout', 200,000 "
             "tokens) with a whitespace tokenizer; list = load_documents (the whole corpus in memory, as before "
             "streaming)"]
    write_results(args.out, "bench_corpus_memory", {"mb": args.mb, "files_mb": files, "runs": results},
                  [("Peak resident memory, corpus of N vs 10·N", header, rows)], notes)


if __name__ == "__main__":
    main()
