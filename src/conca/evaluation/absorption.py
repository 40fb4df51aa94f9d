"""Feature absorption on the first-letter task, SAEBench's definitions (activations in, scores out).

Followed from SAEBench 0.6.0 (github.com/adamkarvonen/SAEBench), ``sae_bench/evals/absorption/``:
``probing.py`` (the ground-truth probe: one-vs-rest logistic probes on the model's activations, BCE with
positive-class weights, Adam lr 0.01 decaying to 1e-5, weight decay 1e-6; 80/20 train/test split of the
tokens), ``k_sparse_probing.py`` (an L1 probe on the latents, L1 decay 0.01, 50 epochs; for k = 1..10 the
k latents with the largest L1-probe weight for the letter, sklearn ``LogisticRegression(max_iter=500,
class_weight="balanced")`` on them, test F1 of score > 0; ``add_feature_splits_to_metrics_df``: the main
("split") latents are those of the largest k reached while each step raises F1 by more than 0.03),
``feature_absorption.py`` (the tokens scored are the test tokens of the letter on which the ground-truth
probe is positive), ``feature_absorption_calculator.py`` (per token: absorption fraction with absorbing
latents of probe cosine >= 0.1, at most 3 of them, projection proportion >= 0.4; full absorption: no
main latent fires, the top-projecting latent has probe cosine >= 0.025 and carries >= 0.4 of the
activation's probe projection), ``main.py`` (per letter: sum of fractions / probe true positives and full
absorptions / probe true positives; letters whose probe F1 > 0.6; means and standard deviations over
letters; SAEBench stops when fewer than 20 letters pass). The prompts (`conca.evaluation.absorption_data`)
follow ``prompting.py``/``vocab.py``. Our own code.

A latent's probe projection is z_j (W_dec[j] · p̂) (SAEBench: z_j cos(W_dec[j], p̂), the same for
unit-norm decoders). Signed latents (`Dictionary.signed_latents`, ConCA): the k-sparse candidates are
ranked by |weight| instead of weight, and a main latent "fires" when its probe projection is positive
(for non-negative latents: when z_j > 1e-8, as in SAEBench).
"""

from __future__ import annotations

import math
import string

import numpy as np
import torch
from torch import nn

from conca.errors import InputError

LETTERS = string.ascii_lowercase
EPS = 1e-8
CAVEAT = ("SAEBench: feature absorption is meaningful only for models with >= 1B parameters and dictionaries "
          "with >= 16k latents (and needs >= 20 letters the probe finds); smaller settings are reported for "
          "comparison only.")


def train_multi_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, epochs: int = 100, lr: float = 0.01,
                      end_lr: float = 1e-5, weight_decay: float = 1e-6, l1: float = 0.0, batch_size: int = 256,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic probes (W (C, d), b (C,)): BCE with positive weights, Adam, exponential lr decay,
    plus l1 · mean over classes of |W_c|₁ when l1 > 0 (the k-sparse candidates' probe)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = x.float()
    targets = torch.nn.functional.one_hot(y.long(), n_classes).float()
    pos = targets.sum(0)
    pos_weight = torch.where(pos > 0, (len(y) - pos) / pos.clamp(min=1), torch.ones_like(pos))
    probe = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / max(1, steps)))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=g).split(batch_size):
            loss = loss_fn(probe(x[batch]), targets[batch])
            if l1 > 0:
                loss = loss + l1 * probe.weight.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return probe.weight.detach().clone(), probe.bias.detach().clone()


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float((y & pred).sum())
    return 0.0 if tp == 0 else 2 * tp / (float(y.sum()) + float(pred.sum()))


def main_latents(codes_train: torch.Tensor, y_train: np.ndarray, codes_test: torch.Tensor, y_test: np.ndarray,
                 candidate_weights: torch.Tensor, *, signed: bool = False, max_k: int = 10,
                 f1_jump: float = 0.03) -> tuple[list[int], list[float]]:
    """(main latents, F1 per k): k-sparse probes on the top-k candidates; keep growing k while F1 jumps > f1_jump."""
    from sklearn.linear_model import LogisticRegression

    ranking = (candidate_weights.abs() if signed else candidate_weights).argsort(descending=True).tolist()
    chosen: list[int] = []
    f1s: list[float] = []
    best = -100.0
    for k in range(1, min(max_k, len(ranking)) + 1):
        ids = ranking[:k]
        clf = LogisticRegression(max_iter=500, class_weight="balanced")
        clf.fit(codes_train[:, ids].double().numpy(), y_train)
        f1 = _f1(y_test, clf.decision_function(codes_test[:, ids].double().numpy()) > 0)
        f1s.append(f1)
        if f1 > best + f1_jump:
            best, chosen = f1, ids
        else:
            break
    return chosen, f1s


def absorption_per_token(x: torch.Tensor, codes: torch.Tensor, decoder: torch.Tensor, probe_direction: torch.Tensor,
                         main: list[int], *, signed: bool = False, fraction_cos: float = 0.1, full_cos: float = 0.025,
                         proportion: float = 0.4, max_absorbers: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(absorption fraction (n,), full absorption (n,) bool) of each token for one letter's probe direction."""
    p = probe_direction.float() / probe_direction.float().norm()
    along = decoder.float() @ p  # W_dec[j] · p̂
    cos = along / decoder.float().norm(dim=1).clamp(min=EPS)
    proj = codes.float() * along  # each latent's probe projection, (n, F)
    act = x.float() @ p
    is_main = torch.zeros(decoder.shape[0], dtype=torch.bool)
    is_main[main] = True
    main_proj = proj[:, is_main].sum(1)
    candidates = torch.where((~is_main & (cos >= fraction_cos))[None, :] & (proj > 0), proj, torch.zeros_like(proj))
    absorbing = candidates.topk(min(max_absorbers, proj.shape[1]), dim=1).values.sum(1)
    safe_act = torch.where(act > 0, act, torch.ones_like(act))
    absorbed = torch.minimum(absorbing, act - main_proj)  # what the absorbers add, at most what is unaccounted
    partial = (absorbed / (absorbed + main_proj).clamp(min=EPS)).clamp(0.0, 1.0)
    fraction = torch.where(main_proj <= 0, torch.ones_like(act), partial)
    none = (act <= 0) | (main_proj >= act) | (absorbing / safe_act < proportion)
    fraction = torch.where(none, torch.zeros_like(act), fraction)

    fired = (proj[:, is_main] > EPS) if signed else (codes[:, is_main] >= EPS)
    top = proj.argmax(1)
    top_proj = proj.gather(1, top[:, None])[:, 0]
    full = (~fired.any(1)) & (cos[top] >= full_cos) & (act > 0) & (top_proj / safe_act >= proportion)
    return fraction, full


def split_tokens(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) token indices: a seeded permutation, the first round(n * test_fraction) held out."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    n_test = round(n * test_fraction)
    return order[n_test:], order[:n_test]


def absorption(x: torch.Tensor, letters: torch.Tensor, dictionary, codes: torch.Tensor | None = None, *,
               test_fraction: float = 0.2, max_k: int = 10, f1_jump: float = 0.03, min_probe_f1: float = 0.6,
               min_letters: int = 20, seed: int = 0) -> dict:
    """SAEBench's absorption metrics from activations x (N, d) at each word's token and its first letter (0..25)."""
    decoder = dictionary.decoder_directions.detach().float().cpu()
    if codes is None:
        with torch.no_grad():
            codes = dictionary.encode(x.float()).float().cpu()
    if x.ndim != 2 or codes.shape != (len(x), decoder.shape[0]) or len(letters) != len(x):
        raise InputError(f"absorption needs x (N, d), codes (N, {decoder.shape[0]}) and N letters; got x "
                         f"{tuple(x.shape)}, codes {tuple(codes.shape)}, {len(letters)} letters")
    signed = bool(getattr(dictionary, "signed_latents", False))
    y = letters.long()
    train, test = split_tokens(len(x), test_fraction, seed)
    n_test = len(test)
    if n_test == 0 or len(train) == 0:
        raise InputError(f"absorption needs tokens to train and test on, got {len(x)}")
    n_classes = int(y.max()) + 1
    w_probe, b_probe = train_multi_probe(x[train], y[train], n_classes, seed=seed)
    w_sparse, _ = train_multi_probe(codes[train], y[train], n_classes, epochs=50, l1=0.01, seed=seed)
    probe_scores = x[test].float() @ w_probe.T + b_probe
    y_test = y[test].numpy()
    per_letter: dict = {}
    for c in range(n_classes):
        name = LETTERS[c] if c < len(LETTERS) else str(c)
        is_c = y_test == c
        f1_probe = _f1(is_c, (probe_scores[:, c] > 0).numpy())
        row: dict = {"f1_probe": f1_probe, "num_test_tokens": int(is_c.sum())}
        per_letter[name] = row
        if f1_probe <= min_probe_f1:
            row["skipped"] = f"probe F1 {f1_probe:.2f} <= {min_probe_f1}"
            continue
        main, f1s = main_latents(codes[train], (y[train] == c).numpy(), codes[test], is_c, w_sparse[c],
                                 signed=signed, max_k=max_k, f1_jump=f1_jump)
        true_pos = torch.from_numpy(np.flatnonzero(is_c & (probe_scores[:, c] > 0).numpy()))
        fraction, full = absorption_per_token(x[test][true_pos], codes[test][true_pos], decoder, w_probe[c], main,
                                              signed=signed)
        n_tp = len(true_pos)
        row.update({"split_feats": main, "f1_sparse_by_k": f1s, "num_split_features": len(main),
                    "num_probe_true_positives": n_tp, "num_full_absorption": int(full.sum()),
                    "mean_absorption_fraction": float(fraction.sum()) / n_tp,
                    "full_absorption_rate": float(full.sum()) / n_tp})
    scored = [r for r in per_letter.values() if "mean_absorption_fraction" in r]

    def stats(key: str) -> tuple[float | None, float | None]:
        values = [float(r[key]) for r in scored]
        if not values:
            return None, None
        return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)

    out: dict = {"caveat": CAVEAT, "signed_latents": signed, "letters_evaluated": len(scored),
                 "enough_letters": len(scored) >= min_letters, "min_letters": min_letters,
                 "n_tokens": len(x), "n_test_tokens": n_test, "per_letter": per_letter}
    for key, name in (("mean_absorption_fraction", "mean_absorption_fraction_score"),
                      ("full_absorption_rate", "mean_full_absorption_score"),
                      ("num_split_features", "mean_num_split_features")):
        mean, sd = stats(key)
        out[name] = mean
        out["std_dev_" + name.removeprefix("mean_")] = sd
    return out
