"""Concept recovery on counterfactual pairs: the supervised upper bound and how well a dictionary's
latents match it (ConCA App. G-L; I-Predict §6, App. G.2 and H; SPEC §1.1, §2.4, §3.6).

For each concept, a representation f(w) of each word alone (its last token, at a site) or of each
context ending in a word. Then:
  * probe: a logistic regression separating the two sides; its log-odds s = decision_function(f)
    is the reference "unnormalised log p(z_i = 1 | x)" (in-sample, C = 1, as the papers' script);
  * MPC / coverage@0.5: Pearson(s_i, exp(z_d)) per concept and latent, Hungarian matching;
  * A_s W_s: unit mean-difference directions x unit probe directions (I-Predict Fig. 3), with the
    distance || sum_k a_k w_k^T - P_S ||_F to the projector onto the directions' span;
  * rank-based fraction of significant features (ConCA Alg. 2): lower = more stable latents;
  * informational sufficiency (ConCA App. L): entropy of held-out probe posteriors, in bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from conca.concepts.pairs import ConceptSet, ContextPairs
from conca.dictionaries.base import Dictionary
from conca.errors import InputError
from conca.evaluation.matching import MatchResult, concept_correlations, hungarian_match
from conca.models.load import LoadedModel
from conca.models.sites import Site, run_to_sites


@dataclass
class ConceptData:
    """Representations of one concept's two sides: x_a (label 0) and x_b (label 1), row-paired
    where the concept comes from pairs."""

    name: str
    x_a: torch.Tensor
    x_b: torch.Tensor

    @property
    def x(self) -> torch.Tensor:
        return torch.cat([self.x_a, self.x_b])

    @property
    def labels(self) -> np.ndarray:
        return np.r_[np.zeros(len(self.x_a)), np.ones(len(self.x_b))]

    @property
    def n_pairs(self) -> int:
        return min(len(self.x_a), len(self.x_b))


# --- representations --------------------------------------------------------------
@torch.inference_mode()
def last_token_representations(loaded: LoadedModel, texts: list[str], site: "Site | str" = "final",
                               batch_size: int = 32, prepend_bos: bool = True, max_tokens: int = 64) -> torch.Tensor:
    """f(text) at its last token, (len(texts), d). Long texts keep their last `max_tokens` tokens
    (the word of interest ends the text). Right padding, so positions are those of an unpadded run."""
    if not texts:
        raise InputError("no texts to represent")
    site = Site.parse(site)
    tok = loaded.tokenizer
    bos = tok.bos_token_id if prepend_bos else None
    encoded = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"][-(max_tokens - (bos is not None)):]
        if not ids:
            raise InputError(f"text {text!r} has no tokens")
        encoded.append(([bos] if bos is not None else []) + ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(loaded.model.parameters()).device
    out = []
    order = np.argsort([len(e) for e in encoded])  # similar lengths per batch: less padding
    for b in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[b:b + batch_size]]
        width = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            ids[row, :len(e)] = torch.tensor(e)
            mask[row, :len(e)] = 1
        acts = run_to_sites(loaded.model, ids.to(device), [site], attention_mask=mask.to(device))[site]
        last = torch.tensor([len(e) - 1 for e in chunk], device=acts.device)
        out.append(acts[torch.arange(len(chunk), device=acts.device), last].float().cpu())
    reps = torch.empty(len(texts), out[0].shape[-1])
    reps[torch.as_tensor(order)] = torch.cat(out)
    return reps


def concept_representations(loaded: LoadedModel, concepts: list["ConceptSet | ContextPairs"], site: "Site | str" = "final",
                            batch_size: int = 32, prepend_bos: bool = True, max_tokens: int = 64,
                            progress: bool = False) -> list[ConceptData]:
    """Word pairs: each word alone; paired contexts: each context, at its last token."""
    from tqdm.auto import tqdm

    texts: list[str] = []
    spans = []
    for c in concepts:
        a, b = (c.words_a, c.words_b) if isinstance(c, ConceptSet) else (c.texts_a, c.texts_b)
        spans.append((c.name, len(texts), len(a), len(b)))
        texts += list(a) + list(b)
    # Deduplicate: the same word appears in many sets (e.g. verb forms), one forward each.
    unique = list(dict.fromkeys(texts))
    reps = []
    for i in tqdm(range(0, len(unique), 256), desc="representations", disable=not progress, leave=False):
        reps.append(last_token_representations(loaded, unique[i:i + 256], site, batch_size, prepend_bos, max_tokens))
    reps = torch.cat(reps)
    index = {t: i for i, t in enumerate(unique)}
    rows = reps[torch.tensor([index[t] for t in texts])]
    if not torch.isfinite(rows).all():
        raise InputError("the model produced NaN or infinite representations for some concept words")
    return [ConceptData(name, rows[start:start + na], rows[start + na:start + na + nb]) for name, start, na, nb in spans]


# --- the supervised reference ----------------------------------------------------
@dataclass
class ProbeResult:
    name: str
    scores: np.ndarray  # (2N,) log-odds of label 1 (side b), in-sample
    accuracy: float  # in-sample


def fit_probes(data: list[ConceptData], C: float = 1.0, max_iter: int = 1000) -> list[ProbeResult]:
    """Per concept, LogisticRegression(C, max_iter) on the stacked sides; its in-sample log-odds
    are the reference the latents are matched to (the papers' script does exactly this)."""
    from sklearn.linear_model import LogisticRegression

    results = []
    for c in data:
        x, y = c.x.double().numpy(), c.labels
        if len(c.x_a) < 1 or len(c.x_b) < 1:
            raise InputError(f"concept {c.name!r} needs examples on both sides")
        clf = LogisticRegression(C=C, max_iter=max_iter).fit(x, y)
        results.append(ProbeResult(c.name, clf.decision_function(x), float(clf.score(x, y))))
    return results


@torch.inference_mode()
def encode_all(dictionary: Dictionary, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    dictionary.eval()
    param = next(dictionary.parameters())
    return torch.cat([dictionary.encode(x[i:i + chunk].to(param.device, param.dtype)).float().cpu()
                      for i in range(0, len(x), chunk)])


def concept_matching(dictionary: Dictionary, data: list[ConceptData], probes: list[ProbeResult],
                     transform: str = "exp", threshold: float = 0.5) -> MatchResult:
    """MPC and coverage@threshold of a dictionary against the probes (SPEC §1.1)."""
    latents = [encode_all(dictionary, c.x) for c in data]
    r = concept_correlations([p.scores for p in probes], latents, transform)
    return hungarian_match(r, threshold, [c.name for c in data])


def reconstruction_mse(dictionary: Dictionary, x: torch.Tensor) -> float:
    """Squared error summed over dimensions, averaged over rows (the papers' "MSE" scale)."""
    with torch.inference_mode():
        x_hat = dictionary.decode(encode_all(dictionary, x))
    return float((x_hat - x).pow(2).sum(-1).mean())


# --- A_s W_s ---------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(np.linalg.norm(v), 1e-12)


def direction_alignment(data: list[ConceptData], C: float = 1e-4, seeds: int = 3, holdout: bool = True,
                        max_iter: int = 500, permute_labels: bool = False) -> dict:
    """A_s (C x d): unit mean of f(a) - f(b); W_s (d x C): unit probe weights (label 1 = side a).

    With `holdout`, directions come from one random half of each concept's pairs and the probe from
    the other (I-Predict's hold-out variant); `permute_labels` gives the null. Returns the mean
    A_s W_s over seeds, its diagonal / off-diagonal means, and ||sum_k a_k w_k^T - P_S||_F."""
    from sklearn.linear_model import LogisticRegression

    mats, fros = [], []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        a_rows, w_cols = [], []
        for c in data:
            n = c.n_pairs
            xa, xb = c.x_a[:n].double().numpy(), c.x_b[:n].double().numpy()
            perm = rng.permutation(n)
            half = max(1, n // 2)
            dir_idx, probe_idx = (perm[:half], perm[half:]) if holdout and n >= 4 else (perm, perm)
            a_rows.append(_unit((xa[dir_idx] - xb[dir_idx]).mean(0)))
            x = np.concatenate([xa[probe_idx], xb[probe_idx]])
            y = np.r_[np.ones(len(probe_idx)), np.zeros(len(probe_idx))]
            if permute_labels:
                y = rng.permutation(y)
            w_cols.append(_unit(LogisticRegression(C=C, max_iter=max_iter).fit(x, y).coef_[0]))
        a_s, w_s = np.stack(a_rows), np.stack(w_cols, axis=1)
        mats.append(a_s @ w_s)
        span = a_s.T  # (d, C)
        projector = span @ np.linalg.pinv(span.T @ span) @ span.T
        fros.append(float(np.linalg.norm(span @ w_s.T - projector)))
    mean = np.mean(mats, axis=0)
    off = ~np.eye(len(mean), dtype=bool)
    return {"matrix": mean, "matrix_std": np.std(mats, axis=0), "diagonal_mean": float(np.diag(mean).mean()),
            "off_diagonal_mean_abs": float(np.abs(mean[off]).mean()) if off.any() else 0.0,
            "fro_to_projector": float(np.mean(fros)), "fro_to_projector_std": float(np.std(fros)),
            "names": [c.name for c in data]}


# --- stability of latents across a counterfactual pair ---------------------------------
def rank_significance(dictionary: Dictionary, data: list[ConceptData], k: int = 32,
                      thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5), groups: int | None = None) -> float:
    """ConCA Alg. 2: for each pair, the k latents that change most (|z_a - z_b|); the fraction of
    them whose percentile rank (within the sample's latents) moves by more than T, averaged over
    thresholds T and pairs. With `groups` (GroupNorm) the top max(1, k/G) per group, averaged over
    groups. Lower = the latents that move keep their relative standing."""
    if groups is None:
        cfg = dictionary.config
        groups = cfg.num_groups if getattr(cfg, "norm", None) == "groupnorm" else 1
    fractions = []
    for c in data:
        n = c.n_pairs
        if n == 0:
            continue
        za, zb = encode_all(dictionary, c.x_a[:n]).numpy(), encode_all(dictionary, c.x_b[:n]).numpy()
        width = za.shape[1]
        ra = rankdata(za, axis=1) / width
        rb = rankdata(zb, axis=1) / width
        gsize = width // groups
        per_group = max(1, k // groups)
        for g in range(groups):
            cols = slice(g * gsize, (g + 1) * gsize)
            diff = np.abs(za[:, cols] - zb[:, cols])
            top = np.argsort(-diff, axis=1)[:, :min(per_group, gsize)]
            moved = np.abs(np.take_along_axis(ra[:, cols], top, 1) - np.take_along_axis(rb[:, cols], top, 1))
            fractions.append(np.mean([(moved > t).mean(axis=1) for t in thresholds], axis=0))
    return float(np.concatenate(fractions).mean())


# --- informational sufficiency -----------------------------------------------------------
def sufficiency(data: list[ConceptData], seeds: int = 3, test_fraction: float = 0.3, C: float = 1.0,
                max_iter: int = 1000) -> list[dict]:
    """ConCA App. L: per concept, a probe on a (1 - test_fraction) split; the mean entropy (bits)
    of its posteriors on the held-out rest, and its held-out accuracy, averaged over seeds.
    Low entropy = the representation pins the concept down (H(z|x) -> 0, the theorem's assumption)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    rows = []
    for c in data:
        x, y = c.x.double().numpy(), c.labels
        entropies, accuracies = [], []
        for seed in range(seeds):
            try:
                xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
            except ValueError:  # too few examples to stratify
                xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed)
            if len(set(ytr)) < 2 or len(yte) == 0:
                continue
            clf = LogisticRegression(C=C, max_iter=max_iter).fit(xtr, ytr)
            p = np.clip(clf.predict_proba(xte), 1e-12, 1.0)
            entropies.append(float(-(p * np.log2(p)).sum(1).mean()))
            accuracies.append(float(clf.score(xte, yte)))
        rows.append({"concept": c.name, "entropy_bits": float(np.mean(entropies)) if entropies else float("nan"),
                     "heldout_accuracy": float(np.mean(accuracies)) if accuracies else float("nan")})
    return rows
