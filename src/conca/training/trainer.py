"""One training loop for any list of dictionaries, all fed the very same batches.

Each dictionary has its own Adam optimiser and schedule. Inputs are scaled so that
E||x||^2 = d (one scale estimated from the data, folded back into the weights at save time), so
that learning rates carry over between sites and models. Checkpoints hold everything needed to
continue bit-for-bit: weights, optimiser states, the step and the history."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from conca.activations.provenance import check_same_source, source_fingerprint
from conca.activations.stream import ActivationSource, BatchStream, PairedSource, prefetch, read_rows
from conca.dictionaries.base import Dictionary
from conca.dictionaries.init import geometric_median
from conca.dictionaries.provenance import PROVENANCE_KEY, build_provenance
from conca.errors import ConfigError, CorruptDataError, ShapeError
from conca.evaluation.reconstruction import ReconstructionStats
from conca.runtime import distributed
from conca.runtime.device import resolve_device  # noqa: F401  (re-exported for callers of the old path)
from conca.training import finite
from conca.training.checkpoint import load_checkpoint, save_checkpoint

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1024
    lr: float = 4e-4
    warmup_steps: int = 50
    decay_start: float = 0.8  # fraction of training after which lr decays linearly to 0
    beta1: float = 0.9
    beta2: float = 0.999
    normalize_input: bool = True
    eval_every: int = 100
    eval_tokens: int = 4096
    checkpoint_every: int = 250  # 0: only at the end
    init_tokens: int = 8192  # sample used for the input scale and the data-dependent init
    window_chunks: int = 4
    seed: int = 0
    progress: bool = True
    device: str = "auto"  # "auto": CUDA when available, else CPU; or "cpu", "cuda", "cuda:1", ...
    autocast: str = "none"  # "bf16": the loss in bfloat16 autocast (CPU and CUDA); parameters and Adam stay fp32
    prefetch: int = 2  # batches a background thread reads ahead (disk, checksums, shuffles); 0: none
    compile: bool = False  # torch.compile each loss (pays off in long runs: compiling takes about a minute on CPU)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not 0 < self.lr < math.inf:
            raise ConfigError(f"steps, batch_size and lr must be positive (got {self.steps}, {self.batch_size}, {self.lr})")
        if self.eval_every < 1 or self.checkpoint_every < 0:
            raise ConfigError(f"eval_every must be >= 1 step and checkpoint_every >= 0 (0: at the end only), got "
                              f"{self.eval_every} and {self.checkpoint_every}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ConfigError(f"unknown autocast {self.autocast!r}: use {' or '.join(AUTOCAST_DTYPES)}")
        if self.prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0 batches, got {self.prefetch}")
        if not 0 < self.decay_start <= 1:
            raise ConfigError(f"decay_start must be in (0, 1], got {self.decay_start}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, flat, then linear decay to 0 from `decay_start`."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    decay_from = int(cfg.decay_start * cfg.steps)
    if step < decay_from or decay_from >= cfg.steps:
        return warm
    return warm * max(0.0, (cfg.steps - step) / (cfg.steps - decay_from))


@dataclass
class TrainResult:
    dictionaries: dict[str, Dictionary]
    histories: dict[str, list[dict]] = field(default_factory=dict)
    input_scale: float = 1.0
    tokens_per_s: float = 0.0
    resumed_from_step: int = 0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step trained in this call


@torch.no_grad()
def evaluate_batch(dictionary: Dictionary, x: torch.Tensor, target: torch.Tensor | None = None,
                   batch_size: int = 4096) -> dict[str, float]:
    """Reconstruction metrics of `dictionary` on x (against `target` for a transcoder)."""
    target = x if target is None else target
    stats = ReconstructionStats(dictionary.config.n_latents)
    for i in range(0, len(x), batch_size):
        z = dictionary.encode(x[i:i + batch_size])
        stats.update(target[i:i + batch_size], dictionary.decode(z), z)
    return stats.compute()


def train(
    dictionaries: dict[str, Dictionary],
    source: ActivationSource,
    cfg: TrainConfig,
    out_dir: "Path | None" = None,
    eval_x: torch.Tensor | None = None,
    target_source: ActivationSource | None = None,
    eval_target: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    provenance: dict | None = None,
    on_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Train every dictionary on the same stream of batches from `source`.

    With `target_source` (rows aligned with `source`), dictionaries are transcoders: they encode
    `source` and reconstruct the target. The target gets its own scale (E||y||^2 = d_out), folded
    back after the input scale by rescaling the (linear) decoder.
    With `out_dir`, checkpoints go to `out_dir/checkpoint.json` (+ its tensors, see
    conca.training.checkpoint) and a run found there is resumed;
    the trained dictionaries are saved, input scale folded in, to `out_dir/<name>/`.
    With `labels` ((rows,) or (rows, k) integers, rows aligned with `source`), each batch's labels
    follow the same shuffle and reach `loss_terms(x, target, labels=...)` as a (batch, k) long
    tensor, for supervised terms (AlignSAE); without them nothing changes.
    Checkpoints record the source's fingerprint and a resume on other data is refused; saved
    dictionaries record their provenance (see conca.dictionaries.provenance), with `provenance`
    filling what the source does not know (e.g. {"site": ..., "model": ...} for a .npy).
    `on_start` runs once every input and the checkpoint have been checked, before the first step
    (callers write their config there, so a run refused before it writes nothing).
    A loss or weights going NaN/inf stop the run with a ConfigError naming the step, before any
    non-finite state is checkpointed or saved."""
    if not dictionaries:
        raise ConfigError("nothing to train: no dictionaries given")
    d_in = source.d
    target_d = target_source.d if target_source is not None else d_in
    for name, d in dictionaries.items():
        if d.config.d_in != d_in:
            raise ShapeError(f"dictionary {name} expects width {d.config.d_in}, but {source.description} has width {d_in}")
        if d.config.out_dim != target_d:
            raise ShapeError(f"dictionary {name} reconstructs width {d.config.out_dim}, but the target has width {target_d}")
    input_source, output_source = source, target_source  # before pairing / labelling, for provenance
    if target_source is not None:
        source = PairedSource(source, target_source)
    n_label_columns = 0
    if labels is not None:
        source = _LabelledSource(source, labels)
        n_label_columns = source.n_label_columns
    torch.manual_seed(cfg.seed)
    sample = read_rows(source, cfg.init_tokens)
    if n_label_columns:
        sample = sample[:, :-n_label_columns]
    sample, sample_target = sample[:, :d_in], sample[:, d_in:] if target_source is not None else None
    finite.check_sample(sample, source.description)
    scale = finite.input_scale(sample, source.description) if cfg.normalize_input else 1.0
    target_scale = scale
    if target_source is not None:
        finite.check_sample(sample_target, target_source.description)
    if target_source is not None and cfg.normalize_input:
        target_scale = math.sqrt(target_d / sample_target.pow(2).sum(-1).mean().clamp_min(1e-30).item())
    eval_raw = sample[: cfg.eval_tokens] if eval_x is None else eval_x.float()
    if target_source is None:
        eval_target_raw = None
    else:
        eval_target_raw = sample_target[: cfg.eval_tokens] if eval_x is None else eval_target.float()
    configs = {name: asdict(d.config) for name, d in dictionaries.items()}
    device = resolve_device(cfg.device)
    # Under torchrun: one rank per process, each on its own device, sharing every global batch.
    context = distributed.init_from_env(device)
    if context is not None:
        device = context.device
        if cfg.batch_size % context.world_size:
            raise ConfigError(f"batch size {cfg.batch_size} must be divisible by the number of processes "
                              f"({context.world_size}) for data-parallel training")
    for d in dictionaries.values():
        d.to(device)
    optimisers = {name: _adam(d, cfg) for name, d in dictionaries.items()}
    histories: dict[str, list[dict]] = {name: [] for name in dictionaries}
    start_step, elapsed_before = 0, 0.0
    checkpoint_path = Path(out_dir) / "checkpoint.json" if out_dir else None
    state = load_checkpoint(checkpoint_path) if checkpoint_path else None
    if state is not None:
        if state["train_config"] != _resumable(cfg) or state.get("configs") != configs:
            raise ConfigError(f"{checkpoint_path} is from a run with another configuration: use a new output directory")
        check_same_source(state.get("source"), source_fingerprint(input_source, output_source), checkpoint_path)
        for name, d in dictionaries.items():
            try:
                d.load_state_dict(state["dictionaries"][name])
                optimisers[name].load_state_dict(state["optimisers"][name])
            except (RuntimeError, ValueError, TypeError) as exc:  # tensors of the wrong shape or kind
                raise CorruptDataError(f"checkpoint {checkpoint_path} does not fit dictionary {name} ({exc}); "
                                       "delete it to start over") from exc
        histories, start_step, scale = state["histories"], state["step"], state["input_scale"]
        target_scale = state.get("target_scale", scale)
        elapsed_before = state.get("elapsed_s", 0.0)
    else:
        for d in dictionaries.values():
            d.init_from_data((sample * scale).to(device))
            if target_source is not None:  # a transcoder's decoder bias starts at the target's median
                with torch.no_grad():
                    d.b_dec.copy_(geometric_median((sample_target * target_scale).to(device)))
    if context is not None:
        distributed.check_same_step(start_step, device)
        for d in dictionaries.values():  # rank 0's initialisation everywhere
            distributed.broadcast_module(d)
    is_main = context is None or context.is_main
    if on_start is not None:
        on_start()
    eval_x = (eval_raw * scale).to(device)
    eval_target = None if eval_target_raw is None else (eval_target_raw * target_scale).to(device)
    for d in dictionaries.values():
        d.train()

    stream = BatchStream(source, cfg.batch_size, seed=cfg.seed, window_chunks=cfg.window_chunks).batches(start_step)
    if cfg.prefetch:
        stream = prefetch(stream, cfg.prefetch, pin_memory=device.type == "cuda")
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not (cfg.progress and is_main),
               dynamic_ncols=True)
    loss_fns = {name: _maybe_compile(d.loss_terms, cfg.compile) for name, d in dictionaries.items()}
    t0 = time.perf_counter()
    step_seconds = []
    recorded_speed = None  # tokens/s as written in the latest checkpoint
    step = start_step
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    saved_step = start_step if state is not None else None  # the last (finite) checkpoint on disk
    for step in range(start_step, cfg.steps):
        step_start = time.perf_counter()
        batch = next(stream)
        batch = (batch if context is None else context.share(batch)).to(device, non_blocking=True)
        batch_labels = None
        if n_label_columns:
            batch, batch_labels = batch[:, :-n_label_columns], batch[:, -n_label_columns:].long()
        x, target = (batch[:, :d_in] * scale, batch[:, d_in:] * target_scale) if target_source is not None else (batch * scale, None)
        factor = lr_factor(step, cfg)
        logs = {}
        for name, d in dictionaries.items():
            opt = optimisers[name]
            for group in opt.param_groups:
                group["lr"] = cfg.lr * factor
            d.set_progress(step, cfg.steps)
            with _autocast(device, cfg), distributed.data_parallel(context):
                loss_fn = loss_fns[name]
                terms = loss_fn(x, target) if batch_labels is None else loss_fn(x, target, labels=batch_labels)
            loss = sum(terms.values())
            first_bad = finite.mark_non_finite(first_bad, loss, step + 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if context is not None:
                distributed.average_gradients(d.parameters(), context.world_size)
            d.before_optimizer_step()
            opt.step()
            d.after_optimizer_step(opt, x)
            if context is not None and hasattr(d, "resample_dead"):  # resampled from this rank's share
                distributed.resync_if_diverged(d, opt)
            # Kept as tensors: reading them (a device sync) waits for the evaluation steps.
            logs[name] = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        step_seconds.append(time.perf_counter() - step_start)
        done = step + 1
        checkpoint_due = (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0) or done == cfg.steps
        if checkpoint_due or done % cfg.eval_every == 0:  # every rank checks at the same steps
            bad = finite.non_finite_step(first_bad, dictionaries.values(), done)
            if bad is not None:
                bar.close()
                stream.close()
                raise ConfigError(finite.diverged_message(bad, cfg.steps, cfg.lr, cfg.normalize_input, cfg.autocast,
                                                          sample.abs().max().item() if len(sample) else 0.0,
                                                          checkpoint_path, saved_step))
        if done % cfg.eval_every == 0 or done == cfg.steps:
            for name, d in dictionaries.items():
                d.eval()
                metrics = evaluate_batch(d, eval_x, eval_target)
                d.train()
                histories[name].append({"step": done, "tokens": done * cfg.batch_size, "lr": cfg.lr * factor,
                                        **distributed.mean_over_ranks(logs[name], context),
                                        "fvu": metrics["fvu"], "l0": metrics["l0"],
                                        "dead_fraction_eval": metrics["dead_fraction"]})
            first = histories[next(iter(dictionaries))][-1]
            bar.set_postfix(fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}")
        bar.update(1)
        if is_main and checkpoint_path and checkpoint_due:
            saved_step = done
            recorded_speed = (done - start_step) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
            save_checkpoint(checkpoint_path, {
                "step": done, "train_config": _resumable(cfg), "configs": configs, "input_scale": scale,
                "target_scale": target_scale,
                "source": source_fingerprint(input_source, output_source),  # re-read: a followed store grows
                "histories": histories,
                "elapsed_s": elapsed_before + time.perf_counter() - t0,
                "tokens_per_s": recorded_speed,
                "dictionaries": {n: d.state_dict() for n, d in dictionaries.items()},
                "optimisers": {n: o.state_dict() for n, o in optimisers.items()},
            })
    bar.close()
    if cfg.prefetch:
        stream.close()  # stops the reader thread
    elapsed = time.perf_counter() - t0
    trained_steps = cfg.steps - start_step
    # A finished run found in its checkpoint trains nothing more; keep its recorded speed. A run that
    # just wrote its final checkpoint reports the speed written there: the number a rerun will find.
    tokens_per_s = trained_steps * cfg.batch_size / elapsed if trained_steps else (state or {}).get("tokens_per_s", 0.0)
    if recorded_speed is not None:
        tokens_per_s = recorded_speed
    for d in dictionaries.values():
        d.eval()
        d.cpu()  # callers evaluate on CPU tensors; saving writes CPU tensors anyway
        d.fold_input_scale(scale)
        if target_source is not None:
            d.scale_output(scale / target_scale)  # D(sx)/s ~ (t/s) y: bring it back to y
    if out_dir and is_main:
        origin = build_provenance(input_source, output_source, cfg.steps * cfg.batch_size, provenance)
        for name, d in dictionaries.items():
            d.save(Path(out_dir) / name, extra={"input_scale_folded": scale, "train_config": asdict(cfg),
                                                PROVENANCE_KEY: origin})
    return TrainResult(dictionaries=dictionaries, histories=histories, input_scale=scale, tokens_per_s=tokens_per_s,
                       resumed_from_step=start_step, step_seconds=step_seconds)


def _adam(dictionary: Dictionary, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this torch has it for these parameters (one pass over each
    tensor instead of a dozen: the optimiser step is memory-bound on the large matrices), else
    the multi-tensor one. Both compute the same update as the reference loop."""
    params = list(dictionary.parameters())
    for impl in ({"fused": True}, {"foreach": True}):
        try:
            return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **impl)
        except (RuntimeError, ValueError):
            continue
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _maybe_compile(loss_terms, compile_it: bool):
    """torch.compile(loss_terms) when asked and this Python/torch can compile; else loss_terms.

    Compiled and eager losses agree (checked on TopK to ~2e-7 in the gradients); the selection
    and the sparse backward stay eager (graph breaks), the elementwise work around them fuses."""
    if not compile_it:
        return loss_terms
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        warnings.warn("torch.compile is not supported here: training eagerly", stacklevel=3)
        return loss_terms
    return torch.compile(loss_terms)


def _autocast(device: torch.device, cfg: TrainConfig):
    dtype = AUTOCAST_DTYPES[cfg.autocast]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class _LabelledSource:
    """Integer labels appended as float columns to each chunk of a source, so that one shuffle
    serves rows and labels alike (exact: float32 holds integers below 2**24)."""

    def __init__(self, source: ActivationSource, labels: torch.Tensor):
        labels = labels[:, None] if labels.ndim == 1 else labels
        n_rows = sum(source.chunk_sizes)
        if labels.ndim != 2 or len(labels) != n_rows:
            raise ShapeError(f"labels must be (rows,) or (rows, k) with rows = {n_rows} (the rows of "
                             f"{source.description}), got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or (len(labels) and labels.abs().max() >= 2**24):
            raise ConfigError("labels must be integers of magnitude below 2**24")
        self.source, self.labels, self.n_label_columns = source, labels.float(), labels.shape[1]
        self.offsets = [0]
        for size in source.chunk_sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.d = source.d + self.n_label_columns
        self.chunk_sizes = list(source.chunk_sizes)
        self.description = f"{source.description} + labels"

    def load_chunk(self, index: int) -> torch.Tensor:
        rows = self.labels[self.offsets[index]:self.offsets[index + 1]]
        return torch.cat([self.source.load_chunk(index), rows], dim=1)


def _resumable(cfg: TrainConfig) -> dict:
    """The config fields that must match for a checkpoint to be continued (not progress/eval knobs)."""
    out = asdict(cfg)
    # A run may move between machines: device, autocast and read-ahead may change on resume.
    for key in ("progress", "eval_every", "checkpoint_every", "device", "autocast", "prefetch", "compile"):
        out.pop(key)
    return out
