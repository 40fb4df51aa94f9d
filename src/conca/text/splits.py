"""Which part of a text a job reads: the deterministic train / held-out split of documents, and
the contexts of one part (what harvest, evaluate and the experiments all tokenize)."""

from __future__ import annotations

import math

from conca.errors import ConfigError, InputError
from conca.text.batching import Contexts, tokenize_contexts
from conca.text.corpus import DEFAULT_CORPUS, load_documents

def split_documents(documents: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic, interleaved split: a document is held out when that brings the held-out share
    of characters closer to `heldout_fraction`, so documents of very unequal length still give
    about that fraction of the text.

    Splitting documents (not contexts) keeps held-out text unseen whatever the token budget."""
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    train_docs, heldout = [], []
    held_chars = total_chars = 0
    for doc in documents:
        total_chars += len(doc)
        target = heldout_fraction * total_chars
        if abs(held_chars + len(doc) - target) < abs(held_chars - target):
            heldout.append(doc)
            held_chars += len(doc)
        else:
            train_docs.append(doc)
    if not heldout or not train_docs:
        raise InputError(f"text has {len(documents)} documents: too few to hold out a {heldout_fraction:.0%} share")
    return train_docs, heldout


def contexts_for(tokenizer, text: str | None, split: str, tokens: int, ctx_len: int,
                 heldout_fraction: float = 0.1, text_field: str = "text", allow_download: bool = False) -> Contexts:
    """About `tokens` masked-in tokens of the `split` ("train" / "heldout" / "all") part of `text`."""
    documents = load_documents(text, text_field=text_field, allow_download=allow_download)
    if split != "all":
        train_docs, heldout = split_documents(documents, heldout_fraction)
        documents = {"train": train_docs, "heldout": heldout}.get(split)
        if documents is None:
            raise ConfigError(f"unknown split {split!r}: use train, heldout or all")
    return tokenize_contexts(documents, tokenizer, ctx_len=ctx_len, max_contexts=max(1, math.ceil(tokens / (ctx_len - 1))))


def check_text(text: str | None, text_field: str = "text", allow_download: bool = False) -> None:
    """Read a local --text file once before the model loads, so that a missing, empty or unreadable
    file is refused first (the built-in corpus and hf: datasets are read when they are used)."""
    if text and text != DEFAULT_CORPUS and not text.startswith("hf:"):
        load_documents(text, text_field=text_field, allow_download=allow_download)
