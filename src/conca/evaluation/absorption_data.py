"""The first-letter task on a loaded model: vocabulary words, SAEBench's prompts, activations, one runner.

Follows SAEBench 0.6.0 ``sae_bench/evals/absorption/vocab.py`` (``get_alpha_tokens``: vocabulary tokens
that are letters only, optionally after one leading space) and ``prompting.py``/``eval_config.py``
(``create_icl_prompt`` with ``"{word} has the first letter:"``, 10 in-context examples answered
``" X"`` (upper-case first letter), examples joined by and started with a newline; activations read at
the word's token). The activation is read at the word as the last token of the prompt: the model is
causal, so what follows the word (" has the first letter:") cannot change it. Letters and tokens per
letter are capped to keep the run to minutes on a CPU.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence

import torch

from conca.errors import InputError
from conca.evaluation.absorption import LETTERS, absorption
from conca.models.load import LoadedModel
from conca.models.sites import Site, run_to_sites

TEMPLATE = "{word} has the first letter:"
_ALPHA = set(string.ascii_letters)


def alpha_vocab(tokenizer) -> list[tuple[int, str]]:
    """(token id, text) of the vocabulary tokens that are ASCII letters only, after at most one leading space."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    out = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        word = text.removeprefix(" ")
        if word and set(word) <= _ALPHA:
            out.append((token_id, text))
    return out


def _answer(word: str) -> str:
    return " " + word.strip()[0].upper()


def first_letter_prompts(tokenizer, vocab: Sequence[tuple[int, str]], chosen: Sequence[tuple[int, str]],
                         n_icl: int = 10, seed: int = 0) -> list[list[int]]:
    """Token ids per chosen word: [BOS] "\\n" + n_icl answered examples, each on its own line, then the word."""
    rng = random.Random(seed)
    words = [w for _, w in vocab]
    bos = getattr(tokenizer, "bos_token_id", None)
    prompts = []
    for token_id, word in chosen:
        examples = [w for w in rng.sample(words, min(len(words), n_icl + 1)) if w != word][:n_icl]
        context = "\n" + "\n".join(TEMPLATE.format(word=w) + _answer(w) for w in examples) + "\n"
        ids = tokenizer(context, add_special_tokens=False).input_ids + [token_id]
        prompts.append(([bos] if bos is not None else []) + ids)
    return prompts


@torch.inference_mode()
def first_letter_activations(loaded: LoadedModel, site: Site | str, *, max_tokens_per_letter: int = 50,
                             letters: str = LETTERS, n_icl: int = 10, seed: int = 0,
                             batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(x (N, d) at each word's token, first letters (N,) as indices into LETTERS, the words)."""
    site = Site.parse(site)
    vocab = alpha_vocab(loaded.tokenizer)
    if not vocab:
        raise InputError("the tokenizer has no alphabetic tokens for the first-letter task")
    rng = random.Random(seed)
    chosen: list[tuple[int, str]] = []
    for letter in letters:
        pool = [t for t in vocab if t[1].strip()[0].lower() == letter]
        chosen += rng.sample(pool, min(len(pool), max_tokens_per_letter))
    prompts = first_letter_prompts(loaded.tokenizer, vocab, chosen, n_icl=n_icl, seed=seed)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    device = next(loaded.model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    x = None
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        # Right padding: a causal model's activations at real positions do not see the pad tokens.
        ids = torch.tensor([prompts[i] + [pad] * (width - len(prompts[i])) for i in rows], device=device)
        acts = run_to_sites(loaded.model, ids, [site])[site].float().cpu()
        last = torch.tensor([len(prompts[i]) - 1 for i in rows])
        if x is None:
            x = torch.zeros(len(prompts), acts.shape[-1])
        x[torch.tensor(rows)] = acts[torch.arange(len(rows)), last]
    first = torch.tensor([LETTERS.index(w.strip()[0].lower()) for _, w in chosen])
    return x, first, [w for _, w in chosen]


def absorption_on_model(loaded: LoadedModel, site: Site | str, dictionaries: Mapping[str, object], *,
                        max_tokens_per_letter: int = 50, seed: int = 0, batch_size: int = 32, **options) -> dict:
    """{name: absorption result} for each dictionary; the model runs once. `options` go to `absorption`."""
    x, letters, _ = first_letter_activations(loaded, site, max_tokens_per_letter=max_tokens_per_letter,
                                             seed=seed, batch_size=batch_size)
    out = {}
    for name, dictionary in dictionaries.items():
        with torch.no_grad():
            codes = dictionary.encode(x).float()
        out[name] = absorption(x, letters, dictionary, codes, seed=seed, **options)
        out[name]["max_tokens_per_letter"] = max_tokens_per_letter
    return out
