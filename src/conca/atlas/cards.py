"""Latent cards: plain-data (JSON-ready) descriptions of latents built from a pass's LatentStats.

`build_cards` yields the cards of many latents (all by default) after ONE grouped read of the
source for every kept example of every latent (windows, then the highlighted values by one encode
of each distinct window token); `latent_card`, `top_contexts` and `quantile_groups` are the
one-latent versions for notebooks. `index_columns` gives the site index's per-latent columns.
Numbers are rounded to 4 significant digits; NaN becomes null.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np

from conca.atlas.collect import LatentStats
from conca.errors import ConfigError

DENSE_THRESHOLD = 0.1


class Card(dict):
    """One latent's card (the JSON shape of the atlas); `to_html()` renders it with the site's card view."""

    def to_html(self) -> str:
        from conca.atlas.site import (
            card_html,  # the site module is optional here: imported on use
        )

        return card_html(self)

    def _repr_html_(self) -> str:
        return self.to_html()


# --- numbers -------------------------------------------------------------------------------------


def round4(values) -> np.ndarray:
    """float64 array rounded to 4 significant digits, the result being the double nearest to that
    decimal (so JSON prints it short): an integer divided (or multiplied) by an exact power of ten."""
    x = np.asarray(values, dtype=np.float64)
    out = x.copy()
    ok = np.isfinite(x) & (x != 0)
    if not ok.any():
        return out
    v = x[ok]
    digits = 3 - np.floor(np.log10(np.abs(v))).astype(np.int64)
    small = digits >= 0
    r = np.empty_like(v)
    p = 10.0 ** np.clip(digits, 0, 300)
    r[small] = np.rint(v[small] * p[small]) / p[small]
    q = 10.0 ** np.clip(-digits, 0, 300)
    r[~small] = np.rint(v[~small] / q[~small]) * q[~small]
    out[ok] = r
    return out


def plain(values) -> list:
    """A rounded list for JSON: NaN -> None, exact zeros as 0."""
    return [None if math.isnan(v) else (0 if v == 0 else v) for v in round4(values).tolist()]


def number(value) -> float | None:
    return plain([value])[0]


# --- choosing examples -----------------------------------------------------------------------------


def _valid(tokens: np.ndarray, values: np.ndarray, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    keep = tokens >= 0
    tokens, values = tokens[keep], values[keep]
    return (tokens, values) if n is None else (tokens[:n], values[:n])


def quantile_picks(stats: LatentStats, latent: int, groups: int = 10, per_group: int = 5) -> list[dict]:
    """Groups of the firing distribution estimated from the latent's sample, highest first:
    {"range": [lo, hi] (the sample's quantiles), "tokens", "values"} with up to `per_group`
    sampled tokens in each (a uniform pick within the group, shown by decreasing value). Empty
    groups (ties) are left out."""
    if groups < 1 or per_group < 0:
        raise ConfigError(f"groups must be positive and per_group non-negative, got {groups}, {per_group}")
    tokens, values = _valid(stats.sample_tokens[latent], stats.sample_values[latent])
    if len(tokens) == 0:
        return []
    edges = np.quantile(values.astype(np.float64), np.linspace(0, 1, groups + 1))
    group = np.searchsorted(edges[1:-1], values, side="right")
    picks = []
    for g in range(groups - 1, -1, -1):
        members = np.nonzero(group == g)[0][:per_group]  # the sample is in random order: a uniform pick
        if len(members) == 0:
            continue
        members = members[np.argsort(-values[members], kind="stable")]
        picks.append({"range": [edges[g], edges[g + 1]], "tokens": tokens[members], "values": values[members]})
    return picks


def histogram(stats: LatentStats, latent: int, bins: int = 50) -> dict:
    """`bins` equal bins over the latent's sample of firing values, with a note saying so."""
    _, values = _valid(stats.sample_tokens[latent], stats.sample_values[latent])
    count = int(stats.fire_count[latent])
    if len(values) == 0:
        return {"edges": [], "counts": [], "note": "never fired"}
    counts, edges = np.histogram(values.astype(np.float64), bins=bins)
    which = f"all {count} firing values" if len(values) == count else \
        f"a uniform sample of {len(values)} of the {count} firing values"
    return {"edges": plain(edges), "counts": counts.tolist(), "note": f"{bins} bins over {which}"}


class _Plan:
    """Every example to show, as flat arrays (latent, token, value), and per latent where its parts
    are: {"top": (a, b), "bottom": (a, b), "quantiles": [(lo, hi, a, b)]}."""

    def __init__(self) -> None:
        self.parts: dict = {}
        self.n = 0
        self._pieces: list[tuple[int, np.ndarray, np.ndarray]] = []

    def add(self, latent: int, tokens: np.ndarray, values: np.ndarray) -> tuple[int, int]:
        a = self.n
        self._pieces.append((latent, np.asarray(tokens, np.int64), np.asarray(values, np.float32)))
        self.n += len(tokens)
        return a, self.n

    def arrays(self) -> None:
        """Join the pieces into `latent`, `token`, `value` arrays (once, after the last add)."""
        pieces = self._pieces
        self.latent = np.concatenate([np.full(len(t), j, np.int64) for j, t, _ in pieces] or [np.zeros(0, np.int64)])
        self.token = np.concatenate([t for _, t, _ in pieces] or [np.zeros(0, np.int64)])
        self.value = np.concatenate([v for _, _, v in pieces] or [np.zeros(0, np.float32)])
        self._pieces = []


def _plan(stats: LatentStats, latents: Iterable[int], top: int, groups: int, per_group: int, bottom: bool) -> _Plan:
    plan = _Plan()
    for j in latents:
        parts = {"top": plan.add(j, *_valid(stats.top_tokens[j], stats.top_values[j], top))}
        if bottom:
            parts["bottom"] = plan.add(j, *_valid(stats.bottom_tokens[j], stats.bottom_values[j], top))
        parts["quantiles"] = [(q["range"][0], q["range"][1], *plan.add(j, q["tokens"], q["values"]))
                              for q in quantile_picks(stats, j, groups, per_group)] if groups else []
        plan.parts[j] = parts
    return plan


class _Examples:
    """Windows (and, with a dictionary, highlighted values) of every planned example, read in one
    grouped pass over the source; `example(e)` gives the JSON of example e."""

    def __init__(self, plan: _Plan, source, tokenizer, dictionary, before: int, after: int) -> None:
        self.plan = plan
        plan.arrays()
        tokens = plan.token
        unique, self.row = np.unique(tokens, return_inverse=True)
        self.windows = source.window_arrays(unique, before, after)
        self.values = None
        if dictionary is not None:
            latents = plan.latent
            index = self.windows.index[self.row]
            valid = index >= 0
            values = np.zeros(index.shape, np.float32)
            from conca.atlas.collect import encode_at

            values[valid] = encode_at(dictionary, source, index[valid], np.broadcast_to(latents[:, None], index.shape)[valid])
            self.values = values
        self.text = _TokenText(tokenizer)
        self.block = (0, 0, None, [])

    def round_block(self, a: int, b: int) -> None:
        """Round the values of examples a..b (one card's) in one go for the next `examples` calls."""
        self.block = (a, b, None if self.values is None else round4(self.values[a:b]), plain(self.plan.value[a:b]))

    def examples(self, span: tuple[int, int]) -> list[dict]:
        a, b = span
        if not (self.block[0] <= a and b <= self.block[1]):
            self.round_block(a, b)
        first, _, values, targets = self.block
        out = []
        for e in range(a, b):
            i, w = e - first, int(self.row[e])
            valid = self.windows.valid(w)
            out.append({"tokens": self.text(self.windows.ids[w][valid].tolist()),
                        "values": None if values is None else [0 if v == 0 else v for v in values[i][valid].tolist()],
                        "target": int(valid[:self.windows.before].sum()), "value": targets[i],
                        "context": int(self.windows.context[w]), "position": int(self.windows.position[w])})
        return out


class _TokenText:
    """tokenizer.decode([id]) per token, cached (without a tokenizer: the ids themselves)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, ids: list[int]) -> list:
        if self.tokenizer is None:
            return list(ids)
        out = []
        for i in ids:
            text = self.cache.get(i)
            if text is None:
                text = self.cache[i] = self.tokenizer.decode([i])
            out.append(text)
        return out


# --- per-latent extras from the explain helpers' outputs -----------------------------------------


def _pick_vocab(vocab, j: int):
    if vocab is None or (isinstance(vocab, dict) and "how" in vocab):
        return vocab
    return vocab[j]


def _pick_describe(describe, j: int):
    if describe is None or "clamp_value" in describe:
        return describe
    return describe.get(j, describe.get(str(j)))


def _pick_concept(concept, j: int):
    if concept is not None and "correlation" not in concept:
        concept = concept.get(j, concept.get(str(j)))
    if concept is None:
        return None
    return {"name": concept.get("name", concept.get("concept")), "correlation": number(concept["correlation"])}


def _pick_stability(stability, j: int):
    if stability is None:
        return None
    cosine, partner = stability["cosine"], stability["partner"]
    if np.ndim(cosine):
        cosine, partner = cosine[j], partner[j]
    return {"cosine": number(cosine), "partner": int(partner), "compare": stability.get("compare")}


def flags(stats: LatentStats, latent: int, dense_threshold: float = DENSE_THRESHOLD) -> list[str]:
    if stats.fire_count[latent] == 0:
        return ["dead"]
    return ["dense"] if stats.density[latent] > dense_threshold else []


# --- cards ---------------------------------------------------------------------------------------


def build_cards(stats: LatentStats, source, tokenizer=None, dictionary=None, *, latents: Iterable[int] | None = None,
                top: int = 20, groups: int = 10, per_group: int = 5, before: int = 5, after: int = 5, bins: int = 50,
                vocab=None, describe=None, concept=None, stability=None, sites: dict | None = None,
                dense_threshold: float = DENSE_THRESHOLD) -> Iterator[Card]:
    """The card of every latent (or of `latents`), in order. The examples of all of them are read
    in one grouped pass over `source` on the first card; each card is then built from memory.
    `tokenizer` defaults to the source's; without a `dictionary` the windows carry no values.
    vocab / describe / concept / stability: the explain helpers' outputs (all latents, or one)."""
    latents = np.asarray(range(stats.n_latents) if latents is None else list(latents), dtype=np.int64)
    tokenizer = tokenizer if tokenizer is not None else getattr(source, "tokenizer", None)
    sites = sites or {"in": getattr(source, "site", None), "out": getattr(source, "out_site", None)}
    plan = _plan(stats, latents.tolist(), top, groups, per_group, stats.signed)
    found = _Examples(plan, source, tokenizer, dictionary, before, after)
    density, peak, mean = (plain(column[latents]) for column in (stats.density, stats.max, stats.mean_firing))
    for i, j in enumerate(latents.tolist()):
        parts = plan.parts[j]
        spans = [parts["top"], *([parts["bottom"]] if "bottom" in parts else []), *[(a, b) for _, _, a, b in parts["quantiles"]]]
        found.round_block(min(a for a, _ in spans), max(b for _, b in spans))
        ranges = plain([edge for lo, hi, _, _ in parts["quantiles"] for edge in (lo, hi)])
        yield Card({
            "latent": int(j), "n_tokens": int(stats.n_tokens), "n_firing": int(stats.fire_count[j]),
            "density": density[i], "max": peak[i], "mean_firing": mean[i],
            "signed": bool(stats.signed), "flags": flags(stats, j, dense_threshold),
            "sites": dict(sites),
            "top": found.examples(parts["top"]),
            "bottom": found.examples(parts["bottom"]) if "bottom" in parts else [],
            "quantiles": [{"range": ranges[2 * g:2 * g + 2], "examples": found.examples((a, b))}
                          for g, (_, _, a, b) in enumerate(parts["quantiles"])],
            "histogram": histogram(stats, j, bins),
            "vocab": _pick_vocab(vocab, j), "describe": _pick_describe(describe, j),
            "concept": _pick_concept(concept, j), "stability": _pick_stability(stability, j),
        })


def latent_card(latent: int, stats: LatentStats, source, tokenizer=None, dictionary=None, **options) -> Card:
    """One latent's card (the options of build_cards)."""
    return next(build_cards(stats, source, tokenizer, dictionary, latents=[latent], **options))


def top_contexts(stats: LatentStats, source, latent: int, n: int = 20, before: int = 5, after: int = 5, *,
                 tokenizer=None, dictionary=None) -> list[dict]:
    """The latent's `n` highest examples (tokens as text with a tokenizer, else ids; values with a dictionary)."""
    plan = _Plan()
    span = plan.add(latent, *_valid(stats.top_tokens[latent], stats.top_values[latent], n))
    tokenizer = tokenizer if tokenizer is not None else getattr(source, "tokenizer", None)
    return _Examples(plan, source, tokenizer, dictionary, before, after).examples(span)


def quantile_groups(stats: LatentStats, source, latent: int, groups: int = 10, per_group: int = 5, before: int = 5,
                    after: int = 5, *, tokenizer=None, dictionary=None) -> list[dict]:
    """[{"range": [lo, hi], "examples": [...]}] of the latent, highest group first (see quantile_picks)."""
    plan = _plan(stats, [latent], 0, groups, per_group, bottom=False)
    tokenizer = tokenizer if tokenizer is not None else getattr(source, "tokenizer", None)
    found = _Examples(plan, source, tokenizer, dictionary, before, after)
    return [{"range": plain([lo, hi]), "examples": found.examples((a, b))} for lo, hi, a, b in plan.parts[latent]["quantiles"]]


def index_columns(stats: LatentStats, source, tokenizer=None, *, fires_on: int = 3, top: int = 20,
                  dense_threshold: float = DENSE_THRESHOLD) -> dict:
    """The site index's per-latent columns: density, max, mean_firing, fires_on (the `fires_on`
    most frequent target tokens among each latent's `top` examples, ties to the higher example),
    fires_on_share (the fraction of those examples whose target is the first of them), flags. One grouped read of the source's token ids."""
    tokenizer = tokenizer if tokenizer is not None else getattr(source, "tokenizer", None)
    tokens = stats.top_tokens[:, :top]
    valid = tokens >= 0
    ids = np.full(tokens.shape, -1, np.int64)
    ids[valid] = source.token_ids(tokens[valid])
    text = _TokenText(tokenizer)
    column, share = [], []
    for row, ok in zip(ids, valid):
        common = Counter(row[ok].tolist()).most_common()  # insertion order breaks ties: the higher example
        column.append(text([i for i, _ in common[:fires_on]]))
        share.append(round(common[0][1] / int(ok.sum()), 4) if common else 0.0)
    return {"density": plain(stats.density), "max": plain(stats.max), "mean_firing": plain(stats.mean_firing),
            "fires_on": column, "fires_on_share": share,
            "flags": [flags(stats, j, dense_threshold) for j in range(stats.n_latents)]}
