"""The Dictionary protocol every method implements, the name -> class registry, and the
inference-form checkpoint format (``config.json`` + ``weights.safetensors``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import conca
from conca.errors import ConfigError, InputError, ShapeError
from conca.values import validate_fields

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"

REGISTRY: dict[str, type["Dictionary"]] = {}


def register(cls: type["Dictionary"]) -> type["Dictionary"]:
    if cls.name in REGISTRY:
        raise ValueError(f"dictionary method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def methods() -> list[str]:
    import conca.dictionaries  # noqa: F401  (importing registers every method)

    return sorted(REGISTRY)


def get_method(name: str) -> type["Dictionary"]:
    known = methods()
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(known)}")
    return REGISTRY[name]


@dataclass
class DictionaryConfig:
    d_in: int
    n_latents: int
    d_out: int | None = None  # None: reconstruct the input; else a transcoder's output width

    @property
    def out_dim(self) -> int:
        return self.d_in if self.d_out is None else self.d_out

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.n_latents < 1:
            raise ConfigError(f"d_in and n_latents must be positive, got d_in={self.d_in}, n_latents={self.n_latents}")
        weight_bytes = 4 * self.n_latents * (self.d_in + self.out_dim)  # encoder + decoder in fp32
        memory = _memory_bytes()
        if memory is not None and weight_bytes > memory:
            raise ConfigError(f"n_latents={self.n_latents} at width {self.d_in} needs "
                              f"{weight_bytes / 2**30:,.0f} GiB of weights, more than this machine's "
                              f"{memory / 2**30:,.0f} GiB of memory")


def _memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class Dictionary(nn.Module):
    """encode: (N, d_in) -> (N, n_latents); decode: (N, n_latents) -> (N, d_out).

    Training hooks (no-ops by default) let a method keep constraints without a trainer of its
    own: `loss_terms` returns named, already-weighted terms that the trainer sums;
    `before_optimizer_step` / `after_optimizer_step` run around each optimiser step."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[DictionaryConfig]] = DictionaryConfig
    inference_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DictionaryConfig):
        super().__init__()
        self.config = config
        # Set by the trainer before each step, for schedules (sparsity warm-up, p-annealing).
        self.train_step = 0
        self.total_steps = 1

    def set_progress(self, step: int, total_steps: int) -> None:
        self.train_step, self.total_steps = step, max(1, total_steps)

    def warmup_factor(self, warmup_steps: int) -> float:
        """Linear ramp 0 -> 1 over the first `warmup_steps` training steps (1 when warmup_steps == 0)."""
        return 1.0 if warmup_steps <= 0 else min(1.0, (self.train_step + 1) / warmup_steps)

    # --- inference ---------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Default: the linear decoder x_hat = z W_dec + b_dec that every method here shares."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @property
    def decoder_directions(self) -> torch.Tensor:
        """(n_latents, d_out): the direction each latent writes."""
        return self.W_dec

    @property
    def is_transcoder(self) -> bool:
        """Reconstructs another site (d_out set), so inputs are not centred by the decoder bias."""
        return self.config.d_out is not None

    def check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.config.d_in:
            raise ShapeError(f"{self.name} dictionary expects inputs of width {self.config.d_in}, got {x.shape[-1]}")

    # --- training ----------------------------------------------------------------
    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def init_from_data(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation from a sample of (already scaled) inputs. Default: the
        decoder bias starts at the inputs' geometric median (Gao et al.); for a transcoder at zero
        (the trainer then sets it from the targets)."""
        from conca.dictionaries.init import geometric_median

        with torch.no_grad():
            self.b_dec.copy_(torch.zeros(self.config.out_dim) if self.is_transcoder else geometric_median(x))

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None, x: torch.Tensor | None = None) -> None:
        """Runs after each optimiser step with the optimiser and the (scaled) batch just used,
        e.g. to renormalise decoder rows or to resample dead latents and reset their Adam state."""

    def fold_input_scale(self, scale: float) -> None:
        """The dictionary was trained on x*scale; rewrite it to act on raw x with latents / scale."""
        raise NotImplementedError

    def scale_output(self, factor: float) -> None:
        """Multiply every reconstruction by `factor` (x_hat = W_dec z + b_dec is linear in both).

        Used to fold a transcoder's separate target scale back into the weights."""
        with torch.no_grad():
            self.W_dec.mul_(factor)
            self.b_dec.mul_(factor)

    # --- persistence -------------------------------------------------------------
    def inference_state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().contiguous() for k, v in self.named_parameters()}
        for name in self.inference_buffers:
            state[name] = getattr(self, name).detach().contiguous()
        return state

    def save(self, path: "str | Path", extra: dict | None = None) -> Path:
        from conca.activations.store import atomic_write_bytes, atomic_write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / WEIGHTS_FILE, st_save({k: v.cpu() for k, v in self.inference_state().items()}))
        atomic_write_json(path / CONFIG_FILE, {"method": self.name, "config": asdict(self.config),
                                               "conca_version": conca.__version__, **(extra or {})})
        return path

    @classmethod
    def from_config_dict(cls, config: dict) -> "Dictionary":
        names = {f.name for f in fields(cls.Config)}
        unknown = set(config) - names
        if unknown:
            raise ConfigError(f"unknown options for {cls.name}: {', '.join(sorted(unknown))} (known: {', '.join(sorted(names))})")
        config = validate_fields(cls.Config, config, lambda key: f"{cls.name} option {key}")  # types, as declared
        return cls(cls.Config(**config))


def create(method: str, **config) -> Dictionary:
    return get_method(method).from_config_dict(config)


def load_dictionary(path: "str | Path", map_location: str = "cpu") -> Dictionary:
    path = Path(path)
    if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise InputError(f"{path} is not a saved dictionary (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = json.loads((path / CONFIG_FILE).read_text())
    dictionary = get_method(meta["method"]).from_config_dict(meta["config"])
    state = st_load((path / WEIGHTS_FILE).read_bytes())
    missing, unexpected = dictionary.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in dict(dictionary.named_parameters()) or k in dictionary.inference_buffers]
    if missing or unexpected:
        raise InputError(f"{path}: weights do not match the {meta['method']} config (missing {missing}, unexpected {unexpected})")
    return dictionary.to(map_location).eval()
