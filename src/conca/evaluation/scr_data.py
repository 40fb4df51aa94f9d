"""SCR/TPP on text: the shipped profession x gender dataset, mean-pooled activations, and one runner.

* `load_scr_dataset` reads ``conca/data/tasks/scr_profession_gender.jsonl`` (written by
  ``scripts/make_scr_data.py``; {"text", "profession", "gender"} per line; 1,600 bios, 200 per
  profession x gender cell) or a user's file of that shape. As in SAEBench's bias_in_bios, gender is
  loud (said in every sentence) and profession quiet (one clause), so a probe trained on the biased
  set leans on gender and SCR has room to move (the script's docstring says how).
* `pooled_text_activations` runs a loaded model over texts and returns, per text, the mean of the site
  activations over its non-special tokens and, per dictionary, the mean of the latents of those tokens
  (SAEBench: ``activation_collection.create_meaned_model_activations`` and the per-token encode in
  ``scr_and_tpp/main.py``; BOS/pad/EOS masked out; context 128 tokens).
* `scr_tpp_on_model` runs SCR over SAEBench-style profession pairs and TPP over all professions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from conca.errors import InputError
from conca.evaluation.scr_tpp import N_VALUES, scr, tpp
from conca.evaluation.tasks import jsonl_objects
from conca.models.load import LoadedModel
from conca.models.prompts import group_by_length
from conca.models.sites import Site, run_to_sites

SCR_DATASET = "scr_profession_gender.jsonl"
# Profession pairs for SCR (SAEBench's bias_in_bios pairs include professor/nurse and architect/journalist).
SCR_PAIRS = (("professor", "nurse"), ("architect", "journalist"))
GENDERS = ("male", "female")  # SAEBench's column2 values: male is the positive class


def _device(dictionary) -> torch.device:
    try:
        return next(dictionary.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def load_scr_dataset(path: str | Path | None = None) -> list[dict]:
    """Rows {"text", "profession", "gender"}: the shipped dataset, or a JSONL file of that shape."""
    if path is None:
        text = resources.files("conca.data").joinpath("tasks", SCR_DATASET).read_text(encoding="utf-8")
        where = SCR_DATASET
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot read SCR dataset {path}: {e.strerror or e}") from None
        where = str(path)
    rows = []
    for line, row in jsonl_objects(text, where, "string fields text, profession and gender"):
        if not all(isinstance(row.get(k), str) for k in ("text", "profession", "gender")):
            raise InputError(f"{line}: needs string fields text, profession and gender")
        rows.append(row)
    if not rows:
        raise InputError(f"{where} holds no examples")
    return rows


@torch.inference_mode()
def pooled_text_activations(loaded: LoadedModel, texts: Sequence[str], site: Site | str,
                            dictionaries: Sequence = (), ctx_len: int = 128,
                            batch_size: int = 16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(x (N, d), [codes (N, F) per dictionary]): per text, the means over its non-special tokens of the
    site activations and of each dictionary's latents (each token encoded, then averaged)."""
    site = Site.parse(site)
    tok = loaded.tokenizer
    bos = getattr(tok, "bos_token_id", None)
    special = set(getattr(tok, "all_special_ids", None) or [])
    token_lists = []
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids[:ctx_len - (bos is not None)]
        ids = ([bos] if bos is not None else []) + list(ids)
        if not any(i not in special for i in ids):
            raise InputError(f"text {text[:40]!r} has no tokens to pool")
        token_lists.append(ids)
    device = next(loaded.model.parameters()).device
    x_out: torch.Tensor | None = None
    codes_out: list[torch.Tensor | None] = [None] * len(dictionaries)
    for indices in group_by_length(token_lists, batch_size):
        # Equal lengths within a batch: no padding, no attention mask needed.
        ids = torch.tensor([token_lists[i] for i in indices], device=device)
        acts = run_to_sites(loaded.model, ids, [site])[site].float().cpu()
        mask = torch.tensor([[t not in special for t in token_lists[i]] for i in indices])
        counts = mask.sum(1, keepdim=True).float()
        if x_out is None:
            x_out = torch.zeros(len(texts), acts.shape[-1])
        rows = torch.tensor(indices)
        x_out[rows] = (acts * mask[..., None]).sum(1) / counts
        owner = torch.arange(len(indices))[:, None].expand_as(mask)[mask]
        for k, dictionary in enumerate(dictionaries):
            z = dictionary.encode(acts[mask].to(_device(dictionary))).float().cpu()
            if codes_out[k] is None:
                codes_out[k] = torch.zeros(len(texts), z.shape[-1])
            pooled = torch.zeros(len(indices), z.shape[-1]).index_add_(0, owner, z) / counts
            codes_out[k][rows] = pooled
    return x_out, codes_out  # type: ignore[return-value]


def combine_pairs(per_pair: Mapping[str, dict]) -> dict:
    """SCR over several attribute pairs: each scr_* score averaged over the pairs (SAEBench averages its
    runs key by key), the standard errors combined as those of a mean of independent estimates, and
    every pair's own result under "per_pair"."""
    results = list(per_pair.values())
    keys = [k for k in results[0] if k.startswith("scr_") and k != "scr_metric_direction"]
    out = {}
    for k in keys:
        values = np.array([p[k] for p in results], dtype=np.float64)
        se = "standard_error" in k
        out[k] = float(np.sqrt((values ** 2).sum()) / len(values) if se else values.mean())
    return {**out, "per_pair": dict(per_pair)}


def scr_tpp_on_model(loaded: LoadedModel, site: Site | str, dictionaries: Mapping[str, object], *,
                     rows: Sequence[dict] | None = None, pairs: Sequence[tuple[str, str]] = SCR_PAIRS,
                     n_values: Sequence[int] = N_VALUES, seed: int = 0, batch_size: int = 16) -> dict:
    """{name: {"scr": ..., "tpp": ...}} for each dictionary on the profession x gender dataset.

    SCR is run per profession pair and averaged key by key (SAEBench averages its dataset runs);
    TPP over every profession in the data. The model runs once; every dictionary reuses the activations."""
    rows = list(rows) if rows is not None else load_scr_dataset()
    texts = [r["text"] for r in rows]
    names = list(dictionaries)
    x, codes = pooled_text_activations(loaded, texts, site, [dictionaries[n] for n in names], batch_size=batch_size)
    profession = np.array([r["profession"] for r in rows])
    male = torch.tensor([r["gender"] == GENDERS[0] for r in rows]).long()
    professions = sorted(set(profession.tolist()))
    classes = torch.tensor([professions.index(p) for p in profession])
    out: dict = {}
    for name, z in zip(names, codes):
        per_pair = {}
        for pos, neg in pairs:
            keep = np.isin(profession, [pos, neg])
            if keep.sum() == 0:
                raise InputError(f"the SCR dataset has no examples of {pos} or {neg}")
            sel = torch.from_numpy(np.flatnonzero(keep))
            a = torch.from_numpy(profession[keep] == pos).long()
            per_pair[f"{pos}_{neg}"] = scr(x[sel], a, male[sel], dictionaries[name], z[sel], n_values=n_values, seed=seed)
        scr_out = combine_pairs(per_pair)
        tpp_out = tpp(x, classes, dictionaries[name], z, n_values=n_values, seed=seed)
        tpp_out["classes"] = professions
        out[name] = {"scr": scr_out, "tpp": tpp_out}
    return out
