"""Guards that keep non-finite numbers out of training: inputs whose scale cannot be taken, and
runs that diverge (a NaN/inf loss or weights) stop with a message naming the step and the cause,
before anything non-finite is checkpointed or saved."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from conca.errors import InputError

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_sample(sample: torch.Tensor, description: str) -> None:
    """Refuse inputs whose squared norms overflow float32: every loss and metric squares them."""
    if not len(sample):
        return
    largest = sample.double().pow(2).sum(-1).max().item()
    if largest > FLOAT32_MAX:
        raise InputError(f"activations in {description} are too large: squared norms overflow float32 (largest |x| = "
                         f"{sample.abs().max().item():.3g}); rescale them")


def input_scale(sample: torch.Tensor, description: str) -> float:
    """sqrt(d / E||x||^2): the factor that brings E||x||^2 to d (computed in float64)."""
    mean_square = sample.double().pow(2).sum(-1).mean().item()
    if mean_square == 0:
        raise InputError(f"activations in {description} are all zero in the first {len(sample)} rows: nothing to "
                         "learn, and the input scale (E||x||^2 = d) is undefined")
    return math.sqrt(sample.shape[1] / mean_square)


def mark_non_finite(first_bad: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """`first_bad` (a device scalar, -1 while all is well) set to `step` at the first non-finite loss,
    without a device sync: the trainer reads it only when it evaluates or checkpoints."""
    return torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)


def non_finite_step(first_bad: torch.Tensor, modules, step: int) -> int | None:
    """The step at which training went non-finite (loss or weights), or None if it has not."""
    bad = int(first_bad.item())
    if bad >= 0:
        return bad
    params = [p for m in modules for p in m.parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        return step
    return None


def diverged_message(step: int, total_steps: int, lr: float, normalize_input: bool, autocast: str,
                     largest_input: float, checkpoint: Path | None, checkpoint_step: int | None) -> str:
    if not normalize_input and largest_input > 1e4:
        cause = (f"the inputs are large (largest |x| = {largest_input:.3g}) and --normalize-input is false: "
                 "set it true or rescale them")
    else:
        cause = f"the learning rate (lr={lr:g}) is likely too high: lower --lr"
    if autocast != "none":
        cause += f", or {autocast} autocast overflowed: try --autocast none"
    if checkpoint is not None and checkpoint_step is not None:
        kept = f"the last finite checkpoint (step {checkpoint_step}) is kept in {checkpoint}"
    else:
        kept = "no finite checkpoint exists yet, nothing was saved"
    return f"training went non-finite (NaN/inf loss or weights) at step {step} of {total_steps}: {cause}; {kept}"

