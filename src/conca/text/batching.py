"""Turning documents into fixed-length token contexts for activation harvesting."""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass
from typing import Iterable

import torch

from conca.errors import ConfigError, InputError

_TOKENIZE_BATCH = 64  # documents per tokenizer call


@dataclass
class Contexts:
    """Fixed-length token contexts.

    ``ids`` is ``(n_contexts, ctx_len)`` int64; ``mask`` is the same shape, bool, True where the
    position holds a real text token to train on and False at BOS/EOS/other special tokens.
    """

    ids: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.mask.shape or self.ids.dim() != 2:
            raise InputError(f"contexts need 2-d ids and mask of the same shape, got "
                             f"{tuple(self.ids.shape)} and {tuple(self.mask.shape)}")

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def ctx_len(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def subset(self, start: int, stop: int) -> "Contexts":
        return Contexts(self.ids[start:stop], self.mask[start:stop])


def _token_id(tokenizer, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return int(value) if isinstance(value, int) else None


def tokenize_contexts(documents: Iterable[str], tokenizer, ctx_len: int = 128, max_contexts: int | None = None,
                      prepend_bos: bool = True, mask_special: bool = True) -> Contexts:
    """Join documents (EOS between them) into one token stream and cut it into contexts.

    With ``prepend_bos`` and a tokenizer that has a BOS token, each context is
    ``[bos] + ctx_len - 1`` stream tokens; otherwise ``ctx_len`` stream tokens. The trailing
    incomplete context is dropped. Documents (any iterable, read lazily) are tokenised in batches
    and only until ``max_contexts`` contexts exist: at most one batch more than needed is read.
    """
    try:
        ctx_len = operator.index(ctx_len)
    except TypeError:
        raise ConfigError(f"ctx_len must be an integer, got {ctx_len!r}") from None
    if ctx_len < 2:
        raise ConfigError(f"ctx_len must be at least 2, got {ctx_len}")
    if max_contexts is not None and max_contexts < 1:
        raise ConfigError(f"max_contexts must be at least 1, got {max_contexts!r}")

    bos = _token_id(tokenizer, "bos_token_id") if prepend_bos else None
    eos = _token_id(tokenizer, "eos_token_id")
    body = ctx_len - 1 if bos is not None else ctx_len

    stream: list[int] = []
    rows: list[list[int]] = []
    consumed = 0  # position in `stream` where the next context starts
    n_stream_tokens = 0
    first_doc = True
    documents = iter(documents)
    while raw := list(itertools.islice(documents, _TOKENIZE_BATCH)):
        batch = [d for d in raw if d]
        if not batch:
            continue
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if not ids:
                continue
            if not first_doc and eos is not None:
                stream.append(eos)
            stream.extend(ids)
            first_doc = False
        while len(stream) - consumed >= body:
            chunk = stream[consumed:consumed + body]
            consumed += body
            rows.append([bos] + chunk if bos is not None else chunk)
            if max_contexts is not None and len(rows) >= max_contexts:
                break
        n_stream_tokens += consumed
        stream = stream[consumed:]
        consumed = 0
        if max_contexts is not None and len(rows) >= max_contexts:
            break
    n_stream_tokens += len(stream)

    if not rows:
        raise InputError(f"text too short: the corpus has {n_stream_tokens} tokens but one context of "
                         f"ctx_len={ctx_len} needs {body} text tokens"
                         + (" (plus BOS)" if bos is not None else ""))

    ids = torch.tensor(rows, dtype=torch.long)
    if mask_special:
        special = sorted({int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])})
        if special:
            mask = ~torch.isin(ids, torch.tensor(special, dtype=torch.long))
        else:
            mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = torch.ones_like(ids, dtype=torch.bool)
    return Contexts(ids=ids, mask=mask)


def split_contexts(contexts: Contexts, heldout_fraction: float = 0.1) -> tuple[Contexts, Contexts]:
    """Split into (train, heldout): the last ``ceil(n * heldout_fraction)`` contexts are held out."""
    if not (isinstance(heldout_fraction, (int, float)) and 0.0 < heldout_fraction < 1.0):
        raise ConfigError(f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction!r}")
    n = len(contexts)
    n_heldout = math.ceil(n * heldout_fraction)
    n_train = n - n_heldout
    if n_train < 1 or n_heldout < 1:
        raise ConfigError(f"cannot split {n} contexts with heldout_fraction={heldout_fraction}: "
                          f"{n_train} train and {n_heldout} held-out; both parts must be non-empty")
    return contexts.subset(0, n_train), contexts.subset(n_train, n)
