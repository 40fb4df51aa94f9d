"""What each latent writes, read in the vocabulary: the unembedding applied to its decoder direction.

For latent j with decoder direction d_j (written at the site the decoder writes: the dictionary's
site, or a transcoder's output site) the projection is W_U d_j, the change of every logit per unit
of z_j. At `final` (the final norm's output, which the unembedding reads directly) this is exact: the
direct effect of adding z_j d_j there (an lm_head bias adds the same to both sides and cancels). At
any other site the direction still has to pass later layers and the final norm; it is read through
the norm's gain only (RMSNorm: g * d; LayerNorm: g * (d - mean d)), linearised: the norm's division
by the token's RMS (or standard deviation) and every later layer are left out. `how` says which.
"""

from __future__ import annotations

import torch
from torch import nn

from conca.dictionaries.base import Dictionary
from conca.errors import ConfigError, ShapeError
from conca.models.sites import Site, final_norm

# Latents per matmul chunk: bounded so that chunk x vocabulary float32 logits stay near 64 MiB.
_CHUNK_BYTES = 64 * 2**20


def unembedding(model: nn.Module) -> torch.Tensor:
    """W_U (vocab, d_model): the weight of the model's output embedding (lm_head), tied or not."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ConfigError(f"cannot find the unembedding (lm_head) of {type(model).__name__}")
    return weight


def final_norm_map(model: nn.Module) -> tuple[torch.Tensor | None, bool, str]:
    """(gain (d_model,) or None, centres, name) of the final norm, linearised around its scale."""
    norm = final_norm(model)
    weight = getattr(norm, "weight", None)
    gain = weight.detach().float() if isinstance(weight, torch.Tensor) else None
    kind = type(norm).__name__
    if gain is not None and "gemma" in kind.lower():
        gain = 1.0 + gain  # Gemma's RMSNorm stores its gain as an offset from 1
    centres = isinstance(norm, nn.LayerNorm) or "layernorm" in kind.lower()
    return gain, centres, kind


def describe_how(site: "Site | str", norm_kind: str = "", centres: bool = False) -> str:
    """How the projections at `site` relate to the logits (the atlas shows it above the table)."""
    site = Site.parse(site)
    if site.kind == "final":
        return "exact at final: the unembedding of each decoder direction (logit change per unit of the latent)"
    centred = ", centred as the LayerNorm does" if centres else ""
    inside = (f"; {site} is inside a block, not on the residual stream, so this is only indicative"
              if site.kind == "mlp_in" else "")
    return (f"at {site}, through the final norm's gain ({norm_kind}{centred}), linearised: the norm's "
            f"scaling by the token's RMS and all later layers are left out{inside}")


def vocab_projections(model: nn.Module, tokenizer, dictionary: Dictionary, site: "Site | str", top: int = 10,
                      out_site: "Site | str | None" = None) -> tuple[str, list[dict]]:
    """(how, per latent {"top": [[token, value], ...], "bottom": [...]}): the `top` tokens each
    latent's decoder direction promotes most (descending) and suppresses most (most negative first).

    A transcoder's decoder writes `out_site` (required for one); otherwise the dictionary's `site`."""
    if top < 1:
        raise ConfigError(f"top must be >= 1, got {top}")
    if dictionary.is_transcoder:
        if out_site is None:
            raise ConfigError(f"{dictionary.name} is a transcoder: its decoder writes its output site, pass out_site")
        site = out_site
    site = Site.parse(site)
    w_u = unembedding(model).detach()
    directions = dictionary.decoder_directions.detach()
    if directions.shape[1] != w_u.shape[1]:
        raise ShapeError(f"the dictionary writes width {directions.shape[1]} but the model's unembedding reads "
                         f"width {w_u.shape[1]}")
    device = w_u.device
    w_u = w_u.float()
    gain, centres, kind = (None, False, "") if site.kind == "final" else final_norm_map(model)
    how = describe_how(site, kind, centres)
    vocab = w_u.shape[0]
    k = min(top, vocab)
    chunk = max(1, _CHUNK_BYTES // (4 * vocab))
    cache: dict[int, str] = {}

    def token(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i])
        return cache[i]

    out: list[dict] = []
    with torch.no_grad():
        for start in range(0, directions.shape[0], chunk):
            d = directions[start:start + chunk].to(device=device, dtype=torch.float32)
            if centres:
                d = d - d.mean(dim=1, keepdim=True)
            if gain is not None:
                d = d * gain.to(device)
            logits = d @ w_u.T  # (chunk, vocab)
            high, high_ids = logits.topk(k, dim=1)
            low, low_ids = logits.topk(k, dim=1, largest=False)
            for row in range(len(d)):
                out.append({
                    "top": [[token(i), v] for i, v in zip(high_ids[row].tolist(), high[row].tolist())],
                    "bottom": [[token(i), v] for i, v in zip(low_ids[row].tolist(), low[row].tolist())]})
    return how, out
