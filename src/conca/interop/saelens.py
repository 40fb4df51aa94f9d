"""Export to and import from the SAELens on-disk format (sae_lens 6.x): a folder holding
``cfg.json`` and ``sae_weights.safetensors``, loadable with ``sae_lens.SAE.load_from_disk(path)``.

SAELens stores weights in conca's layout: W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_dec (d_in,),
and per-latent vectors b_enc / threshold / b_gate / b_mag / r_mag (d_sae,). With
``apply_b_dec_to_input`` true and ``normalize_activations`` "none" it encodes, with
pre = (x - b_dec) W_enc + b_enc,

    standard:  z = ReLU(pre)
    topk:      z = scatter(ReLU(TopK_k(pre)))                     (top k of pre, then ReLU)
    jumprelu:  z = ReLU(pre) * 1[pre > threshold]
    gated:     z = 1[(x - b_dec) W_enc + b_gate > 0] * ReLU((x - b_dec)(W_enc * exp(r_mag)) + b_mag)

and decodes x_hat = z W_dec + b_dec: the same formulas as the conca methods that map onto them, so
the mapping copies weights and only rewrites thresholds. Each method declares its side (see
conca.dictionaries.base.Dictionary): `saelens_architecture` (None: no SAELens counterpart),
`saelens_tensors` / `load_saelens_tensors` (names and thresholds), `saelens_cfg` /
`saelens_options` (cfg.json keys such as TopK's k) and `saelens_import_default`. Today:

    conca method            SAELens architecture   transformation
    topk                    topk                   k copied
    batchtopk, matryoshka   jumprelu               threshold_i = max(theta, 0) for every latent
    jumprelu                jumprelu               threshold = exp(log_threshold)
    relu_l1, p_anneal       standard               none
    gated                   gated                  W_gate -> W_enc

(`conca methods` lists them all; `supported_methods()` the exportable ones.) This module keeps what
belongs to SAELens' format: cfg.json, legacy configs, and folding SAELens-only options into the
weights. The conca method and its full config go into ``metadata["conca"]``, so importing a folder
written here gives back the same method and options; a folder from SAELens becomes its
architecture's `saelens_import_default` method (jumprelu -> jumprelu).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import conca
from conca.dictionaries.base import Dictionary, load_dictionary, registered
from conca.errors import ConfigError, CorruptDataError, InputError, ShapeError
from conca.interop.hook_names import export_names, imported_provenance
from conca.interop.saelens_options import ExportOptions, ImportOptions  # noqa: F401  (declared there: no torch)

__all__ = ["CFG_FILE", "WEIGHTS_FILE", "export_saelens", "import_saelens", "supported_methods"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# cfg.json follows the SAELens >= 6 layout; SAELens treats a config without a version (or older
# than 6) as legacy and renames / defaults its keys, so the version is part of the format.
SAELENS_FORMAT_VERSION = "6.0.0"

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

# The SAELens architectures conca reads and writes, and the tensors each one's folder holds.
WEIGHT_KEYS = {
    "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"},
}


def supported_methods() -> list[str]:
    """The conca methods `export_saelens` accepts (those that declare a SAELens architecture)."""
    return sorted(cls.name for cls in registered() if cls.saelens_architecture is not None)


def default_method(arch: str) -> type[Dictionary]:
    """The method a foreign SAELens folder of `arch` becomes (its `saelens_import_default`)."""
    found = [cls for cls in registered() if cls.saelens_architecture == arch and cls.saelens_import_default]
    if len(found) != 1:
        raise ConfigError(f"SAELens architecture {arch!r} needs exactly one conca method with saelens_import_default, "
                          f"found {', '.join(c.name for c in found) or 'none'}")
    return found[0]


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def export_saelens(dictionary: Dictionary, path: "str | Path", hook_name: str = "", model_name: str = "",
                   dtype: str = "float32", provenance: dict | None = None) -> Path:
    """Write `dictionary` as a SAELens SAE folder (cfg.json + sae_weights.safetensors) at `path`.

    hook_name / model_name go into cfg.json's metadata (SAELens uses the hook name to attach the
    SAE to a TransformerLens model; empty means unknown; see conca.interop.hook_names);
    `provenance` (the dictionary's record) goes into metadata["conca"]. `dtype` is the stored weight dtype and
    SAELens' compute dtype: float32, float64, float16 or bfloat16 (the last two round the weights).
    Each file is written atomically, weights first."""
    from conca.fileio import atomic_write_bytes, atomic_write_json

    method = dictionary.name
    arch = dictionary.saelens_architecture
    if arch is None:
        raise ConfigError(f"conca method {method!r} has no SAELens counterpart; exportable methods: "
                          f"{', '.join(supported_methods())}")
    if dictionary.is_transcoder:
        raise ConfigError(f"cannot export this {method} transcoder (d_out={dictionary.config.d_out}) to SAELens: "
                          f"only SAEs that reconstruct their own input (d_out=None) are supported")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if arch not in WEIGHT_KEYS:
        raise ConfigError(f"conca method {method!r} declares SAELens architecture {arch!r}; supported: "
                          f"{', '.join(WEIGHT_KEYS)}")
    config = dictionary.config
    n = config.n_latents
    with torch.no_grad():
        weights = dictionary.saelens_tensors()
        tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in weights.items()}
    if set(tensors) != WEIGHT_KEYS[arch]:
        raise ConfigError(f"conca method {method!r} gives tensors {sorted(tensors)} for SAELens {arch}, which needs "
                          f"{sorted(WEIGHT_KEYS[arch])}")

    cfg = {
        "d_in": config.d_in,
        "d_sae": n,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,  # every conca SAE centres its input by b_dec
        "normalize_activations": "none",  # conca folds its input scale into the weights
        "reshape_activations": "none",
        "architecture": arch,
    }
    cfg.update(dictionary.saelens_cfg())
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # not trained by SAELens
        "model_name": model_name or None,
        "hook_name": hook_name or None,
        "hook_head_index": None,
        "conca": {"method": method, "config": asdict(config), "conca_version": conca.__version__,
                  **({"provenance": provenance} if provenance else {})},
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_FILE, st_save(tensors, metadata={"format": "pt"}))
    atomic_write_json(path / CFG_FILE, cfg)
    return path


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------


def _major_version(version) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def _upgrade_legacy_cfg(cfg: dict, cfg_path: "Path | str" = CFG_FILE) -> dict:
    """SAELens < 6 configs (no version): the defaults SAELens itself fills in (handle_pre_6_0_config).

    A standard SAE's activation must be one conca reproduces (relu, or topk with its k): any other
    (tanh-relu, ...) is an error, not a ReLU SAE that encodes differently."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    major = _major_version(version) if version else None
    if major is not None and major >= 6:
        return cfg
    cfg = dict(cfg)
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("apply_b_dec_to_input", True)
    key = "activation_fn" if "activation_fn" in cfg else "activation_fn_str"
    activation = cfg.get(key, "relu")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise InputError(f"{cfg_path}: activation_fn_kwargs must be a JSON object, got {kwargs!r}")
    k = kwargs.get("k")
    if cfg["architecture"] == "standard" and activation not in ("relu", "topk"):
        raise ConfigError(f"{cfg_path}: {key}={activation!r} is not supported: conca imports SAELens "
                          f"SAEs with activation relu or topk")
    if cfg["architecture"] == "standard" and activation == "topk":
        if k is None:
            raise InputError(f"{cfg_path}: {key}='topk' needs activation_fn_kwargs.k")
        cfg.update(architecture="topk", k=k)
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    missing = [f for f in (CFG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
    if missing:
        raise InputError(f"{path} is not a SAELens SAE folder: missing {', '.join(missing)} "
                         f"(needs {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads((path / CFG_FILE).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path / CFG_FILE} is not UTF-8 text (byte offset {e.start}): not a SAELens cfg.json") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path / CFG_FILE} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path / CFG_FILE} must hold a JSON object, got {type(cfg).__name__}: {str(cfg)[:40]!r}")
    try:
        state = st_load((path / WEIGHTS_FILE).read_bytes())
    except Exception as e:  # safetensors raises its own SafetensorError for malformed files
        raise InputError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {e}") from e
    return cfg, state


def import_saelens(path: "str | Path") -> Dictionary:
    """Load a SAELens SAE folder as the matching conca dictionary (eval mode) whose `encode` /
    `decode` reproduce SAELens' on the same inputs.

    Folded into the weights on the way in (float64 arithmetic, so up to rounding):
    apply_b_dec_to_input=False (b_enc += b_dec W_enc; gated: b_gate += b_dec W_enc,
    b_mag += b_dec (W_enc * exp(r_mag))), TopK's rescale_acts_by_decoder_norm (W_enc, b_enc times
    ||W_dec_i||, W_dec_i divided by it) and a legacy finetuning `scaling_factor` (into W_dec rows).
    Rejected with ConfigError: runtime input normalisation (normalize_activations other than
    "none") and hook_z reshaping. Weights become float32 (float64 if cfg.json says so)."""
    path = Path(path)
    cfg, state = _read(path)
    cfg = _upgrade_legacy_cfg(cfg, path / CFG_FILE)
    arch = cfg.get("architecture")
    if arch is None:
        raise InputError(f"{path / CFG_FILE} has no 'architecture' (one of {', '.join(WEIGHT_KEYS)})")
    if not isinstance(arch, str) or arch not in WEIGHT_KEYS:
        raise ConfigError(f"{path / CFG_FILE}: SAELens architecture {arch!r} is not supported; supported: "
                          f"{', '.join(WEIGHT_KEYS)}")
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in ("none", None):
        hint = (" (fold the norm scaling factor into the weights first: SAELens "
                "sae.fold_activation_norm_scaling_factor(f), then save_model)"
                if normalize == "expected_average_only_in" else "")
        raise ConfigError(f"{path}: normalize_activations={normalize!r} is not supported; conca dictionaries act "
                          f"on raw activations{hint}")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ConfigError(f"{path}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    d_in, d_sae = (_positive_int(cfg, key, path / CFG_FILE) for key in ("d_in", "d_sae"))
    if arch == "topk":
        k = _positive_int(cfg, "k", path / CFG_FILE)
        if k > d_sae:
            raise InputError(f"{path / CFG_FILE}: k={k} is larger than d_sae={d_sae}")
    for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        if not isinstance(cfg.get(key, False), bool):
            raise InputError(f"{path / CFG_FILE}: {key} must be true or false, got {cfg[key]!r}")

    # Exact in float64: every float32 / bf16 / fp16 value round-trips through it.
    w = {k: v.to(torch.float64) for k, v in state.items()}
    scaling = w.pop("scaling_factor", None)
    log_threshold = w.pop("log_threshold", None) if arch == "jumprelu" and "threshold" not in w else None
    expected = WEIGHT_KEYS[arch] - ({"threshold"} if log_threshold is not None else set())
    if set(w) != expected:
        raise InputError(f"{path / WEIGHTS_FILE}: a SAELens {arch} SAE needs tensors {sorted(expected)}, "
                         f"found {sorted(state)}")
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, value in [*w.items(), *([("log_threshold", log_threshold)] if log_threshold is not None else [])]:
        want = shapes.get(name, (d_sae,))
        if tuple(value.shape) != want:
            raise ShapeError(f"{path / WEIGHTS_FILE}: {name} has shape {tuple(value.shape)}, expected {want} "
                             f"(d_in={d_in}, d_sae={d_sae})")
    for name, value in state.items():
        if not value.is_floating_point():
            raise InputError(f"{path / WEIGHTS_FILE}: {name} has dtype {value.dtype}, expected a floating-point dtype")
        if not bool(torch.isfinite(value).all()):
            raise CorruptDataError(f"{path / WEIGHTS_FILE}: {name} holds non-finite values (NaN or inf)")

    if scaling is not None and not bool((scaling == 1).all()):
        # Legacy SAELens decoded (z * scaling_factor) W_dec.
        w["W_dec"] = w["W_dec"] * scaling.reshape(-1, 1)
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens: pre * ||W_dec_i|| is selected and returned, and decode divides it back out.
        norms = w["W_dec"].norm(dim=1)
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * norms, w["b_enc"] * norms, w["W_dec"] / norms[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens encodes x itself; conca encodes x - b_dec, so add b_dec's share back to the biases.
        if arch == "gated":
            w["b_gate"] = w["b_gate"] + w["b_dec"] @ w["W_enc"]
            w["b_mag"] = w["b_mag"] + w["b_dec"] @ (w["W_enc"] * w["r_mag"].exp())
        else:
            w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]

    target = torch.float64 if str(cfg.get("dtype", "float32")).removeprefix("torch.") == "float64" else torch.float32
    threshold = None
    if arch == "jumprelu":
        if log_threshold is not None:
            threshold = log_threshold.to(target).exp()
        else:
            # ReLU(pre) * 1[pre > t] is ReLU(pre) for every t <= 0, as conca's pre * 1[pre > 0] is.
            threshold = w["threshold"].to(target).clamp_min(0)

    tensors = {k: v for k, v in w.items() if k != "threshold"}
    if threshold is not None:
        tensors["threshold"] = threshold
    if log_threshold is not None:
        tensors["log_threshold"] = log_threshold
    dictionary = _build(cfg, arch, d_in, d_sae, tensors).to(target)
    dictionary.load_saelens_tensors(tensors)
    return dictionary.eval()


def _positive_int(cfg: dict, key: str, cfg_path: Path) -> int:
    if key not in cfg:
        raise InputError(f"{cfg_path} has no {key!r}")
    value = cfg[key]
    if type(value) is not int or value < 1:
        raise InputError(f"{cfg_path}: {key} must be a positive integer, got {value!r}")
    return value


def _build(cfg: dict, arch: str, d_in: int, d_sae: int, tensors: dict[str, torch.Tensor]) -> Dictionary:
    """A fresh conca dictionary for the folder: the method and options `export_saelens` recorded
    when they fit the weights (e.g. BatchTopK keeps one threshold for all latents; a per-latent one
    needs a JumpReLU), else the architecture's default method."""
    options = {"d_in": d_in, "n_latents": d_sae, "d_out": None}
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    recorded = meta.get("conca") if isinstance(meta.get("conca"), dict) else {}
    method, config = recorded.get("method"), recorded.get("config")
    known = {cls.name: cls for cls in registered()}
    cls = known.get(method) if isinstance(method, str) else None
    if cls is not None and cls.saelens_architecture == arch and isinstance(config, dict) and cls.saelens_fits(tensors):
        try:
            return cls.from_config_dict({**config, **options, **cls.saelens_options(cfg)})
        except (ConfigError, TypeError):
            pass  # options from another conca version: the weights alone still fix the encoding
    cls = default_method(arch)
    return cls.from_config_dict({**options, **cls.saelens_options(cfg)})


def run_export(opts: ExportOptions) -> Path:
    if not opts.dictionary or not opts.out:
        raise ConfigError("export needs --dictionary DIR and --out DIR")
    dictionary = load_dictionary(opts.dictionary)  # checks the folder first
    meta = json.loads((Path(opts.dictionary) / "config.json").read_text())
    provenance = meta.get("provenance")  # dictionaries saved before provenance may record a bare "site"
    hook_name, model_name = export_names(provenance or {"site": meta.get("site")}, opts.hook_name, opts.model_name,
                                         opts.dictionary)
    return export_saelens(dictionary, opts.out, hook_name=hook_name or "", model_name=model_name or "",
                          dtype=opts.dtype, provenance=provenance)


def run_import(opts: ImportOptions) -> Path:
    if not opts.path or not opts.out:
        raise ConfigError("import needs --path DIR and --out DIR")
    dictionary = import_saelens(opts.path)  # reads and checks the folder first
    cfg = json.loads((Path(opts.path) / CFG_FILE).read_text())
    return dictionary.save(opts.out, extra={"provenance": imported_provenance(cfg)})
