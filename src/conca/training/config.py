"""What a training run is asked to do: its configuration, and which of its settings a checkpoint
must match to be continued (devices by name: conca.runtime.device)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from conca.errors import ConfigError

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


def resumable(cfg: TrainConfig) -> dict:
    """The config fields that must match for a checkpoint to be continued (not progress/eval knobs)."""
    out = asdict(cfg)
    # A run may move between machines: device, autocast and read-ahead may change on resume.
    for key in ("progress", "eval_every", "checkpoint_every", "device", "autocast", "prefetch", "compile"):
        out.pop(key)
    return out
