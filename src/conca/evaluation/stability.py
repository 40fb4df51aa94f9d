"""Do the same latents come back when only the seed changes? Stability across seeds (issue 17, item 3).

ConCA's claim is identifiability: the latents are fixed by the data up to permutation, scale and
sign, so dictionaries trained from different initialisations on the same batches should find the
same ones. SAELens, SAEBench and delphi do not measure it. For every pair of seeds of one method:

decoder agreement  decoder directions matched one-to-one by Hungarian on |cosine| (the sign ignored: a
                   latent and its negation are one axis): the mean matched |cosine| and the share of
                   matched latents above 0.7. (overcomplete's `cosine_hungarian_loss` is sum(1 - cos) over
                   the same matching.) Per latent, its best partner's |cosine| in each other seed,
                   averaged over those seeds: the stability score the atlas shows (`conca inspect
                   --compare`). A chance level beside it: the same numbers for random isotropic
                   directions of the same shapes (one draw; at hundreds of latents its spread is small).
activation MCC     the identifiability literature's mean correlation coefficient (Khemakhem et al. 2020,
                   `mean_corr_coef`, Pearson variant): Pearson r of the latents' activations -- the
                   `encode` outputs as they are (ConCA's signed log-posterior estimates, not exp) -- over
                   held-out tokens, latents matched one-to-one by Hungarian on |r|, MCC = mean |r| over
                   the min(L, L') matched pairs. A latent constant on those tokens (dead) has r = 0 with
                   everything; `mcc_alive` averages only pairs whose two latents both vary.

Matching: exact Hungarian up to `hungarian_max` latents, above it Hungarian on each latent's best
candidates (a bracketed approximation: conca.evaluation.latent_matching, with measured times).

Memory (activations): the correlations need sum z_a z_b^T, L x L' float64 per pair of seeds (2 GiB
at 16,384 x 16,384). It is accumulated for a block of the first seed's latents at a time, all pairs
together within `max_bytes`, so above that the held-out tokens are encoded in several passes
(about pairs * L * L' * 8 / max_bytes); besides it, one chunk of `chunk_tokens` tokens of every seed's
latents. Time: tokens * L * L' multiply-adds per pair, in float32 on centred values (the sums in float64).
Measured, one CPU thread: 2 seeds x 16,384 latents (d = 576), 4,096 held-out tokens: 101 s in 2 passes,
peak RSS 3.1 GB with max_bytes = 1 GiB; decoder agreement with its chance level at that width 42 s.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from conca.dictionaries.base import Dictionary
from conca.errors import ConfigError, InputError, ShapeError
from conca.evaluation.latent_matching import (CANDIDATES, HUNGARIAN_MAX, PairMatch, SimilarityReducer, block_rows,
                                              match_directions)

THRESHOLD = 0.7
MAX_BYTES = 2**30
DECODER_BLOCK_BYTES = 64 * 2**20
CORRELATION_BLOCK_BYTES = 64 * 2**20  # rows of a pass's cross sums multiplied / turned into correlations at a time
MCC_VARIANT = ("Pearson r of encode() outputs on held-out tokens; latents matched one-to-one by Hungarian on |r|; "
               "MCC = mean |r| over the matched pairs (dead latents count as r = 0)")


def summary(values: list[float]) -> dict:
    """mean, min, max and sample standard deviation over the pairs of seeds (pairs share seeds: not independent)."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "pairs": len(v)}


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _check_dictionaries(dictionaries: list, what: str) -> None:
    if len(dictionaries) < 2:
        raise ConfigError(f"{what} needs at least 2 dictionaries (seeds) to compare, got {len(dictionaries)}")
    for k, d in enumerate(dictionaries):
        if not isinstance(d, Dictionary):
            raise InputError(f"{what}: item {k} is a {type(d).__name__}, not a conca Dictionary")


def per_latent_scores(matches: dict[tuple[int, int], PairMatch], n: int) -> list[np.ndarray]:
    """Per seed, each latent's best-partner similarity averaged over the other seeds."""
    scores: list[list[np.ndarray]] = [[] for _ in range(n)]
    for (i, j), m in matches.items():
        scores[i].append(m.row_best)
        scores[j].append(m.col_best)
    return [np.mean(s, axis=0) for s in scores]


def _pair_rows(matches: dict[tuple[int, int], PairMatch], threshold: float, key: str) -> list[dict]:
    return [{"seeds": [i, j], key: m.matched_mean, "share_above": m.share_above(threshold),
             "best_partner_mean": float((m.row_best.mean() + m.col_best.mean()) / 2), "matching": m.matching}
            for (i, j), m in matches.items()]


def _summaries(rows: list[dict], key: str) -> dict:
    return {key: summary([r[key] for r in rows]), "share_above": summary([r["share_above"] for r in rows]),
            "best_partner_mean": summary([r["best_partner_mean"] for r in rows]),
            "matching": "; ".join(sorted({r["matching"] for r in rows}))}


def _rounded(scores: list[np.ndarray]) -> list[list[float]]:
    return [[round(float(v), 4) for v in s] for s in scores]


def decoder_agreement(dictionaries: list, *, threshold: float = THRESHOLD, hungarian_max: int = HUNGARIAN_MAX,
                      candidates: int = CANDIDATES, per_latent: bool = True, chance: bool = True,
                      block_bytes: int = DECODER_BLOCK_BYTES) -> dict:
    """Decoder directions of every pair of seeds matched one-to-one by Hungarian on |cosine|:
    per pair the mean matched |cosine|, the share of matched latents above `threshold` and the mean
    best-partner |cosine| (an upper bound of the matched mean); each summarised over the pairs.
    `per_latent`: per seed, each latent's best-partner |cosine| averaged over the other seeds.
    `chance`: the same numbers for random isotropic directions of seeds 0 and 1's shapes."""
    _check_dictionaries(dictionaries, "decoder agreement")
    directions = [d.decoder_directions.detach() for d in dictionaries]
    widths = {int(w.shape[1]) for w in directions}
    if len(widths) != 1:
        raise ShapeError(f"cannot compare decoder directions of widths {sorted(widths)}: the dictionaries write "
                         f"different sites or models")
    options = dict(block_bytes=block_bytes, hungarian_max=hungarian_max, candidates=candidates)
    matches = {(i, j): match_directions(directions[i], directions[j], **options) for i, j in _pairs(len(directions))}
    rows = _pair_rows(matches, threshold, "matched_cosine")
    result = {"measure": "decoder directions, |cosine|, one-to-one Hungarian matching", "seeds": len(dictionaries),
              "n_latents": [int(w.shape[0]) for w in directions], "threshold": threshold,
              **_summaries(rows, "matched_cosine"), "pairs": rows}
    if chance:
        g = torch.Generator().manual_seed(1_000_003)  # not 0: dictionaries made under seed 0 draw the same numbers
        random = [torch.randn(w.shape, generator=g) for w in directions[:2]]
        m = match_directions(*random, **options)
        result["chance"] = {"matched_cosine": m.matched_mean, "share_above": m.share_above(threshold),
                            "best_partner_mean": float((m.row_best.mean() + m.col_best.mean()) / 2),
                            "how": "random isotropic Gaussian directions of seeds 0 and 1's shapes, one draw"}
    if per_latent:
        result["per_latent"] = _rounded(per_latent_scores(matches, len(dictionaries)))
    return result


@contextlib.contextmanager
def _eval_mode(dictionaries: list):
    """Encode in eval mode (BatchNorm's running statistics: codes that do not depend on the chunk)."""
    modes = [d.training for d in dictionaries]
    for d in dictionaries:
        d.eval()
    try:
        yield
    finally:
        for d, mode in zip(dictionaries, modes):
            d.train(mode)


def _heldout(x: "torch.Tensor | np.ndarray", dictionaries: list) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or len(x) < 2:
        raise ShapeError(f"held-out activations must be (tokens >= 2, width), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"held-out activations must be floating point, got {x.dtype}")
    for k, d in enumerate(dictionaries):
        if d.config.d_in != x.shape[1]:
            raise ShapeError(f"dictionary {k} ({d.name}) expects inputs of width {d.config.d_in}, "
                             f"the held-out activations have width {x.shape[1]}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("held-out activations contain NaN or infinite values")
    return x


def _encode(d: Dictionary, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    own = next(d.parameters()).device
    return d.encode(x.to(own, torch.float32)).to(device, torch.float64)


def _correlations(cross: torch.Tensor, n: int, mean_a: torch.Tensor, std_a: torch.Tensor, alive_a: torch.Tensor,
                  mean_b: torch.Tensor, std_b: torch.Tensor, alive_b: torch.Tensor) -> torch.Tensor:
    """|Pearson r| from centred sums (means of the shifted values); 0 where either latent is dead."""
    cov = cross / n - mean_a[:, None] * mean_b[None, :]
    r = cov / (std_a[:, None] * std_b[None, :]).clamp_min(1e-300)
    r = torch.where(alive_a[:, None] & alive_b[None, :], r, torch.zeros((), dtype=r.dtype, device=r.device))
    return r.abs_().clamp_(0.0, 1.0)


def activation_mcc(dictionaries: list, x_heldout: "torch.Tensor | np.ndarray", *, threshold: float = THRESHOLD,
                   chunk_tokens: int = 2048, max_bytes: int = MAX_BYTES, hungarian_max: int = HUNGARIAN_MAX,
                   candidates: int = CANDIDATES, per_latent: bool = True) -> dict:
    """MCC of every pair of seeds on `x_heldout` (tokens, d_in) (see the module docstring): per pair the
    MCC, the MCC over pairs of live latents, the share of matched pairs with |r| above `threshold` and
    the mean best-partner |r|; each summarised over the pairs. Streamed over `chunk_tokens` tokens;
    the cross sums of all pairs kept within `max_bytes` (more passes over the tokens when they are not)."""
    _check_dictionaries(dictionaries, "activation MCC")
    if chunk_tokens < 1 or max_bytes < 1:
        raise ConfigError(f"chunk_tokens and max_bytes must be positive, got {chunk_tokens} and {max_bytes}")
    x = _heldout(x_heldout, dictionaries)
    n_tokens, device = len(x), next(dictionaries[0].parameters()).device
    widths = [d.config.n_latents for d in dictionaries]
    pairs = _pairs(len(dictionaries))
    rows = block_rows(sum(widths[j] for _, j in pairs), max_bytes, itemsize=8)  # latents of the first seed per pass
    passes = math.ceil(max(widths[i] for i, _ in pairs) / rows)
    reducers = {p: SimilarityReducer(widths[p[0]], widths[p[1]], hungarian_max=hungarian_max, candidates=candidates)
                for p in pairs}
    shift: list[torch.Tensor] = []
    sums = [torch.zeros(w, dtype=torch.float64, device=device) for w in widths]
    squares = [torch.zeros(w, dtype=torch.float64, device=device) for w in widths]
    with _eval_mode(dictionaries), torch.no_grad():
        for p in range(passes):
            lo = p * rows
            active = [(i, j) for i, j in pairs if lo < widths[i]]
            cross = {(i, j): torch.zeros(min(rows, widths[i] - lo), widths[j], dtype=torch.float64, device=device)
                     for i, j in active}
            for start in range(0, n_tokens, chunk_tokens):
                z32 = []  # each seed's centred codes of this chunk: products in float32, their sums in float64
                for k, d in enumerate(dictionaries):
                    z = _encode(d, x[start:start + chunk_tokens], device)
                    if p == 0 and start == 0:  # the first chunk's means: sums of shifted values do not cancel
                        shift.append(z.mean(0))
                    z -= shift[k]
                    if p == 0:
                        sums[k] += z.sum(0)
                        squares[k] += z.square().sum(0)
                    z32.append(z.float())
                    del z
                for i, j in active:
                    step = block_rows(widths[j], CORRELATION_BLOCK_BYTES, itemsize=8)  # temporaries stay small
                    for a in range(0, len(cross[i, j]), step):
                        sub = cross[i, j][a:a + step]  # a view: added to in place
                        sub += (z32[i][:, lo + a:lo + a + len(sub)].T @ z32[j]).double()
            means = [s / n_tokens for s in sums]
            stds = [(q / n_tokens - m.square()).clamp_min(0).sqrt() for q, m in zip(squares, means)]
            # Dead: no variation beyond rounding (a constant latent's shifted values are ~0).
            alive = [(s > 1e-6 * (m + sh).abs()) & (s > 0) for s, m, sh in zip(stds, means, shift)]
            for i, j in active:
                block = cross.pop((i, j))
                step = block_rows(widths[j], CORRELATION_BLOCK_BYTES, itemsize=8)  # temporaries stay small
                for a in range(0, len(block), step):
                    sub = block[a:a + step]
                    part = slice(lo + a, lo + a + len(sub))
                    reducers[i, j].add(lo + a, _correlations(sub, n_tokens, means[i][part], stds[i][part],
                                                             alive[i][part], means[j], stds[j], alive[j]))
                del block
    matches = {p: r.finish() for p, r in reducers.items()}
    alive_np = [a.cpu().numpy() for a in alive]
    pair_rows = _pair_rows(matches, threshold, "mcc")
    for row, ((i, j), m) in zip(pair_rows, matches.items()):
        both = alive_np[i][m.pairs[0]] & alive_np[j][m.pairs[1]]
        row["mcc_alive"] = float(m.matched[both].mean()) if both.any() else None
    alive_rows = [r["mcc_alive"] for r in pair_rows if r["mcc_alive"] is not None]
    result = {"measure": MCC_VARIANT, "seeds": len(dictionaries), "n_latents": widths, "tokens": n_tokens,
              "threshold": threshold, **_summaries(pair_rows, "mcc"),
              "mcc_alive": summary(alive_rows) if alive_rows else None,
              "dead": [int((~a).sum()) for a in alive_np], "passes": passes, "pairs": pair_rows}
    if per_latent:
        result["per_latent"] = _rounded(per_latent_scores(matches, len(dictionaries)))
    return result


def stability_report(families: dict[str, list], x_heldout: "torch.Tensor | np.ndarray | None" = None,
                     **options) -> dict:
    """Per method family (name -> its seeds' dictionaries, trained on the same batches), the decoder
    agreement and, with `x_heldout`, the activation MCC; plus `table`, one row per family with the
    headline numbers, so ConCA and SAE families read side by side. `options` go to both measures
    (threshold, hungarian_max, candidates, per_latent) or to the one that has them."""
    if not families:
        raise ConfigError("stability report: no method families given")
    decoder_keys = {"threshold", "hungarian_max", "candidates", "per_latent", "chance", "block_bytes"}
    mcc_keys = {"threshold", "hungarian_max", "candidates", "per_latent", "chunk_tokens", "max_bytes"}
    unknown = set(options) - decoder_keys - mcc_keys
    if unknown:
        raise ConfigError(f"stability report: unknown options {', '.join(sorted(unknown))}")
    out, table = {}, []
    for name, dictionaries in families.items():
        dictionaries = list(dictionaries)
        if len(dictionaries) < 2:
            raise ConfigError(f"stability report: family {name!r} has {len(dictionaries)} dictionary; "
                              f"stability needs at least 2 seeds")
        entry = {"seeds": len(dictionaries),
                 "decoder": decoder_agreement(dictionaries, **{k: v for k, v in options.items() if k in decoder_keys})}
        if x_heldout is not None:
            entry["activations"] = activation_mcc(dictionaries, x_heldout,
                                                  **{k: v for k, v in options.items() if k in mcc_keys})
        out[name] = entry
        decoder, activations = entry["decoder"], entry.get("activations")
        table.append({"family": name, "seeds": len(dictionaries),
                      "matched_cosine": decoder["matched_cosine"]["mean"],
                      "matched_cosine_min": decoder["matched_cosine"]["min"],
                      "matched_cosine_max": decoder["matched_cosine"]["max"],
                      "share_above": decoder["share_above"]["mean"],
                      "chance_matched_cosine": decoder.get("chance", {}).get("matched_cosine"),
                      "mcc": activations["mcc"]["mean"] if activations else None,
                      "mcc_min": activations["mcc"]["min"] if activations else None,
                      "mcc_max": activations["mcc"]["max"] if activations else None,
                      "mcc_alive": activations["mcc_alive"]["mean"] if activations and activations["mcc_alive"] else None})
    return {"families": out, "table": table, "threshold": options.get("threshold", THRESHOLD),
            "summaries": "mean, min, max and sample std over the seed pairs (pairs share seeds: not independent draws)"}
