"""Build a dictionary's atlas: the pass, every card's parts, the highlights, the site.

What `conca inspect` and `conca demo` share: given a dictionary, a token source (a store or the
model over contexts) and the model, `build_atlas` computes the plain-data index and cards with
the atlas library and hands them to `atlas.site.write_atlas`."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from conca.errors import ConfigError

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction of tokens is flagged dense


@dataclass
class AtlasSettings:
    top: int = 20
    quantile_groups: int = 10
    per_group: int = 5
    window: int = 5
    sample: int = 200
    describe: int = 32
    describe_tokens: int = 8
    clamp: float = 2.0
    highlights: int = 8
    batch_size: int = 8
    seed: int = 0
    progress: bool = True


def parse_latents(spec: str, n_latents: int) -> list[int] | None:
    """'0-99,317' -> [0, ..., 99, 317] (sorted, unique); '' -> None (all). Each latent must exist."""
    if not spec or not spec.strip():
        return None
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ConfigError(f"--latents: {part!r} is not a latent number or a range A-B")
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        if stop < start:
            raise ConfigError(f"--latents: the range {part} is empty (write it low-high)")
        if stop >= n_latents:
            raise ConfigError(f"latent {stop} is out of range: the dictionary has {n_latents} latents "
                              f"(0-{n_latents - 1})")
        chosen.update(range(start, stop + 1))
    return sorted(chosen)


def choose_highlights(columns: dict, n: int, candidates: list[int], min_density: float = 0.0) -> list[dict]:
    """Latents worth a first look, each with the reason: the best concept matches when concepts
    were given, then the most stable across seeds, then those whose top contexts agree most on one
    token (a clear single-token detector; among equals the rarer one, firing at least `min_density`),
    never dead or dense ones."""
    if n <= 0:
        return []
    picked: list[dict] = []
    seen: set[int] = set()
    alive = [j for j in candidates if not columns["flags"][j]]

    def add(j: int, why: str) -> None:
        if j not in seen and len(picked) < n:
            seen.add(j)
            picked.append({"latent": int(j), "why": why})

    corr = columns.get("concept_corr")
    if corr is not None:
        matched = sorted((j for j in alive if corr[j] is not None), key=lambda j: -corr[j])
        for j in matched[: max(1, n // 2)]:
            add(j, f"highest concept correlation ({columns['concept'][j]}, r = {corr[j]:.2f})")
    stability = columns.get("stability")
    if stability is not None and len(picked) < n:
        stable = sorted((j for j in alive if stability[j] is not None), key=lambda j: -stability[j])
        for j in stable[: max(1, n // 4)]:
            add(j, f"most stable across seeds (|cos| = {stability[j]:.2f})")
    agreement = columns.get("fires_on_share")
    if agreement is not None:
        # Single-token detectors, one per token, words first: a page of newline detectors shows nothing.
        # Among equally clear detectors the rarer one: ' code' says more than ' the'.
        ranked = sorted((j for j in alive if columns["density"][j] >= min_density),
                        key=lambda j: (-agreement[j], columns["density"][j]))
        used: set[str] = set()
        for wordlike in (True, False):
            for j in ranked:
                tokens = columns["fires_on"][j]
                if len(picked) >= n:
                    break
                if not tokens or agreement[j] < 0.5:
                    continue
                token = str(tokens[0])
                key = token.strip().lower()
                if key in used or (wordlike and not re.search(r"[A-Za-z]{3,}", token)):
                    continue
                used.add(key)
                add(j, f"fires on {token!r} in {agreement[j]:.0%} of its top contexts")
    return picked


def choose_described(highlights: list[dict], max_values: np.ndarray, density: np.ndarray, n: int,
                     candidates: list[int]) -> list[int]:
    """Which latents get an intervention description: the highlights, then the live, non-dense
    latents by firing density (the ones a reader meets most), up to n."""
    chosen = [h["latent"] for h in highlights][:n]
    rest = [j for j in candidates if j not in chosen and max_values[j] > 0 and density[j] <= DENSE_THRESHOLD]
    rest.sort(key=lambda j: -density[j])
    return chosen + rest[: max(0, n - len(chosen))]


def timed(log: Callable[[str], None]):
    """A context-free stopwatch: `lap(what)` logs what finished and how long it took."""
    start = [time.perf_counter()]
    laps: dict[str, float] = {}

    def lap(what: str) -> None:
        now = time.perf_counter()
        laps[what] = now - start[0]
        log(f"{what}: {laps[what]:.1f}s")
        start[0] = now

    return lap, laps


def build_atlas(out: Path, dictionary, loaded, site: str, *, store=None, contexts=None, out_site: str | None = None,
                latents: list[int] | None = None, concepts: Path | None = None, compare=None, compare_label: str = "",
                source_label: str = "", dictionary_label: str = "", settings: AtlasSettings | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Write the atlas of `dictionary` at `site` into `out` (see conca.atlas.site) from a store or from
    `contexts` run through `loaded`; return a summary (timings, counts, highlights). `loaded` also gives
    the unembedding (vocabulary projection) and runs the intervention descriptions."""
    from conca.atlas.cards import build_cards, index_columns
    from conca.atlas.collect import collect_latent_stats
    from conca.atlas.describe import describe_latents
    from conca.atlas.site import write_atlas
    from conca.atlas.sources import ContextsSource, StoreSource
    from conca.atlas.vocab import vocab_projections

    settings = settings or AtlasSettings()
    t0 = time.perf_counter()
    lap, laps = timed(log)
    if (store is None) == (contexts is None):
        raise ConfigError("build_atlas needs a store or contexts (one of them)")
    if store is not None:
        source = StoreSource(store, site, tokenizer=loaded.tokenizer)
    else:
        source = ContextsSource(loaded, contexts, site, batch_size=settings.batch_size)
    n_latents = dictionary.config.n_latents
    candidates = list(range(n_latents)) if latents is None else list(latents)
    stats = collect_latent_stats(dictionary, source, top=settings.top, sample=settings.sample, seed=settings.seed,
                                 progress=settings.progress)
    lap(f"pass over {stats.n_tokens:,} tokens")
    how, vocab = vocab_projections(loaded.model, loaded.tokenizer, dictionary, site, top=10,
                                   out_site=out_site if dictionary.is_transcoder else None)
    lap("vocabulary projection")
    columns = index_columns(stats, source, loaded.tokenizer, top=settings.top, dense_threshold=DENSE_THRESHOLD)
    columns["promotes"] = [[t for t, _ in v["top"][:5]] for v in vocab]
    columns["suppresses"] = [[t for t, _ in v["bottom"][:5]] for v in vocab]
    concept_matches = _concept_matches(concepts, dictionary_label, n_latents) if concepts is not None else None
    columns["concept"] = [concept_matches[j]["concept"] if concept_matches and j in concept_matches else None
                          for j in range(n_latents)]
    columns["concept_corr"] = [round(concept_matches[j]["correlation"], 4)
                               if concept_matches and j in concept_matches else None for j in range(n_latents)]
    stability = None
    if compare is not None:
        stability = _stability_against(dictionary, compare if isinstance(compare, (list, tuple)) else [compare])
        stability["compare"] = compare_label
        lap("stability against --compare")
    columns["stability"] = ([round(float(c), 4) for c in stability["cosine"]] if stability is not None
                            else [None] * n_latents)
    highlights = choose_highlights({**columns, "concept_corr": columns["concept_corr"] if concept_matches else None,
                                    "stability": columns["stability"] if stability is not None else None},
                                   settings.highlights, candidates, min_density=settings.top / max(1, stats.n_tokens))
    described: dict = {}
    if settings.describe > 0 and not dictionary.is_transcoder:
        chosen = choose_described(highlights, stats.max, stats.density, settings.describe, candidates)
        if chosen:
            values = {j: settings.clamp * float(stats.max[j]) for j in chosen}
            described = describe_latents(loaded, dictionary, site, chosen, values, max_new_tokens=settings.describe_tokens,
                                         progress=settings.progress)
        lap(f"intervention descriptions of {len(described)} latents")
    sites = {"in": site, "out": out_site if dictionary.is_transcoder else None}
    cards = build_cards(stats, source, loaded.tokenizer, dictionary, latents=candidates, top=settings.top,
                        groups=settings.quantile_groups, per_group=settings.per_group, before=settings.window,
                        after=settings.window, vocab=[{"how": how, **v} for v in vocab], describe=described,
                        concept={j: {"name": m["concept"], "correlation": m["correlation"]}
                                 for j, m in (concept_matches or {}).items()},
                        stability=stability, sites=sites)
    index = {"title": f"conca atlas: {dictionary.name} at {site}", "model": str(loaded.name), "site": site,
             "out_site": sites["out"], "method": dictionary.name, "dictionary": dictionary_label,
             "n_latents": n_latents, "n_tokens": int(stats.n_tokens), "signed": bool(stats.signed),
             "source": source_label, "vocab_how": how, "dense_threshold": DENSE_THRESHOLD,
             "columns": {k: columns[k] for k in ("density", "max", "mean_firing", "concept", "concept_corr", "stability",
                                                 "fires_on", "promotes", "suppresses", "flags")},
             "highlights": highlights}
    write_atlas(out, index, cards)
    lap(f"cards and site ({len(candidates)} cards)")
    flags = columns["flags"]
    return {"index": str(Path(out) / "index.html"), "site": site, "n_latents": n_latents, "n_cards": len(candidates),
            "n_tokens": int(stats.n_tokens), "dead": sum("dead" in f for f in flags),
            "dense": sum("dense" in f for f in flags), "highlights": highlights, "described": sorted(described),
            "timings_s": laps, "elapsed_s": time.perf_counter() - t0}


def _stability_against(dictionary, others: list) -> dict:
    """Each latent's best |cos| against every other seed's dictionary, averaged over them (the score the
    identifiability claim asks for), with its partner in the first; one other: seed_stability as it is."""
    from conca.atlas.stability import seed_stability

    results = [seed_stability(dictionary, other) for other in others]
    if len(results) == 1:
        return results[0]
    return {"cosine": np.mean([r["cosine"] for r in results], axis=0), "partner": results[0]["partner"],
            "hungarian_mean": None, "note": f"best |cos| averaged over {len(results)} other seeds; partner in the first"}


def _concept_matches(path: Path, dictionary_label: str, n_latents: int) -> dict:
    """The matches of this dictionary in a `conca concepts` results file: its only dictionary, or the
    one named as `conca concepts` names it (the folder's name; its parent's for a folder 'dictionary')."""
    from conca.atlas.concepts import read_concept_matches
    from conca.errors import InputError

    try:
        return read_concept_matches(path, None, n_latents)
    except InputError as exc:
        if "several dictionaries" not in str(exc):
            raise
    folder = Path(dictionary_label)
    name = folder.name if folder.name != "dictionary" else folder.parent.name
    return read_concept_matches(path, name, n_latents)
