"""A dictionary on labelled tasks: each text's activations at the dictionary's site and its latents,
mean-pooled over the text's real tokens, then SAEBench's k-sparse probing (conca.evaluation.sparse_probing).

Tokenisation as SAEBench (context_length 128, the beginning kept) and conca's contexts: BOS first when
the tokenizer has one, the text's own tokens after it, cut at `ctx_len`. The mean runs over the
positions that are not special tokens (BOS, EOS, padding: conca's masks, SAEBench's
``mask_bos_pad_eos_tokens``). Texts are batched by token length, so no batch holds padding and nothing
depends on a model's handling of it."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

import conca
from conca.dictionaries.base import Dictionary
from conca.errors import InputError
from conca.evaluation.sparse_probing import K_VALUES, SEED, probe_task, saebench_output, tasks_summary
from conca.evaluation.tasks import TEST_FRACTION, Task
from conca.models.load import LoadedModel
from conca.models.sites import Site, run_to_sites

_TOKENIZE_BATCH = 256


def task_token_ids(tokenizer, texts: "list[str] | tuple[str, ...]", ctx_len: int = 128,
                   name: str = "task") -> tuple[list[list[int]], list[list[bool]]]:
    """Each text's token ids (BOS first when the tokenizer has one, cut at ctx_len) and its mask of
    real tokens; a text with no real token is refused (InputError naming it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    ids_lists: list[list[int]] = []
    masks: list[list[bool]] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        encoded = tokenizer(list(texts[start:start + _TOKENIZE_BATCH]), add_special_tokens=False)["input_ids"]
        for offset, ids in enumerate(encoded):
            ids = ([int(bos)] if isinstance(bos, int) else []) + [int(t) for t in ids]
            ids = ids[:ctx_len]
            mask = [t not in special for t in ids]
            if not any(mask):
                raise InputError(f"{name}: example {start + offset + 1} ({texts[start + offset][:40]!r}) has no "
                                 f"tokens besides special ones within {ctx_len} tokens")
            ids_lists.append(ids)
            masks.append(mask)
    return ids_lists, masks


def _length_batches(ids_lists: list[list[int]], tokens_per_batch: int) -> list[list[int]]:
    """Indices grouped by token length, each group cut so that a batch holds about tokens_per_batch tokens."""
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(ids_lists):
        by_length.setdefault(len(ids), []).append(i)
    batches = []
    for length, group in sorted(by_length.items()):
        rows = max(1, tokens_per_batch // length)
        batches.extend(group[b:b + rows] for b in range(0, len(group), rows))
    return batches


def _device_of(module: torch.nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.inference_mode()
def pooled_activations_many(loaded: LoadedModel, dictionaries: "dict[str, Dictionary]", site: "Site | str",
                            texts: "list[str] | tuple[str, ...]", ctx_len: int = 128, batch_size: int = 8,
                            name: str = "task") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(raw, {dictionary name: latents}): per text, the mean over its real tokens of the site's
    activations (n, d_model) and of each dictionary's latents of them (n, n_latents), float32 on the
    CPU, from one pass of the model. `batch_size` counts contexts of `ctx_len` tokens, as elsewhere in
    evaluate; short texts fill a batch to that many tokens."""
    site = Site.parse(site)
    ids_lists, masks = task_token_ids(loaded.tokenizer, texts, ctx_len, name)
    model_device = _device_of(loaded.model)
    d_model = next(iter(dictionaries.values())).config.d_in
    raw = torch.zeros(len(texts), d_model)
    latents = {key: torch.zeros(len(texts), dictionary.config.n_latents) for key, dictionary in dictionaries.items()}
    batches = _length_batches(ids_lists, batch_size * ctx_len)
    # A bar on a terminal only (disable=None): all four shipped tasks are ~80k tokens, minutes on a CPU.
    for indices in tqdm(batches, desc=f"task {name}", disable=None, leave=False):
        ids = torch.tensor([ids_lists[i] for i in indices], device=model_device)
        mask = torch.tensor([masks[i] for i in indices])
        acts = run_to_sites(loaded.model, ids, [site])[site].float().cpu()
        x = acts[mask]  # (real tokens, d): rows in order, row by row
        rows = torch.repeat_interleave(torch.arange(len(indices)), mask.sum(1))
        counts = mask.sum(1, keepdim=True).float()
        index = torch.tensor(indices)
        raw[index] = torch.zeros(len(indices), x.shape[1]).index_add_(0, rows, x) / counts
        for key, dictionary in dictionaries.items():
            dictionary.eval()  # inference form: BatchNorm's running statistics, BatchTopK's threshold
            dictionary.check_input(x)
            z = dictionary.encode(x.to(_device_of(dictionary))).float().cpu()
            latents[key][index] = torch.zeros(len(indices), z.shape[1]).index_add_(0, rows, z) / counts
    return raw, latents


def pooled_activations(loaded: LoadedModel, dictionary: Dictionary, site: "Site | str", texts: "list[str] | tuple[str, ...]",
                       ctx_len: int = 128, batch_size: int = 8, name: str = "task") -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, latents) of one dictionary: pooled_activations_many's per-text means."""
    raw, latents = pooled_activations_many(loaded, {"dictionary": dictionary}, site, texts, ctx_len, batch_size, name)
    return raw, latents["dictionary"]


def evaluate_tasks(loaded: LoadedModel, dictionary: Dictionary, site: "Site | str", tasks: list[Task],
                   ctx_len: int = 128, batch_size: int = 8, k_values: "tuple[int, ...]" = K_VALUES,
                   seed: int = SEED, test_fraction: float = TEST_FRACTION) -> dict[str, dict]:
    """{task name: probe_task result} for every task (its seeded stratified split)."""
    results = {}
    for task in tasks:
        raw, latents = pooled_activations(loaded, dictionary, site, task.texts, ctx_len, batch_size, name=task.name)
        train, test = task.split(test_fraction, seed)
        results[task.name] = probe_task(latents.numpy(), np.asarray(task.labels), train, test, task.classes,
                                        raw=raw.numpy(), k_values=k_values, seed=seed)
    return results


def probe_tasks(loaded: LoadedModel, dictionary: Dictionary, site: "Site | str", tasks: list[Task], ctx_len: int = 128,
                batch_size: int = 8, dictionary_path: str = "") -> tuple[dict, dict]:
    """`evaluate_tasks` with the defaults, as (the summary `conca evaluate` writes under "tasks" in
    metrics.json, the same run in SAEBench's results layout for sparse_probing.json)."""
    per_task = evaluate_tasks(loaded, dictionary, site, tasks, ctx_len, batch_size)
    summary = tasks_summary(per_task, context_length=ctx_len, signed_latents=dictionary.signed_latents)
    described = {"method": dictionary.name, "config": asdict(dictionary.config),
                 "signed_latents": dictionary.signed_latents, "path": dictionary_path}
    return summary, saebench_output(per_task, model=loaded.name, site=str(site), dictionary=described,
                                    context_length=ctx_len, conca_version=conca.__version__)


__all__ = ["task_token_ids", "pooled_activations", "pooled_activations_many", "evaluate_tasks", "probe_tasks"]
