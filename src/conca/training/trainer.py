"""One training loop for any list of dictionaries, all fed the very same batches.

Each dictionary has its own Adam optimiser and schedule. Inputs are scaled so that
E||x||^2 = d (one scale estimated from the data, folded back into the weights at save time), so
that learning rates carry over between sites and models. Checkpoints hold everything needed to
continue bit-for-bit: weights, optimiser states, the step and the history.

`Trainer` runs in phases (setup, step, evaluate, checkpoint, finish); `train` drives them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from conca.activations.labelled import LabelledSource, split_labels
from conca.activations.provenance import check_same_source, source_fingerprint
from conca.activations.stream import ActivationSource, BatchStream, PairedSource, prefetch, read_rows
from conca.dictionaries.base import Dictionary
from conca.dictionaries.init import geometric_median
from conca.dictionaries.provenance import PROVENANCE_KEY, build_provenance
from conca.errors import ConfigError, CorruptDataError, ShapeError
from conca.evaluation.reconstruction import ReconstructionStats
from conca.runtime import distributed
from conca.runtime.device import resolve_device
from conca.training import finite
from conca.training.checkpoint import load_checkpoint, save_checkpoint
from conca.training.config import AUTOCAST_DTYPES, TrainConfig, resumable
from conca.training.optim import adam, autocast, lr_factor, maybe_compile

# Older names, imported from here by callers and tests.
_adam, _resumable = adam, resumable
__all__ = ["AUTOCAST_DTYPES", "TrainConfig", "TrainResult", "Trainer", "evaluate_batch", "lr_factor", "resolve_device",
           "train"]


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


class Trainer:
    """Trains every dictionary on the same stream of batches, in phases a caller may drive itself:

        trainer.setup()
        while trainer.steps_done < cfg.steps:
            trainer.step()
            if trainer.eval_due: trainer.evaluate()
            if trainer.checkpoint_due: trainer.checkpoint()
        result = trainer.finish()

    which is what `run` (and `train`) do; the arguments are `train`'s. A failure in any phase
    leaves the batch reader stopped (`close`)."""

    def __init__(self, dictionaries: dict[str, Dictionary], source: ActivationSource, cfg: TrainConfig,
                 out_dir: "Path | None" = None, eval_x: torch.Tensor | None = None,
                 target_source: ActivationSource | None = None, eval_target: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, provenance: dict | None = None,
                 on_start: Callable[[], None] | None = None):
        if isinstance(source, LabelledSource):  # labels may come in the source: the same as `labels=`
            if labels is not None:
                raise ConfigError("labels given twice: in a LabelledSource and as labels")
            source, labels = source.source, source.integer_labels
        self.dictionaries, self.cfg, self.out_dir, self.provenance, self.on_start = (
            dictionaries, cfg, out_dir, provenance, on_start)
        self.input_source, self.output_source = source, target_source  # before pairing / labelling, for provenance
        self.labels, self.eval_x_given, self.eval_target_given = labels, eval_x, eval_target
        self.transcoder = target_source is not None
        self.checkpoint_path = Path(out_dir) / "checkpoint.json" if out_dir else None

    # --- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Check the inputs, pair/label the source, take the scales and the evaluation rows from
        its first `init_tokens` rows, place the dictionaries, then initialise them from the data
        or resume the checkpoint in `out_dir`; under torchrun, start data-parallel training."""
        cfg, dictionaries = self.cfg, self.dictionaries
        if not dictionaries:
            raise ConfigError("nothing to train: no dictionaries given")
        source, target_source = self.input_source, self.output_source
        self.d_in = d_in = source.d
        target_d = target_source.d if target_source is not None else d_in
        for name, d in dictionaries.items():
            if d.config.d_in != d_in:
                raise ShapeError(f"dictionary {name} expects width {d.config.d_in}, but {source.description} has width {d_in}")
            if d.config.out_dim != target_d:
                raise ShapeError(f"dictionary {name} reconstructs width {d.config.out_dim}, but the target has width {target_d}")
        if target_source is not None:
            source = PairedSource(source, target_source)
        if self.labels is not None:
            source = LabelledSource(source, self.labels)
        self.source = source
        torch.manual_seed(cfg.seed)
        sample, sample_target = self._split_pair(split_labels(source, read_rows(source, cfg.init_tokens))[0])
        self.sample = sample  # unscaled: named in the message of a run that diverges
        finite.check_sample(sample, source.description)
        self.scale = scale = finite.input_scale(sample, source.description) if cfg.normalize_input else 1.0
        self.target_scale = scale
        if self.transcoder:
            finite.check_sample(sample_target, target_source.description)
        if self.transcoder and cfg.normalize_input:
            self.target_scale = math.sqrt(target_d / sample_target.pow(2).sum(-1).mean().clamp_min(1e-30).item())
        eval_raw = sample[: cfg.eval_tokens] if self.eval_x_given is None else self.eval_x_given.float()
        if not self.transcoder:
            eval_target_raw = None
        else:
            eval_target_raw = (sample_target[: cfg.eval_tokens] if self.eval_x_given is None
                               else self.eval_target_given.float())
        self.configs = {name: asdict(d.config) for name, d in dictionaries.items()}
        device = resolve_device(cfg.device)
        # Under torchrun: one rank per process, each on its own device, sharing every global batch.
        self.context = context = distributed.init_from_env(device)
        if context is not None:
            device = context.device
            if cfg.batch_size % context.world_size:
                raise ConfigError(f"batch size {cfg.batch_size} must be divisible by the number of processes "
                                  f"({context.world_size}) for data-parallel training")
        self.device = device
        for d in dictionaries.values():
            d.to(device)
        self.optimisers = {name: adam(d, cfg) for name, d in dictionaries.items()}
        self.histories: dict[str, list[dict]] = {name: [] for name in dictionaries}
        self.start_step, self.elapsed_before, self.resumed_speed = 0, 0.0, 0.0
        resumed = self._resume()
        if not resumed:
            self._init_from_data(sample, sample_target)
        if context is not None:
            distributed.check_same_step(self.start_step, device)
            for d in dictionaries.values():  # rank 0's initialisation everywhere
                distributed.broadcast_module(d)
        self.is_main = context is None or context.is_main
        if self.on_start is not None:
            self.on_start()
        self.eval_x = (eval_raw * self.scale).to(device)
        self.eval_target = None if eval_target_raw is None else (eval_target_raw * self.target_scale).to(device)
        for d in dictionaries.values():
            d.train()
        self._start_loop(resumed)

    def _split_pair(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(inputs, targets or None) of unlabelled rows: a transcoder's source is inputs | targets."""
        return (rows[:, :self.d_in], rows[:, self.d_in:]) if self.transcoder else (rows, None)

    def _resume(self) -> bool:
        """Load the checkpoint in out_dir, if there is one and it is from this very run."""
        state = load_checkpoint(self.checkpoint_path) if self.checkpoint_path else None
        if state is None:
            return False
        path = self.checkpoint_path
        if state["train_config"] != resumable(self.cfg) or state.get("configs") != self.configs:
            raise ConfigError(f"{path} is from a run with another configuration: use a new output directory")
        check_same_source(state.get("source"), source_fingerprint(self.input_source, self.output_source), path)
        for name, d in self.dictionaries.items():
            try:
                d.load_state_dict(state["dictionaries"][name])
                self.optimisers[name].load_state_dict(state["optimisers"][name])
            except (RuntimeError, ValueError, TypeError) as exc:  # tensors of the wrong shape or kind
                raise CorruptDataError(f"checkpoint {path} does not fit dictionary {name} ({exc}); "
                                       "delete it to start over") from exc
        self.histories, self.start_step, self.scale = state["histories"], state["step"], state["input_scale"]
        self.target_scale = state.get("target_scale", self.scale)
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.resumed_speed = state.get("tokens_per_s", 0.0)
        return True

    def _init_from_data(self, sample: torch.Tensor, sample_target: torch.Tensor | None) -> None:
        for d in self.dictionaries.values():
            d.init_from_data((sample * self.scale).to(self.device))
            if self.transcoder:  # a transcoder's decoder bias starts at the target's median
                with torch.no_grad():
                    d.b_dec.copy_(geometric_median((sample_target * self.target_scale).to(self.device)))

    def _start_loop(self, resumed: bool) -> None:
        cfg = self.cfg
        stream = BatchStream(self.source, cfg.batch_size, seed=cfg.seed, window_chunks=cfg.window_chunks)
        self.stream = stream.batches(self.start_step)
        if cfg.prefetch:
            self.stream = prefetch(self.stream, cfg.prefetch, pin_memory=self.device.type == "cuda")
        self.bar = tqdm(total=cfg.steps, initial=self.start_step, desc="train", unit="step",
                        disable=not (cfg.progress and self.is_main), dynamic_ncols=True)
        self.loss_fns = {name: maybe_compile(d.loss_terms, cfg.compile) for name, d in self.dictionaries.items()}
        self.t0 = time.perf_counter()
        self.step_seconds: list[float] = []
        self.recorded_speed = None  # tokens/s as written in the latest checkpoint
        self.steps_done = self.start_step
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first step with a non-finite loss
        self.saved_step = self.start_step if resumed else None  # the last (finite) checkpoint on disk
        self.checked_step = None  # the step whose weights and losses were last checked finite
        self.logs: dict[str, dict[str, torch.Tensor]] = {}
        self.lr = cfg.lr

    # --- step -----------------------------------------------------------------------------------
    def step(self) -> None:
        """One optimiser step of every dictionary on the next batch."""
        cfg, step = self.cfg, self.steps_done
        step_start = time.perf_counter()
        batch = next(self.stream)
        batch = (batch if self.context is None else self.context.share(batch)).to(self.device, non_blocking=True)
        rows, labels = split_labels(self.source, batch)
        x, target = self._split_pair(rows)
        x, target = x * self.scale, None if target is None else target * self.target_scale
        self.lr = cfg.lr * lr_factor(step, cfg)
        logs = {}
        for name, d in self.dictionaries.items():
            opt = self.optimisers[name]
            for group in opt.param_groups:
                group["lr"] = self.lr
            d.set_progress(step, cfg.steps)
            with autocast(self.device, cfg), distributed.data_parallel(self.context):
                loss_fn = self.loss_fns[name]
                terms = loss_fn(x, target) if labels is None else loss_fn(x, target, labels=labels)
            loss = sum(terms.values())
            self.first_bad = finite.mark_non_finite(self.first_bad, loss, step + 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.context is not None:
                distributed.average_gradients(d.parameters(), self.context.world_size)
            d.before_optimizer_step()
            opt.step()
            d.after_optimizer_step(opt, x)
            if self.context is not None and hasattr(d, "resample_dead"):  # resampled from this rank's share
                distributed.resync_if_diverged(d, opt)
            # Kept as tensors: reading them (a device sync) waits for the evaluation steps.
            logs[name] = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        self.logs = logs
        self.step_seconds.append(time.perf_counter() - step_start)
        self.steps_done = step + 1
        self.bar.update(1)

    @property
    def eval_due(self) -> bool:
        return self.steps_done % self.cfg.eval_every == 0 or self.steps_done == self.cfg.steps

    @property
    def checkpoint_due(self) -> bool:
        every, done = self.cfg.checkpoint_every, self.steps_done
        return (every > 0 and done % every == 0) or done == self.cfg.steps

    def check_finite(self) -> None:
        """Stop with a ConfigError naming the step if a loss or weight went NaN/inf (a device sync,
        so only before evaluating or checkpointing: every rank checks at the same steps)."""
        if self.checked_step == self.steps_done:
            return
        self.checked_step = self.steps_done
        bad = finite.non_finite_step(self.first_bad, self.dictionaries.values(), self.steps_done)
        if bad is not None:
            self.close()
            cfg = self.cfg
            raise ConfigError(finite.diverged_message(bad, cfg.steps, cfg.lr, cfg.normalize_input, cfg.autocast,
                                                      self.sample.abs().max().item() if len(self.sample) else 0.0,
                                                      self.checkpoint_path, self.saved_step))

    # --- evaluate -------------------------------------------------------------------------------
    def evaluate(self) -> None:
        """Metrics on the evaluation rows, with the last step's losses, appended to each history."""
        self.check_finite()
        done, cfg = self.steps_done, self.cfg
        for name, d in self.dictionaries.items():
            d.eval()
            metrics = evaluate_batch(d, self.eval_x, self.eval_target)
            d.train()
            self.histories[name].append({"step": done, "tokens": done * cfg.batch_size, "lr": self.lr,
                                         **distributed.mean_over_ranks(self.logs[name], self.context),
                                         "fvu": metrics["fvu"], "l0": metrics["l0"],
                                         "dead_fraction_eval": metrics["dead_fraction"]})
        first = self.histories[next(iter(self.dictionaries))][-1]
        self.bar.set_postfix(fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}")

    # --- checkpoint -----------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Save everything needed to continue bit-for-bit to out_dir/checkpoint.json (main rank)."""
        self.check_finite()
        if not (self.is_main and self.checkpoint_path):
            return
        done, cfg = self.steps_done, self.cfg
        self.saved_step = done
        self.recorded_speed = (done - self.start_step) * cfg.batch_size / max(time.perf_counter() - self.t0, 1e-9)
        save_checkpoint(self.checkpoint_path, {
            "step": done, "train_config": resumable(cfg), "configs": self.configs, "input_scale": self.scale,
            "target_scale": self.target_scale,
            "source": source_fingerprint(self.input_source, self.output_source),  # re-read: a followed store grows
            "histories": self.histories,
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.t0,
            "tokens_per_s": self.recorded_speed,
            "dictionaries": {n: d.state_dict() for n, d in self.dictionaries.items()},
            "optimisers": {n: o.state_dict() for n, o in self.optimisers.items()},
        })

    # --- finish ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the progress bar and the batch reader (its thread, with prefetch)."""
        self.bar.close()
        self.stream.close()

    def finish(self) -> TrainResult:
        """Fold the scales into the weights, move them to the CPU, save each dictionary to
        out_dir/<name>/ (main rank) and report."""
        self.close()
        cfg = self.cfg
        elapsed = time.perf_counter() - self.t0
        trained_steps = self.steps_done - self.start_step
        # A finished run found in its checkpoint trains nothing more; keep its recorded speed. A run that
        # just wrote its final checkpoint reports the speed written there: the number a rerun will find.
        tokens_per_s = trained_steps * cfg.batch_size / elapsed if trained_steps else self.resumed_speed
        if self.recorded_speed is not None:
            tokens_per_s = self.recorded_speed
        for d in self.dictionaries.values():
            d.eval()
            d.cpu()  # callers evaluate on CPU tensors; saving writes CPU tensors anyway
            d.fold_input_scale(self.scale)
            if self.transcoder:
                d.scale_output(self.scale / self.target_scale)  # D(sx)/s ~ (t/s) y: bring it back to y
        if self.out_dir and self.is_main:
            origin = build_provenance(self.input_source, self.output_source, cfg.steps * cfg.batch_size, self.provenance)
            for name, d in self.dictionaries.items():
                d.save(Path(self.out_dir) / name, extra={"input_scale_folded": self.scale, "train_config": asdict(cfg),
                                                         PROVENANCE_KEY: origin})
        return TrainResult(dictionaries=self.dictionaries, histories=self.histories, input_scale=self.scale,
                           tokens_per_s=tokens_per_s, resumed_from_step=self.start_step, step_seconds=self.step_seconds)

    def run(self) -> TrainResult:
        """setup, then step (evaluating and checkpointing when due) up to cfg.steps, then finish."""
        self.setup()
        try:
            while self.steps_done < self.cfg.steps:
                self.step()
                if self.eval_due:
                    self.evaluate()
                if self.checkpoint_due:
                    self.checkpoint()
        except BaseException:
            self.close()
            raise
        return self.finish()


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
    """Train every dictionary on the same stream of batches from `source` (see `Trainer`).

    With `target_source` (rows aligned with `source`), dictionaries are transcoders: they encode
    `source` and reconstruct the target. The target gets its own scale (E||y||^2 = d_out), folded
    back after the input scale by rescaling the (linear) decoder.
    With `out_dir`, checkpoints go to `out_dir/checkpoint.json` (+ its tensors, see
    conca.training.checkpoint) and a run found there is resumed;
    the trained dictionaries are saved, input scale folded in, to `out_dir/<name>/`.
    With `labels` ((rows,) or (rows, k) integers, rows aligned with `source`; or a `source` that is
    a conca.activations.labelled.LabelledSource), each batch's labels follow the same shuffle and
    reach `loss_terms(x, target, labels=...)` as a (batch, k) long tensor, for supervised terms
    (AlignSAE); without them nothing changes.
    Checkpoints record the source's fingerprint and a resume on other data is refused; saved
    dictionaries record their provenance (see conca.dictionaries.provenance), with `provenance`
    filling what the source does not know (e.g. {"site": ..., "model": ...} for a .npy).
    `on_start` runs once every input and the checkpoint have been checked, before the first step
    (callers write their config there, so a run refused before it writes nothing).
    A loss or weights going NaN/inf stop the run with a ConfigError naming the step, before any
    non-finite state is checkpointed or saved."""
    return Trainer(dictionaries, source, cfg, out_dir=out_dir, eval_x=eval_x, target_source=target_source,
                   eval_target=eval_target, labels=labels, provenance=provenance, on_start=on_start).run()
