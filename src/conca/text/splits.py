"""Which part of a text a job reads: the deterministic train / held-out split of documents, and
the contexts of one part (what harvest, evaluate and the experiments all tokenize).

Documents are streamed: the split rule needs only running totals, and tokenising stops once the
token budget is met, so memory does not grow with the corpus."""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Iterator

from conca.errors import ConfigError, InputError
from conca.text.batching import Contexts, tokenize_contexts
from conca.text.corpus import BUILTIN_CORPORA, interleave, iter_documents, parse_text_sources

SPLIT_PARTS = ("train", "heldout")


def _check_fraction(heldout_fraction: float) -> None:
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")


def _too_few(n_documents: int, heldout_fraction: float) -> InputError:
    return InputError(f"text has {n_documents} documents: too few to hold out a {heldout_fraction:.0%} share")


def assign_documents(documents: Iterable[str], heldout_fraction: float) -> Iterator[tuple[bool, str]]:
    """(held_out, document) for each document, lazily. A document is held out when that brings the
    held-out share of characters closer to `heldout_fraction`, so documents of very unequal length
    still give about that fraction of the text; the rule needs only running totals.

    Splitting documents (not contexts) keeps held-out text unseen whatever the token budget. Raises
    when the documents run out and one part got none."""
    _check_fraction(heldout_fraction)
    held_chars = total_chars = 0
    counts = [0, 0]  # train, held out
    for doc in documents:
        total_chars += len(doc)
        target = heldout_fraction * total_chars
        held = abs(held_chars + len(doc) - target) < abs(held_chars - target)
        if held:
            held_chars += len(doc)
        counts[held] += 1
        yield held, doc
    if not all(counts):
        raise _too_few(sum(counts), heldout_fraction)


def split_part(documents: Iterable[str], heldout_fraction: float, part: str) -> Iterator[str]:
    """The documents of one part ("train" or "heldout") of the split, lazily."""
    if part not in SPLIT_PARTS:
        raise ConfigError(f"unknown split {part!r}: use train, heldout or all")
    _check_fraction(heldout_fraction)
    want = part == "heldout"
    return (doc for held, doc in assign_documents(documents, heldout_fraction) if held == want)


def split_documents(documents: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Both parts of the split of a list of documents: (train, held-out)."""
    train_docs: list[str] = []
    heldout: list[str] = []
    for held, doc in assign_documents(documents, heldout_fraction):
        (heldout if held else train_docs).append(doc)
    return train_docs, heldout


def mixed_part(text: str | None, split: str, heldout_fraction: float = 0.1, text_field: str = "text",
               allow_download: bool = False) -> Iterator[str]:
    """The documents of one part of `text`, lazily. Each source of a mix (``a+b``) is split on its
    own and the parts are interleaved, so a source's held-out documents are the same alone or in
    any mix: training on ``pydoc+docstrings`` never sees the text that evaluating on ``pydoc``
    holds out."""
    sources = parse_text_sources(text)
    parts = [iter_documents(source, text_field=text_field, allow_download=allow_download) for source in sources]
    if split != "all":
        parts = [split_part(documents, heldout_fraction, split) for documents in parts]
    return parts[0] if len(parts) == 1 else interleave(parts)


def contexts_for(tokenizer, text: str | None, split: str, tokens: int, ctx_len: int,
                 heldout_fraction: float = 0.1, text_field: str = "text", allow_download: bool = False) -> Contexts:
    """About `tokens` masked-in tokens of the `split` ("train" / "heldout" / "all") part of `text`,
    reading documents only until they are tokenised."""
    if split != "all" and split not in SPLIT_PARTS:
        raise ConfigError(f"unknown split {split!r}: use train, heldout or all")
    documents = mixed_part(text, split, heldout_fraction, text_field, allow_download)
    return tokenize_contexts(documents, tokenizer, ctx_len=ctx_len, max_contexts=max(1, math.ceil(tokens / (ctx_len - 1))))


def check_text(text: str | None, text_field: str = "text", allow_download: bool = False) -> None:
    """Cheap checks of a --text value before the model loads: every part of a mix is a known
    built-in, an hf: name or a local file, and each local file exists, has a supported format and
    starts with a readable document (a missing, empty or unreadable file is refused first; the rest
    of a file, the built-in corpora and hf: datasets are read when they are used)."""
    for part in parse_text_sources(text):
        if part not in BUILTIN_CORPORA and not part.startswith("hf:"):
            next(itertools.islice(iter_documents(part, text_field=text_field, allow_download=allow_download), 1))
