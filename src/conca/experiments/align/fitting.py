"""Training and measuring the dictionaries of `conca align` (AlignSAE and the unsupervised
baseline), and the identity-keyed caches that let a re-run reuse finished work."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from conca.activations.stream import TensorSource
from conca.dictionaries.align import AlignSAE
from conca.dictionaries.base import Dictionary, create
from conca.evaluation import alignment
from conca.experiments.align.selection import train_keeping_best
from conca.experiments.lab_options import AlignOptions
from conca.fileio import atomic_write_bytes, atomic_write_json
from conca.synthetic.biographies import RELATIONS
from conca.training.trainer import TrainConfig, evaluate_batch, train


def _cached_json(path: Path, identity: dict, compute) -> dict:
    """The value stored at `path` for this identity, or compute and store it."""
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("identity") == identity:
            return stored["value"]
    value = compute()
    atomic_write_json(path, {"identity": identity, "value": value})
    return value


def _cached_tensors(path: Path, identity: dict, compute) -> dict[str, torch.Tensor]:
    key = json.dumps(identity, sort_keys=True)
    if path.exists():
        data = path.read_bytes()
        # safetensors: an 8-byte little-endian header length, then the JSON header with our metadata.
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        if header.get("__metadata__", {}).get("identity") == key:
            return st_load(data)
    tensors = compute()
    atomic_write_bytes(path, st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"identity": key}))
    return tensors


def fit_alignsae(x: torch.Tensor, concepts: torch.Tensor, values: torch.Tensor, concept_names: list[str],
                 value_labels: list[str], opts: AlignOptions, n_free: int, steps: int, out_dir: Path, site: str,
                 eval_x: torch.Tensor | None = None,
                 select: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[AlignSAE, list[dict], dict | None]:
    """Train one AlignSAE on rows x with their concept and value-class labels (resumable in out_dir);
    saved to out_dir/align with its site, so `conca steer --dictionary out_dir/align` finds it.

    With `select` = (held-out rows, their concepts), the weights kept are those of the evaluation
    step with the best held-out diagonal accuracy (conca.experiments.align.selection), and the third
    value says which step that was; without, the last step's weights are kept and it is None."""
    torch.manual_seed(opts.seed)
    sae = create("align", d_in=x.shape[1], n_latents=n_free + len(concept_names), concepts=concept_names,
                 activation=opts.activation, k=min(opts.k, n_free), align_loss=opts.align_loss,
                 recon_coeff=opts.recon_coeff, sparse_coeff=opts.sparse_coeff, align_coeff=opts.align_coeff,
                 indep_coeff=opts.indep_coeff, ortho_coeff=opts.ortho_coeff, value_coeff=opts.value_coeff,
                 pretrain_fraction=opts.pretrain_fraction, pretrain_sparsity=opts.pretrain_sparsity,
                 value_labels=value_labels if opts.value_coeff > 0 else [])
    cfg = _train_config(opts, steps, len(x))
    labels = torch.stack([concepts, values], dim=1)
    choice = None
    if select is not None and len(select[0]):
        result, choice = train_keeping_best(sae, TensorSource(x), cfg, out_dir, labels, select[0], select[1], eval_x)
    else:
        result = train({"align": sae}, TensorSource(x), cfg, out_dir=out_dir, eval_x=eval_x, labels=labels)
    extra = {"site": site, "input_scale_folded": result.input_scale, "train_config": asdict(cfg)}
    if choice is not None:
        extra["checkpoint_selection"] = {k: v for k, v in choice.items() if k != "candidates"}
    sae.save(out_dir / "align", extra=extra)
    return sae, result.histories["align"], choice


def fit_baseline(x: torch.Tensor, opts: AlignOptions, out_dir: Path, steps: int) -> Dictionary:
    torch.manual_seed(opts.seed)
    sae = create("relu_l1", d_in=x.shape[1], n_latents=opts.baseline_latents, l1_coeff=opts.baseline_l1)
    train({"relu_l1": sae}, TensorSource(x), _train_config(opts, steps, len(x)), out_dir=out_dir)
    return sae


def alignsae_steps(opts: AlignOptions, rows: int, epochs: int) -> int:
    """--steps, or with --steps 0 enough steps for `epochs` passes over `rows` training rows."""
    return opts.steps or max(1, math.ceil(epochs * rows / min(opts.batch_size, rows)))


def _train_config(opts: AlignOptions, steps: int, rows: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=min(opts.batch_size, rows), lr=opts.lr,
                       warmup_steps=min(50, steps // 10), eval_every=max(1, steps // 20),
                       checkpoint_every=max(1, steps // 2), init_tokens=rows, eval_tokens=rows, seed=opts.seed,
                       progress=opts.progress, device="cpu")


def _value_classes(answers: list[str | None]) -> tuple[list[str], torch.Tensor]:
    """Answer classes for the value heads: the first word of each answer (-1 when unknown)."""
    firsts = [a.split()[0] if a and a.split() else None for a in answers]
    labels = sorted({f for f in firsts if f is not None})
    index = {w: i for i, w in enumerate(labels)}
    return labels, torch.tensor([index[f] if f is not None else -1 for f in firsts])


@torch.no_grad()
def _binding_metrics(sae: AlignSAE, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], n: int,
                     diagonal_split: str) -> dict:
    out = {f"slot_accuracy_{name}": alignment.slot_accuracy(sae.concept_scores(x), c) for name, (x, c) in splits.items()}
    x, c = splits[diagonal_split]
    scores = sae.concept_scores(x)
    out["diagonal_accuracy"] = alignment.diagonal_accuracy(scores, c, n)
    out["confusion"] = alignment.confusion_matrix(scores, c, n).tolist()
    return out


@torch.no_grad()
def _value_accuracy(sae: AlignSAE, x: torch.Tensor, concepts: torch.Tensor, values: torch.Tensor) -> float | None:
    if sae.value_heads is None or len(x) == 0:
        return None
    logits = sae.value_logits(sae.concept_scores(x), concepts)
    known = values >= 0
    return float((logits.argmax(-1)[known] == values[known]).float().mean()) if known.any() else None


def _dictionary_options(opts: AlignOptions, steps: int) -> dict:
    """What a layer's dictionaries depend on; `steps` resolved (from --steps or the epochs of its world), so
    that changing one world's epochs does not retrain the other's layers."""
    keys = ("n_free", "activation", "k", "align_loss", "recon_coeff", "sparse_coeff", "align_coeff", "indep_coeff",
            "ortho_coeff", "value_coeff", "pretrain_fraction", "pretrain_sparsity", "batch_size", "lr",
            "baseline", "baseline_latents", "baseline_l1", "seed")
    return {**{k: getattr(opts, k) for k in keys}, "steps": steps}


def _baseline_metrics(x: torch.Tensor, rows: dict[str, slice], concepts: torch.Tensor, opts: AlignOptions,
                      layer_dir: Path, steps: int) -> dict:
    sae = fit_baseline(x[rows["train"]], opts, layer_dir / "baseline", steps)
    with torch.no_grad():
        z = {k: sae.encode(x[rows[k]]) for k in ("train", "id", "ood")}
    features = alignment.matched_features(z["train"], concepts[rows["train"]], len(RELATIONS))
    out = {f"slot_accuracy_{k}": alignment.slot_accuracy(z[k][:, features], concepts[rows[k]]) for k in z}
    out["diagonal_accuracy"] = alignment.diagonal_accuracy(z["id"][:, features], concepts[rows["id"]], len(RELATIONS))
    out["matched_features"] = features
    out["fragmentation"] = alignment.fragmentation(z["id"], concepts[rows["id"]], len(RELATIONS))
    out["fvu_id"] = evaluate_batch(sae, x[rows["id"]])["fvu"]
    out["l0_id"] = float((z["id"] > 0).float().sum(1).mean())
    return out
