"""Downstream fidelity: splice a dictionary into the model and compare next-token predictions.

At the masked-in positions (real text tokens; BOS/special positions are left alone, as they
are never in the training data) the site's activation is replaced by
  * the dictionary's reconstruction x_hat = decode(encode(x))  -> CE_dict, KL_dict
  * zeros (zero-ablation)                                     -> CE_zero, KL_zero
and compared with the clean run (CE_clean). Predictions are scored at every position that has a
next token, since a splice at position t changes all predictions at t and after.

  ce_loss_recovered = (CE_zero - CE_dict) / (CE_zero - CE_clean)   (1 = as good as clean, 0 = as bad as zeros)
  kl_div            = mean over scored positions of KL(p_clean || p_dict)
  kl_div_score      = (KL_zero - KL_dict) / KL_zero

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
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
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


@torch.inference_mode()
def downstream_metrics_many(
    model: nn.Module,
    dictionaries: dict[str, Dictionary],
    site: "Site | str",
    contexts: Contexts,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Downstream metrics for several dictionaries at one site; the clean and zero-ablated
    passes are run once and shared."""
    site = Site.parse(site)
    device = next(model.parameters()).device
    keys = ["ce_clean", "ce_zero", "kl_zero"] + [f"{k}:{name}" for name in dictionaries
                                                 for k in ("ce_dict", "kl_dict", "argmax", "top10", "js")]
    sums = dict.fromkeys(keys, 0.0)
    count = 0
    for b in range(0, len(contexts), batch_size):
        ids = contexts.ids[b:b + batch_size].to(device)
        mask = contexts.mask[b:b + batch_size].to(device)
        # Score predictions whose target is a real token (not padding or a BOS of the next context).
        scored = mask[:, 1:]
        count += int(scored.sum())
        clean_logp, ce_clean, _ = _next_token_stats(model(input_ids=ids, use_cache=False).logits, ids, None)
        with replace_output(model, site, _masked(torch.zeros_like, mask)):
            _, ce_zero, kl_zero = _next_token_stats(model(input_ids=ids, use_cache=False).logits, ids, clean_logp)
        values = {"ce_clean": ce_clean, "ce_zero": ce_zero, "kl_zero": kl_zero}
        for name, dictionary in dictionaries.items():
            dictionary = dictionary.to(device).eval()
            splice = _masked(lambda x, d=dictionary: d.decode(d.encode(x.float())), mask)
            with replace_output(model, site, splice):
                logp, values[f"ce_dict:{name}"], values[f"kl_dict:{name}"] = _next_token_stats(
                    model(input_ids=ids, use_cache=False).logits, ids, clean_logp)
            for key, value in logit_agreement(clean_logp, logp).items():
                values[f"{key}:{name}"] = value
        for key, value in values.items():
            sums[key] += float(value[scored].double().sum())
    means = {k: v / max(count, 1) for k, v in sums.items()}
    ce_gap = means["ce_zero"] - means["ce_clean"]
    results = {}
    for name in dictionaries:
        ce_dict, kl_dict = means[f"ce_dict:{name}"], means[f"kl_dict:{name}"]
        results[name] = {
            "ce_loss_clean": means["ce_clean"],
            "ce_loss_spliced": ce_dict,
            "ce_loss_zero_ablated": means["ce_zero"],
            "ce_loss_recovered": (means["ce_zero"] - ce_dict) / ce_gap if ce_gap != 0 else float("nan"),
            "delta_lm_loss": ce_dict - means["ce_clean"],
            "kl_div": kl_dict,
            "kl_div_zero_ablated": means["kl_zero"],
            "kl_div_score": (means["kl_zero"] - kl_dict) / means["kl_zero"] if means["kl_zero"] > 0 else float("nan"),
            "argmax_agreement": means[f"argmax:{name}"],
            "top10_overlap": means[f"top10:{name}"],
            "js_divergence": means[f"js:{name}"],
            "n_scored_tokens": float(count),
        }
    return results


def downstream_metrics(
    model: nn.Module,
    dictionary: Dictionary,
    site: "Site | str",
    contexts: Contexts,
    batch_size: int = 8,
) -> dict[str, float]:
    """CE loss (clean, spliced, zero-ablated), CE loss recovered, KL and KL score on `contexts`."""
    return downstream_metrics_many(model, {"dictionary": dictionary}, site, contexts, batch_size)["dictionary"]
