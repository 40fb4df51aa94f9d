"""Downstream fidelity: splice a dictionary into the model and compare next-token predictions.

Two variants of the same measurement are reported side by side; they differ only in what
"zero-ablation" means and in which predictions are averaged.

conca's own (``ce_loss_recovered``, ``kl_div_score`` and their parts). At the masked-in positions
(real text tokens; BOS/EOS/special positions are left alone, as they are never in the training
data) the site's activation is replaced by
  * the dictionary's reconstruction x_hat = decode(encode(x))  -> CE_dict, KL_dict
  * zeros (zero-ablation of the same positions)               -> CE_zero, KL_zero
and compared with the clean run (CE_clean). Predictions are scored at every position whose
target is a real token (the BOS -> first token prediction included), since a splice at position
t changes all predictions at t and after.

  ce_loss_recovered = (CE_zero - CE_dict) / (CE_zero - CE_clean)   (1 = as good as clean, 0 = as bad as zeros)
  kl_div            = mean over scored positions of KL(p_clean || p_dict)
  kl_div_score      = (KL_zero - KL_dict) / KL_zero

SAELens' (``*_saelens``), mirroring sae_lens.evals.run_evals with its default
exclude_special_tokens=True (get_downstream_reconstruction_metrics -> get_recons_loss, sae_lens
6.54): the dictionary replaces the real-token positions only, exactly as above
(standard_replacement_hook: torch.where(mask, sae_out, activations)); but zero-ablation zeroes
the site at EVERY position, BOS and EOS included (standard_zero_ablate_hook: zeros_like). CE is
averaged over the predictions made FROM a real token (ce per token masked with mask[:, :-1]: the
BOS -> first token prediction is left out, a real -> EOS one is kept), KL over every real-token
position (the last one of a context included). So
  ce_loss_recovered_saelens = (CE_zero_all - CE_dict) / (CE_zero_all - CE_clean)   = SAELens' ce_loss_score
  kl_div_score_saelens      = (KL_zero_all - KL_dict) / KL_zero_all                = SAELens' kl_div_score
with ce_loss_clean_saelens = ce_loss_without_sae, ce_loss_spliced_saelens = ce_loss_with_sae,
ce_loss_zero_ablated_saelens = ce_loss_with_ablation, kl_div_saelens = kl_div_with_sae and
kl_div_zero_ablated_saelens = kl_div_with_ablation. The two baselines differ: on a Llama-type
model (no biases) zeros at every position of a residual site stay zeros through every later
block, so the logits are 0 and CE_zero_all = ln(vocab) exactly (uniform predictions), whereas
zeros at the real tokens only, with BOS intact, give confidently wrong predictions. On SmolLM2 at
resid.15: CE_zero = 15.33, CE_zero_all = ln(49152) = 10.80, CE_clean 3.3-3.4 nats; the SAELens
gap is the smaller one, so the same dictionary scores lower there. The "real-token"
mask is conca's (every special id of the tokenizer); SAELens' own excludes BOS/EOS/PAD/SEP only,
which is the same on plain text.

and the splice-to-logits agreement of ConCA App. O, spliced vs clean next-token distributions:
  argmax_agreement  = share of positions where the top token is the same
  top10_overlap     = mean |top10_clean & top10_dict| / 10
  js_divergence     = mean Jensen-Shannon divergence (nats; 0 = identical, ln 2 = disjoint)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from conca.dictionaries.base import Dictionary
from conca.models.sites import Site, replace_output
from conca.text.batching import Contexts


def _masked(fn: Callable[[torch.Tensor], torch.Tensor], mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[mask] = fn(x[mask]).to(x.dtype)
        return out

    return apply


def _next_token_stats(logits: torch.Tensor, ids: torch.Tensor, clean_logp: torch.Tensor | None):
    """Log-probabilities (B, T, V) and KL(clean || this) (B, T) at every position, and the
    next-token CE (B, T-1) of the predictions that have a target."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ce = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    kl = None if clean_logp is None else (clean_logp.exp() * (clean_logp - logp)).sum(-1)
    return logp, ce, kl


def logit_agreement(clean_logp: torch.Tensor, logp: torch.Tensor, top: int = 10) -> dict[str, torch.Tensor]:
    """Per-position argmax match, top-`top` overlap and Jensen-Shannon divergence (nats) of two
    log-distributions over the last axis."""
    p, q = clean_logp.exp(), logp.exp()
    log_m = torch.logsumexp(torch.stack([clean_logp, logp]), dim=0) - torch.log(torch.tensor(2.0))
    js = 0.5 * (p * (clean_logp - log_m)).sum(-1) + 0.5 * (q * (logp - log_m)).sum(-1)
    top = min(top, clean_logp.shape[-1])
    a, b = clean_logp.topk(top, dim=-1).indices, logp.topk(top, dim=-1).indices
    overlap = (a[..., :, None] == b[..., None, :]).any(-1).float().mean(-1)
    return {"argmax": (a[..., 0] == b[..., 0]).float(), "top10": overlap, "js": js.clamp_min(0.0)}


# Logit elements (batch x positions x vocab) one forward may hold: the metrics keep several float32
# copies of the logits (log-probabilities, probabilities, the JS mixture), so this bounds the peak to
# about 2 GB whatever the vocabulary. Gemma 3's 262,144-token vocabulary at 128 positions is 33.5M
# elements per context: at the default 8 contexts a batch it peaked at 13.4 GB.
LOGIT_BUDGET = 2 ** 26


def contexts_per_batch(batch_size: int, positions: int, vocab: int, budget: int = LOGIT_BUDGET) -> int:
    """`batch_size`, shrunk so that one batch's logits stay within `budget` elements (at least one context)."""
    return max(1, min(batch_size, budget // max(1, positions * vocab)))


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1)


@torch.inference_mode()
def downstream_metrics_many(
    model: nn.Module,
    dictionaries: dict[str, Dictionary],
    site: "Site | str",
    contexts: Contexts,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Downstream metrics (conca's and SAELens' variants, see the module docstring) for several
    dictionaries at one site; the clean and the two zero-ablated passes are run once and shared."""
    site = Site.parse(site)
    device = next(model.parameters()).device
    batch_size = contexts_per_batch(batch_size, contexts.ids.shape[1], _vocab_size(model))
    # Each per-position value is averaged over its own set of positions (see the module docstring).
    sums: dict[str, float] = {}
    counts = {"conca": 0, "saelens_ce": 0, "saelens_kl": 0}

    def add(key: str, value: torch.Tensor, positions: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value[positions].double().sum())

    for b in range(0, len(contexts), batch_size):
        ids = contexts.ids[b:b + batch_size].to(device)
        mask = contexts.mask[b:b + batch_size].to(device)
        # conca: predictions whose target is a real token (not padding or a BOS/EOS).
        # SAELens: CE of predictions made from a real token; KL at every real-token position.
        where = {"conca": mask[:, 1:], "saelens_ce": mask[:, :-1], "saelens_kl": mask}
        for kind, positions in where.items():
            counts[kind] += int(positions.sum())

        def add_ce_kl(prefix: str, ce: torch.Tensor, kl: torch.Tensor | None) -> None:
            add(f"ce_{prefix}", ce, where["conca"])
            add(f"ce_{prefix}@saelens", ce, where["saelens_ce"])
            if kl is not None:
                add(f"kl_{prefix}", kl[:, :-1], where["conca"])
                add(f"kl_{prefix}@saelens", kl, where["saelens_kl"])

        clean_logp, ce_clean, _ = _next_token_stats(model(input_ids=ids, use_cache=False).logits, ids, None)
        add_ce_kl("clean", ce_clean, None)
        with replace_output(model, site, _masked(torch.zeros_like, mask)):
            _, ce_zero, kl_zero = _next_token_stats(model(input_ids=ids, use_cache=False).logits, ids, clean_logp)
        add_ce_kl("zero", ce_zero, kl_zero)
        # SAELens' zero-ablation: every position of the site, BOS included.
        with replace_output(model, site, torch.zeros_like):
            _, ce_zero_all, kl_zero_all = _next_token_stats(model(input_ids=ids, use_cache=False).logits, ids,
                                                            clean_logp)
        add_ce_kl("zero_all", ce_zero_all, kl_zero_all)
        for name, dictionary in dictionaries.items():
            dictionary = dictionary.to(device).eval()
            splice = _masked(lambda x, d=dictionary: d.decode(d.encode(x.float())), mask)
            with replace_output(model, site, splice):
                logp, ce_dict, kl_dict = _next_token_stats(model(input_ids=ids, use_cache=False).logits, ids,
                                                           clean_logp)
            add_ce_kl(f"dict:{name}", ce_dict, kl_dict)
            for key, value in logit_agreement(clean_logp[:, :-1], logp[:, :-1]).items():
                add(f"{key}:{name}", value, where["conca"])
    return {name: _summarise(sums, counts, name) for name in dictionaries}


def _recovered(zero: float, spliced: float, clean: float) -> float:
    return (zero - spliced) / (zero - clean) if zero != clean else float("nan")


def _summarise(sums: dict[str, float], counts: dict[str, int], name: str) -> dict[str, float]:
    def mean(key: str, kind: str) -> float:
        return sums[key] / max(counts[kind], 1)

    ce_clean, ce_dict, ce_zero = mean("ce_clean", "conca"), mean(f"ce_dict:{name}", "conca"), mean("ce_zero", "conca")
    kl_dict, kl_zero = mean(f"kl_dict:{name}", "conca"), mean("kl_zero", "conca")
    s_clean, s_dict = mean("ce_clean@saelens", "saelens_ce"), mean(f"ce_dict:{name}@saelens", "saelens_ce")
    s_zero = mean("ce_zero_all@saelens", "saelens_ce")
    s_kl_dict, s_kl_zero = mean(f"kl_dict:{name}@saelens", "saelens_kl"), mean("kl_zero_all@saelens", "saelens_kl")
    return {
        "ce_loss_clean": ce_clean,
        "ce_loss_spliced": ce_dict,
        "ce_loss_zero_ablated": ce_zero,
        "ce_loss_recovered": _recovered(ce_zero, ce_dict, ce_clean),
        "delta_lm_loss": ce_dict - ce_clean,
        "kl_div": kl_dict,
        "kl_div_zero_ablated": kl_zero,
        "kl_div_score": (kl_zero - kl_dict) / kl_zero if kl_zero > 0 else float("nan"),
        "argmax_agreement": mean(f"argmax:{name}", "conca"),
        "top10_overlap": mean(f"top10:{name}", "conca"),
        "js_divergence": mean(f"js:{name}", "conca"),
        "n_scored_tokens": float(counts["conca"]),
        # SAELens' run_evals variant (zero-ablation at every position, BOS included).
        "ce_loss_clean_saelens": s_clean,
        "ce_loss_spliced_saelens": s_dict,
        "ce_loss_zero_ablated_saelens": s_zero,
        "ce_loss_recovered_saelens": _recovered(s_zero, s_dict, s_clean),
        "kl_div_saelens": s_kl_dict,
        "kl_div_zero_ablated_saelens": s_kl_zero,
        "kl_div_score_saelens": (s_kl_zero - s_kl_dict) / s_kl_zero if s_kl_zero > 0 else float("nan"),
        "n_scored_tokens_saelens": float(counts["saelens_ce"]),
    }


def downstream_metrics(
    model: nn.Module,
    dictionary: Dictionary,
    site: "Site | str",
    contexts: Contexts,
    batch_size: int = 8,
) -> dict[str, float]:
    """CE loss (clean, spliced, zero-ablated), CE loss recovered, KL and KL score on `contexts`."""
    return downstream_metrics_many(model, {"dictionary": dictionary}, site, contexts, batch_size)["dictionary"]
