"""SCR (spurious correlation removal) and TPP (targeted probe perturbation), SAEBench's definitions.

Followed from SAEBench 0.6.0 (github.com/adamkarvonen/SAEBench): ``sae_bench/evals/scr_and_tpp/main.py``
(``get_effects_per_class_precomputed_acts``, ``select_top_n_features``, ``ablated_precomputed_activations``,
``get_scr_plotting_dict``, ``create_tpp_plotting_dict``), ``scr_and_tpp/dataset_creation.py``
(``get_spurious_corr_data``) and ``sparse_probing/probe_training.py`` (``prepare_probe_data``). Our own code.

Inputs are per text: ``x`` (N, d) the mean over a text's tokens of the site activations and ``codes``
(N, F) the mean over the same tokens of the dictionary's latents (SAEBench encodes each token, then
means; `conca.evaluation.scr_data.pooled_text_activations` computes both). Zero-ablating latents S in
every token and mean-pooling gives exactly ``x - codes[:, S] @ W_dec[S]`` (decoder linear, error term
kept), so the pooled tensors suffice. Without ``codes`` the dictionary encodes the pooled ``x`` (an
approximation, for planted data).

SCR, one profession pair (column a, e.g. professor=1 / nurse=0) and gender (column b, male=1 / female=0),
as SAEBench runs it:
  * probes: ``a`` on data balanced over the four (a, b) cells, ``b`` likewise, and the *biased* probe
    ``a == b == 1`` vs ``a == b == 0`` (SAEBench's "male_professor / female_nurse"); all trained on the
    train split, all evaluated on the test split.
  * dir1 ablates the gender latents: effects e_j = |(μ₊ − μ₋)_j · (w_b · W_dec[j])| with the balanced
    ``b`` probe and the means of the latents over the balanced train set labelled by ``b``; zero-ablate
    the top-N (among non-zero effects); A_abl = biased probe on the balanced test set labelled by ``a``;
    A_base = the same without ablation; A_oracle = the balanced ``a`` probe on that clean test set.
    dir2 swaps the roles of a and b. SCR = (A_abl − A_base)/(A_oracle − A_base); 0 when
    A_oracle − A_base < 0.001.
  * the reported ``scr_metric_threshold_N`` is dir1 if the biased probe's clean accuracy on ``a`` is below
    its accuracy on ``b`` (it leaned on b, so removing b should help), else dir2 (SAEBench sets neither on
    an exact tie; we report dir1 then).
TPP (classes 0..C-1): one-vs-rest probes, positives vs an equal number of negatives drawn evenly from the
other classes (train and test); effects e_j = max(μ₊ − μ₋, 0)_j · (w_i · W_dec[j]) (no abs: only latents
of the positive class); ablate class i's top-n; TPP = mean_i ΔAcc(i,i) − mean_i mean_{j≠i} ΔAcc(i,j),
ΔAcc = clean − ablated accuracy of probe j on its own test set.

Signed latents (`Dictionary.signed_latents`, ConCA): a latent's evidence for a class can be negative, so
e_j = |Δμ_j · (w · W_dec[j])| for both metrics (no clamp), i.e. ranked by the size of the mean difference.

Differences from SAEBench, by necessity: probes are sklearn logistic regression (L2, C=1, on
standardised features, mapped back to raw activation space) instead of SAEBench's torch probe with an
L1 penalty; cell sizes are the smallest cell's count (SAEBench's biased set takes twice a cell's count
from two larger cells); half the texts are held out for testing by default (SAEBench: 4000 train /
1000 test; on conca's 800 texts per pair a larger test half gives tighter accuracies, and each SCR
score carries its paired standard error, ``scr_metric_standard_error_N``); N defaults to
{2, 5, 10, 20, 50} (SAEBench adds 100 and 500, too many for a 2k-latent dictionary on 1.6k texts). Results use SAEBench's metric names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from conca.errors import InputError
from conca.evaluation.sparse_probing import fit_logistic

N_VALUES = (2, 5, 10, 20, 50)
DENOMINATOR_GUARD = 0.001


@dataclass
class Probe:
    """A linear probe in raw activation space: predicts 1 where x @ w + b > 0."""

    w: torch.Tensor
    b: float

    def correct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """1.0 where the probe is right, 0.0 where wrong, per example."""
        return ((x @ self.w + self.b > 0).long() == y).float()

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(self.correct(x, y).mean())


def paired_standard_error(after: torch.Tensor, before: torch.Tensor) -> float:
    """Standard error of mean(after − before) over the same test examples (per-example 0/1 correctness)."""
    diff = (after - before).double()
    return float(diff.std(unbiased=True) / len(diff) ** 0.5) if len(diff) > 1 else 0.0


def fit_probe(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> Probe:
    """Logistic regression (L2, C=1) on x standardised with its own per-feature mean and std (the
    training rows: `sparse_probing.fit_logistic`, shared with k-sparse probing), as a probe on raw x."""
    if len(torch.unique(y)) != 2:
        raise InputError("a probe needs examples of both classes")
    w, b = fit_logistic(x.double().numpy(), y.numpy(), max_iter=2000, seed=seed)
    return Probe(torch.tensor(w, dtype=torch.float32), b)


def _decoder_and_codes(dictionary, x: torch.Tensor, codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    decoder = dictionary.decoder_directions.detach().float().cpu()
    if codes is None:
        with torch.no_grad():
            codes = dictionary.encode(x.float().to(decoder.device)).float().cpu()
    if x.ndim != 2 or codes.shape != (x.shape[0], decoder.shape[0]) or decoder.shape[1] != x.shape[1]:
        raise InputError(f"SCR/TPP need x (N, d) and codes (N, F) matching a decoder ({decoder.shape[0]}, "
                         f"{decoder.shape[1]}); got x {tuple(x.shape)}, codes {tuple(codes.shape)}")
    return decoder, codes.float()


def latent_effects(codes: torch.Tensor, y: torch.Tensor, probe: Probe, decoder: torch.Tensor, *,
                   absolute: bool, signed: bool = False) -> torch.Tensor:
    """e_j = Δμ_j · (w · W_dec[j]); |e_j| for SCR (absolute) and for signed latents; Δμ clamped at 0 for TPP."""
    delta = codes[y == 1].mean(0) - codes[y == 0].mean(0)
    if not absolute and not signed:
        delta = delta.clamp(min=0.0)
    effects = delta * (decoder @ probe.w)
    return effects.abs() if absolute or signed else effects


def top_latents(effects: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest effects among the non-zero ones (fewer when fewer are non-zero)."""
    k = min(n, int((effects != 0).sum()))
    return torch.topk(effects, k).indices if k > 0 else torch.zeros(0, dtype=torch.long)


def ablate(x: torch.Tensor, codes: torch.Tensor, decoder: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """x with the latents' contributions removed: x − Σ_{j∈S} z_j W_dec[j] (the error term stays)."""
    return x - codes[:, latents] @ decoder[latents] if len(latents) else x


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    return order[n_test:], order[:n_test]


def _cells(a: np.ndarray, b: np.ndarray, rows: np.ndarray, seed: int) -> dict[tuple[int, int], np.ndarray]:
    """The four (a, b) cells of `rows`, each cut to the smallest cell's size (shuffled, seeded)."""
    rng = np.random.default_rng(seed)
    cells = {(i, j): rng.permutation(rows[(a[rows] == i) & (b[rows] == j)]) for i in (0, 1) for j in (0, 1)}
    size = min(len(c) for c in cells.values())
    if size < 2:
        raise InputError(f"SCR needs at least 2 examples in every (target, spurious) cell of each split, got {size}")
    return {key: cell[:size] for key, cell in cells.items()}


def scr(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dictionary, codes: torch.Tensor | None = None, *,
        n_values: Sequence[int] = N_VALUES, test_fraction: float = 0.5, seed: int = 0) -> dict:
    """SCR for one pair of binary attributes a (SAEBench's profession column) and b (gender), both directions."""
    decoder, codes = _decoder_and_codes(dictionary, x, codes)
    signed = bool(getattr(dictionary, "signed_latents", False))
    a_np, b_np = a.long().numpy(), b.long().numpy()
    train_rows, test_rows = _split(len(x), test_fraction, seed)
    tr, te = _cells(a_np, b_np, train_rows, seed), _cells(a_np, b_np, test_rows, seed + 1)
    tr_bal, te_bal = np.concatenate(list(tr.values())), np.concatenate(list(te.values()))
    biased = np.concatenate([tr[(1, 1)], tr[(0, 0)]])
    labels = {"a": torch.as_tensor(a_np), "b": torch.as_tensor(b_np)}
    probes = {"a": fit_probe(x[tr_bal], labels["a"][tr_bal], seed), "b": fit_probe(x[tr_bal], labels["b"][tr_bal], seed),
              "biased": fit_probe(x[biased], labels["a"][biased], seed)}
    x_te = x[te_bal]
    clean = {c: probes["biased"].accuracy(x_te, labels[c][te_bal]) for c in "ab"}
    oracle = {c: probes[c].accuracy(x_te, labels[c][te_bal]) for c in "ab"}
    out: dict = {"n_values": list(n_values), "signed_latents": signed,
                 "train_per_cell": len(tr[(0, 0)]), "test_per_cell": len(te[(0, 0)])}
    dirs = {1: ("a", "b"), 2: ("b", "a")}  # dir: (evaluated attribute, ablated attribute)
    for d, (target, spurious) in dirs.items():
        effects = latent_effects(codes[tr_bal], labels[spurious][tr_bal], probes[spurious], decoder,
                                 absolute=True, signed=signed)
        base, top = clean[target], oracle[target]
        denominator = top - base
        out[f"dir{d}"] = {"evaluated": target, "ablated": spurious, "accuracy_base": base, "accuracy_oracle": top,
                          "denominator_guarded": denominator < DENOMINATOR_GUARD, "accuracy_ablated": {},
                          "standard_error": {}}
        before = probes["biased"].correct(x_te, labels[target][te_bal])
        for n in n_values:
            latents = top_latents(effects, n)
            after = probes["biased"].correct(ablate(x_te, codes[te_bal], decoder, latents), labels[target][te_bal])
            ablated = float(after.mean())
            out[f"dir{d}"]["accuracy_ablated"][str(n)] = ablated
            guarded = denominator < DENOMINATOR_GUARD
            out[f"scr_dir{d}_threshold_{n}"] = 0.0 if guarded else (ablated - base) / denominator
            # Sampling noise of the test set: the paired SE of A_abl − A_base over the denominator (taken as fixed).
            out[f"dir{d}"]["standard_error"][str(n)] = 0.0 if guarded else paired_standard_error(after, before) / denominator
    reported = 1 if clean["a"] <= clean["b"] else 2
    out["scr_metric_direction"] = reported
    out["test_examples"] = len(te_bal)
    for n in n_values:
        out[f"scr_metric_threshold_{n}"] = out[f"scr_dir{reported}_threshold_{n}"]
        out[f"scr_metric_standard_error_{n}"] = out[f"dir{reported}"]["standard_error"][str(n)]
    return out


def _one_vs_rest(classes: np.ndarray, rows: np.ndarray, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows of class i and as many negatives drawn evenly from the other classes; labels 1/0."""
    pos = rows[classes[rows] == i]
    others = [c for c in np.unique(classes[rows]) if c != i]
    per = int(np.ceil(len(pos) / max(1, len(others))))
    neg = np.concatenate([rng.permutation(rows[classes[rows] == c])[:per] for c in others])[:len(pos)]
    idx = np.concatenate([pos, neg])
    return idx, np.concatenate([np.ones(len(pos), dtype=np.int64), np.zeros(len(neg), dtype=np.int64)])


def tpp(x: torch.Tensor, classes: torch.Tensor, dictionary, codes: torch.Tensor | None = None, *,
        n_values: Sequence[int] = N_VALUES, test_fraction: float = 0.5, seed: int = 0) -> dict:
    """TPP over the classes 0..C-1 of `classes` (C >= 2)."""
    decoder, codes = _decoder_and_codes(dictionary, x, codes)
    signed = bool(getattr(dictionary, "signed_latents", False))
    cls = classes.long().numpy()
    names = sorted(np.unique(cls).tolist())
    if len(names) < 2:
        raise InputError("TPP needs at least two classes")
    train_rows, test_rows = _split(len(x), test_fraction, seed)
    rng = np.random.default_rng(seed)
    train = {i: _one_vs_rest(cls, train_rows, i, rng) for i in names}
    test = {i: _one_vs_rest(cls, test_rows, i, rng) for i in names}
    probes = {i: fit_probe(x[train[i][0]], torch.as_tensor(train[i][1]), seed) for i in names}
    clean = {i: probes[i].accuracy(x[test[i][0]], torch.as_tensor(test[i][1])) for i in names}
    per_class: dict = {}
    for i in names:
        idx, y = train[i]
        effects = latent_effects(codes[idx], torch.as_tensor(y), probes[i], decoder, absolute=False, signed=signed)
        metrics = {}
        for n in n_values:
            x_abl = ablate(x, codes, decoder, top_latents(effects, n))
            drop = {j: clean[j] - probes[j].accuracy(x_abl[test[j][0]], torch.as_tensor(test[j][1])) for j in names}
            unintended = float(np.mean([drop[j] for j in names if j != i]))
            metrics[f"tpp_threshold_{n}_total_metric"] = drop[i] - unintended
            metrics[f"tpp_threshold_{n}_intended_diff_only"] = drop[i]
            metrics[f"tpp_threshold_{n}_unintended_diff_only"] = unintended
        per_class[str(i)] = metrics
    out: dict = {key: float(np.mean([per_class[str(i)][key] for i in names])) for key in per_class[str(names[0])]}
    out.update({"n_values": list(n_values), "signed_latents": signed, "clean_accuracy": {str(i): clean[i] for i in names},
                "per_class": per_class})
    return out
