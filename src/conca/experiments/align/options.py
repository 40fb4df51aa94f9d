"""The checks of `conca align`'s options (all made before anything trains); the options themselves are
declared in conca.experiments.lab_options (no torch, for a fast --help)."""

from __future__ import annotations

from conca.dictionaries.align import ACTIVATIONS, ALIGN_LOSSES
from conca.errors import ConfigError
from conca.experiments.lab_options import AlignOptions  # noqa: F401  (declared there: no torch)
from conca.interventions.swap import SWAP_METHODS


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{name} is empty")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _layers(text: str, n_layers: int, name: str) -> list[int]:
    if text.strip() == "all":
        return list(range(n_layers))
    try:
        layers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be 'all' or comma-separated layer indices, got {text!r}") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ConfigError(f"{name}: layer {bad[0] if bad else '(none)'} out of range, the model has {n_layers} "
                          f"layers (0..{n_layers - 1})")
    return layers


def validate(opts: AlignOptions) -> None:
    if opts.activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {opts.activation!r}")
    if opts.align_loss not in ALIGN_LOSSES:
        raise ConfigError(f"align_loss must be one of {', '.join(ALIGN_LOSSES)}, got {opts.align_loss!r}")
    for method in _names(opts.swap_methods) + [opts.model_swap_method]:
        if method not in SWAP_METHODS:
            raise ConfigError(f"swap method must be one of {', '.join(SWAP_METHODS)}, got {method!r}")
    if not _names(opts.swap_methods):
        raise ConfigError("swap_methods is empty")
    if not 0 < opts.dict_train_fraction < 1 or not 0 < opts.heldout_fraction < 1:
        raise ConfigError("dict_train_fraction and heldout_fraction must be in (0, 1)")
    if not 0 <= opts.select_fraction < 1:
        raise ConfigError(f"select_fraction must be in [0, 1), got {opts.select_fraction}")
    for name in ("persons", "n_free", "epochs", "two_hop_epochs", "batch_size", "swap_questions", "model_n_free", "model_steps",
                 "baseline_latents", "lm_steps", "two_hop_train_questions", "two_hop_test_questions", "two_hop_lm_steps",
                 "two_hop_eval_every", "two_hop_swap_questions"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(opts, name)}")
    if opts.steps < 0:
        raise ConfigError(f"steps must be >= 0 (0: from --epochs), got {opts.steps}")
    _floats(opts.alphas, "alphas")
    _floats(opts.model_alphas, "model_alphas")
    if not opts.biographies and not opts.default_model and not opts.two_hop:
        raise ConfigError("nothing to run: enable --biographies, --two-hop or --default-model")
    if opts.two_hop:
        from conca.synthetic.two_hop import ENTITY_NAMES, TWO_HOP_RELATIONS

        if not 3 <= opts.two_hop_entities <= len(ENTITY_NAMES):
            raise ConfigError(f"two_hop_entities must be in 3..{len(ENTITY_NAMES)}, got {opts.two_hop_entities}")
        if not 2 <= opts.two_hop_relations <= len(TWO_HOP_RELATIONS):
            raise ConfigError(f"two_hop_relations must be in 2..{len(TWO_HOP_RELATIONS)}, got {opts.two_hop_relations}")
        possible = opts.two_hop_entities * opts.two_hop_relations ** 2
        if opts.two_hop_train_questions + opts.two_hop_test_questions > possible:
            raise ConfigError(f"two_hop_train_questions + two_hop_test_questions exceed the {possible} questions of "
                              f"a {opts.two_hop_entities}-entity, {opts.two_hop_relations}-relation world")
    # Cheap checks of what the sections read later, so that a bad value fails before any training.
    from conca.interventions.hooks import Positions

    _layers(opts.layers, opts.lm_layers, "layers")
    Positions.parse(opts.swap_positions)
    if opts.default_model:
        from conca.concepts.ontology import load_ontology
        from conca.models.load import resolve_model_spec

        resolve_model_spec(opts.model)
        load_ontology(opts.ontology)
        _layers(opts.model_layers, 10**6, "model_layers")  # the names; the range once the model is loaded
