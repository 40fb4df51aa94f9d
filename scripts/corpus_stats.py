"""Print what the built-in ``docstrings`` corpus holds: documents and characters per package, and its
size in tokens of the default model's tokenizer (the tokenizer only, read from the GGUF file; ~10 s).

Run from the repository: ``python scripts/corpus_stats.py`` (builds and caches the corpus on first use).
"""

from __future__ import annotations

import time

from conca.text.docstrings import corpus_summary, docstring_documents


def main() -> None:
    start = time.perf_counter()
    summary = corpus_summary()
    seconds = time.perf_counter() - start
    print(f"{'package':<18}{'documents':>10}{'characters':>13}")
    for package, entry in summary.items():
        print(f"{package:<18}{entry['documents']:>10}{entry['characters']:>13}")
    print(f"(corpus loaded in {seconds:.1f} s)")

    from pathlib import Path

    from transformers import AutoTokenizer

    from conca.models.load import default_gguf_path

    gguf = Path(default_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    docs = list(docstring_documents())
    tokens = sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])
    chars = summary["total"]["characters"]
    print(f"tokens (SmolLM2 tokenizer): {tokens}  ({chars / tokens:.2f} characters per token); "
          f"a 90 % train split holds about {int(0.9 * tokens)}")


if __name__ == "__main__":
    main()
