"""The Dictionary protocol every method implements, the name -> class registry, and the
inference-form checkpoint format (``config.json`` + ``weights.safetensors``)."""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import conca
from conca.dictionaries.registry import REGISTRY, get_method, methods, register, registered
from conca.errors import ConfigError, CorruptDataError, InputError, ShapeError
from conca.values import validate_fields

__all__ = ["REGISTRY", "Dictionary", "DictionaryConfig", "SparsityGrid", "create", "get_method", "load_dictionary",
           "methods", "read_meta", "register", "registered"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"

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


@dataclass(frozen=True)
class SparsityGrid:
    """The option that moves a method along the sparsity axis, and the values `conca sweep` tries."""

    knob: str
    values: tuple
    relative: bool = False  # the values are multiples of the option's default
    default_sweep: bool = False  # part of `conca sweep --methods sae` (the default family)
    # Position among swept methods (ties: registration order): the family is built in this order,
    # so it fixes which random draws initialise which dictionary.
    order: int = 100


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
    `before_optimizer_step` / `after_optimizer_step` run around each optimiser step.

    Adding a method: one module that defines a subclass with `name`, `Config` (a dataclass
    extending DictionaryConfig), `encode`, `loss_terms`, `fold_input_scale` and the declarations
    below, decorated with `conca.dictionaries.register`. Put it in `conca/dictionaries/`, or
    anywhere and name it in CONCA_METHODS (module names or .py paths, os.pathsep-separated) or
    an installed `conca.methods` entry point; see conca.dictionaries.registry. Everything else
    (`conca methods`, train, sweep, reproduce, export, the contract tests) reads the registry."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[DictionaryConfig]] = DictionaryConfig
    inference_buffers: ClassVar[tuple[str, ...]] = ()
    # --- declarations ------------------------------------------------------------
    # The sparsity knob and the values `conca sweep` tries (None: sweep it only with --grid).
    sparsity_grid: ClassVar[SparsityGrid | None] = None
    # The option that the shared target L0 (`conca train --k`, reproduce's --k) sets; None: ignored.
    target_l0_option: ClassVar[str | None] = None
    # Decoder rows kept at unit norm: the gradient's radial part is removed before each optimiser
    # step and the rows renormalised after it. A config field `unit_norm_decoder` switches it off
    # (or on) per dictionary; `keeps_unit_norm_decoder` says what an instance does.
    unit_norm_decoder: ClassVar[bool] = False
    supports_transcoder: ClassVar[bool] = True  # False: a config with d_out is refused (ConfigError)
    # Codes can be negative (e.g. ConCA's log-posterior estimates), so the latent atlas also shows
    # each latent's most negative examples. Either way a latent "fires" where z > 0.
    signed_latents: ClassVar[bool] = False
    # SAELens architecture it exports as (None: no SAELens counterpart), and whether a foreign
    # SAELens folder of that architecture becomes this method on import (one method per architecture).
    saelens_architecture: ClassVar[str | None] = None
    saelens_import_default: ClassVar[bool] = False

    def __init__(self, config: DictionaryConfig):
        super().__init__()
        if config.d_out is not None and not self.supports_transcoder:
            raise ConfigError(f"{self.name} reconstructs its input; transcoder mode (d_out) is not supported")
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

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> "Dictionary":
        """Estimate the inference state that training sets from data, changing no weight (for an untrained
        dictionary used as a chance floor); returns self. Default: nothing to estimate."""
        return self

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

    @property
    def keeps_unit_norm_decoder(self) -> bool:
        """Whether this dictionary keeps unit-norm decoder rows (the class's `unit_norm_decoder`,
        switched by a config field of that name where the config has one)."""
        return self.unit_norm_decoder and bool(getattr(self.config, "unit_norm_decoder", True))

    def before_optimizer_step(self) -> None:
        if self.keeps_unit_norm_decoder:
            # Drop the gradient component that would only change decoder norms (they are renormalised anyway).
            from conca.dictionaries.init import remove_radial_grad_

            remove_radial_grad_(self.W_dec)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None, x: torch.Tensor | None = None) -> None:
        """Runs after each optimiser step with the optimiser and the (scaled) batch just used,
        e.g. to renormalise decoder rows or to resample dead latents and reset their Adam state.
        Subclasses that add to it call this first."""
        if self.keeps_unit_norm_decoder:
            from conca.dictionaries.init import renormalise_rows_

            renormalise_rows_(self.W_dec)

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
        from conca.fileio import atomic_write_bytes, atomic_write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / WEIGHTS_FILE, st_save({k: v.cpu() for k, v in self.inference_state().items()}))
        atomic_write_json(path / CONFIG_FILE, {"method": self.name, "config": asdict(self.config),
                                               "conca_version": conca.__version__, **(extra or {})})
        return path

    # --- shared settings -> config ------------------------------------------------
    @classmethod
    def config_for(cls, d_in: int, n_latents: int, *, d_out: int | None = None, target_l0: int | None = None,
                   steps: int | None = None, fit_width: bool = False, **shared) -> dict:
        """This method's options from the settings every method is given (the one mapper that
        `conca train`, `conca sweep`, `conca reproduce`, the simulations and the benchmarks use):

        d_out      a transcoder's output width (None: reconstruct the input);
        target_l0  active latents per token, set as the option `target_l0_option` names (ignored without one);
        steps      training length: a sparsity warm-up (option `sparsity_warmup_steps`) is capped at a
                   fifth of it, so that a short run sees the penalty;
        fit_width  adapt defaults that do not fit a tiny dictionary: target L0 at most half the
                   latents, and whatever `fit_options` adds;
        shared     further options offered to every method (e.g. AuxK settings): set where the config
                   has a field of that name, ignored elsewhere.
        User options (--dict-options) go on top of the result."""
        defaults = {f.name: f.default for f in fields(cls.Config) if f.default is not MISSING}
        config: dict = {"d_in": d_in, "n_latents": n_latents}
        if d_out is not None:  # transcoder, even when both widths are the same
            config["d_out"] = d_out
        option_l0 = cls.target_l0_option
        if option_l0 is not None and target_l0 is not None:
            config[option_l0] = target_l0
        elif option_l0 is not None and fit_width and isinstance(defaults.get(option_l0), int):
            config[option_l0] = max(1, min(defaults[option_l0], n_latents // 2))
        if steps is not None and isinstance(defaults.get("sparsity_warmup_steps"), int):
            config["sparsity_warmup_steps"] = min(defaults["sparsity_warmup_steps"], steps // 5)
        config.update({key: value for key, value in shared.items() if key in defaults})
        if fit_width:
            config.update(cls.fit_options(n_latents, defaults))
        return config

    @classmethod
    def fit_options(cls, n_latents: int, defaults: dict) -> dict:
        """Options that make the defaults fit a dictionary of `n_latents` latents (see `config_for`)."""
        return {}

    # --- SAELens (conca.interop.saelens reads these) ----------------------------------
    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under SAELens' names for `saelens_architecture` (default: an affine encoder)."""
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}

    def saelens_cfg(self) -> dict:
        """Extra cfg.json keys the architecture needs (TopK: k)."""
        return {}

    @classmethod
    def saelens_options(cls, cfg: dict) -> dict:
        """Options a SAELens cfg.json fixes on import (TopK: k); applied over recorded ones."""
        return {}

    @classmethod
    def saelens_fits(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether imported weights (SAELens names, `threshold` already >= 0) can be this method's."""
        return True

    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the (already folded) SAELens-named weights into this dictionary."""
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(self, name).copy_(value)

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


def _json_kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def read_meta(config_path: "str | Path") -> dict:
    """A saved dictionary's config.json (method, config, and what was recorded beside them), checked:
    one InputError naming the file and what is wrong. Anything that reads the file uses this."""
    config_path = Path(config_path)
    try:
        meta = json.loads(config_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CorruptDataError(f"{config_path} is not UTF-8 text (byte offset {exc.start}): not a conca "
                               f"dictionary config") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CorruptDataError(f"{config_path} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise InputError(f"cannot read dictionary config {config_path}: {exc.strerror or exc}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{config_path} must hold a JSON object with 'method' and 'config', got {_json_kind(meta)}")
    missing = [key for key in ("method", "config") if key not in meta]
    if missing:
        raise InputError(f"{config_path} has no {' or '.join(repr(k) for k in missing)} key")
    method, config = meta["method"], meta["config"]
    if not isinstance(method, str):
        raise InputError(f"{config_path}: 'method' must be a string, got {_json_kind(method)}")
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: 'config' must be a JSON object of the method's options, "
                         f"got {_json_kind(config)}")
    for key in ("d_in", "n_latents", "d_out"):  # the widths every method has, checked against the weights
        if key not in config and key != "d_out":
            raise InputError(f"{config_path}: 'config' has no {key!r}")
        value = config.get(key)
        if not (key == "d_out" and value is None) and (type(value) is not int or value < 1):
            raise InputError(f"{config_path}: config {key} must be a positive integer, got {json.dumps(value)}")
    return meta


def _read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    """The tensors of weights.safetensors, every floating one finite; else CorruptDataError naming the file."""
    try:
        state = st_load(weights_path.read_bytes())
    except Exception as exc:  # safetensors raises its own SafetensorError (and others) for malformed files
        raise CorruptDataError(f"{weights_path} is not a readable safetensors file ({exc})") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CorruptDataError(f"{weights_path}: tensor {name} holds {bad} non-finite value(s) (NaN or inf)")
    return state


def load_dictionary(path: "str | Path", map_location: str = "cpu") -> Dictionary:
    """Load a dictionary saved by `Dictionary.save`. Everything in the folder is checked before any
    weights are allocated (the config is first built on the meta device): a malformed config.json,
    an unknown method, options the method rejects, tensors missing, unexpected, of the wrong shape
    or dtype, or non-finite values each give one InputError / CorruptDataError naming the file."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise InputError(f"{path} is not a saved dictionary (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = read_meta(config_path)
    method, config = meta["method"], meta["config"]
    try:
        cls = get_method(method)
    except ConfigError as exc:
        raise InputError(f"{config_path}: {exc}") from None
    state = _read_weights(weights_path)
    try:
        with torch.device("meta"):  # shapes only: a config with absurd widths allocates nothing
            skeleton = cls.from_config_dict(config)
    except (ConfigError, TypeError, ValueError) as exc:
        raise InputError(f"{config_path}: config does not fit the {method} method: {exc}") from None
    expected = skeleton.state_dict()
    required = skeleton.inference_state()
    missing = sorted(set(required) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(f"{weights_path}: tensors do not match the {method} config in {CONFIG_FILE} "
                         f"(missing {missing}, unexpected {unexpected})")
    for name, tensor in state.items():
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise ShapeError(f"{weights_path}: tensor {name} has shape {tuple(tensor.shape)}, but the {method} config in "
                             f"{CONFIG_FILE} (d_in={config.get('d_in')}, n_latents={config.get('n_latents')}) "
                             f"needs {tuple(want.shape)}")
        floating = want.is_floating_point()  # any float width is cast on loading; other dtypes must match
        if tensor.is_floating_point() != floating or (not floating and tensor.dtype != want.dtype):
            raise InputError(f"{weights_path}: tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                             f"expected {'a floating-point dtype' if floating else want.dtype}")
    dictionary = cls.from_config_dict(config)
    dictionary.load_state_dict(state, strict=False)
    dictionary.eval()
    try:  # options that construct but cannot encode (k larger than n_latents, a string where a number goes)
        with torch.no_grad():
            dictionary.encode(torch.zeros(2, dictionary.config.d_in))
    except (ConfigError, TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{config_path}: the {method} config does not give a working dictionary: {exc}") from None
    return dictionary.to(map_location)
