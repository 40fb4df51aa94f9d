"""The options of `conca align` and their checks (all made before anything trains)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from conca.config import option
from conca.dictionaries.align import ACTIVATIONS, ALIGN_LOSSES
from conca.errors import ConfigError
from conca.interventions.swap import SWAP_METHODS

QUICK = {"persons": 16, "lm_layers": 2, "lm_width": 32, "lm_heads": 2, "lm_steps": 40, "lm_eval_every": 20,
         "n_free": 32, "steps": 60, "baseline_latents": 32, "alphas": "1,10", "swap_questions": 4,
         "model_n_free": 16, "model_steps": 40, "model_alphas": "5", "model_new_tokens": 4, "swap_examples": 2}


@dataclass
class AlignOptions:
    out: str = option("align_out", "output directory (report.html, results.json, the trained LM, per-layer runs)",
                      path="out_dir")
    quick: bool = option(False, "tiny sizes for tests and smoke runs (overrides the size options)")
    # --- the biography world -------------------------------------------------------------
    biographies: bool = option(True, "run the biography world (SPEC §4.3)")
    persons: int = option(200, "persons in the biography world (the released code: 1000)", min=1)
    world_seed: int = option(0, "seed of the persons and their attributes", min=0)
    dict_train_fraction: float = option(0.8, "share of persons whose in-distribution questions train the dictionary "
                                             "(the rest give test-ID)", gt=0, lt=1)
    lm_layers: int = option(4, "transformer blocks of the biography LM (the paper: GPT-2, 12)", min=1)
    lm_width: int = option(128, "width of the biography LM (the paper: 768)", min=1)
    lm_heads: int = option(4, "attention heads of the biography LM", min=1)
    lm_steps: int = option(4000, "maximum training steps of the biography LM (stops early at --lm-target-accuracy)",
                           min=1)
    lm_batch_size: int = option(32, "questions per LM training step", min=1)
    lm_lr: float = option(2e-3, "peak learning rate of the LM (cosine decay to a tenth)", gt=0)
    lm_target_accuracy: float = option(0.98, "stop LM training when greedy in-distribution accuracy reaches this",
                                       gt=0, max=1)
    lm_eval_every: int = option(500, "LM steps between accuracy checks", min=1)
    layers: str = option("all", "layers studied: 'all' or comma-separated block indices (site resid.L = HF "
                                "hidden_states[L+1])")
    # --- AlignSAE -------------------------------------------------------------------------
    n_free: int = option(1024, "free latents (the released per-layer sweep: 10,000); concept slots come after them",
                         min=1)
    activation: str = option("identity", f"encoder activation on the free bank: {', '.join(ACTIVATIONS)} "
                                         "(identity = the released code)", choices=ACTIVATIONS)
    k: int = option(32, "active free latents for --activation topk", min=1)
    align_loss: str = option("mse", "slot alignment loss: mse (to one-hot; 1-hop code) or ce (cross-entropy; 2-hop code)",
                             choices=ALIGN_LOSSES)
    recon_coeff: float = option(1.0, "weight of the reconstruction MSE", min=0)
    sparse_coeff: float = option(1e-3, "weight of the L1 on free latents", min=0)
    align_coeff: float = option(1.0, "weight of the slot alignment loss", min=0)
    indep_coeff: float = option(1e-2, "weight of the free-free decorrelation", min=0)
    ortho_coeff: float = option(1e-2, "weight of the concept-free decorrelation", min=0)
    value_coeff: float = option(0.5, "weight of the value-prediction heads (0: no heads)", min=0)
    pretrain_fraction: float = option(0.2, "share of the steps spent on stage 1 (reconstruction only)", min=0, lt=1)
    pretrain_sparsity: bool = option(False, "stage 1 also pays the free-latent L1")
    steps: int = option(3000, "AlignSAE training steps per layer (stage 1 + stage 2)", min=1)
    batch_size: int = option(64, "AlignSAE batch size (the released code: 64)", min=1)
    lr: float = option(1e-3, "AlignSAE peak learning rate (the released code: 1e-3)", gt=0)
    baseline: bool = option(True, "also train an unsupervised ReLU-L1 SAE per layer (fragmentation, matched-feature binding)")
    baseline_latents: int = option(1024, "latents of the unsupervised SAE", min=1)
    baseline_l1: float = option(0.1, "L1 coefficient of the unsupervised SAE (inputs scaled to E||x||^2 = d)", min=0)
    baseline_swaps: bool = option(True, "also swap through the unsupervised SAE (each relation's Hungarian-matched "
                                        "feature as its slot), same trials, alphas and methods")
    # --- swaps ----------------------------------------------------------------------------
    alphas: str = option("0.1,0.5,1,2,5,10,20,50,100", "swap strengths alpha (comma-separated; the paper: 0.1 .. 1000)")
    swap_questions: int = option(100, "test-ID questions swapped, each to all 5 other relations (the paper: 200)",
                                 min=1)
    swap_methods: str = option("latent_decode,decoder_column", "how a swap edits the activation, comma-separated, each "
                                                               f"measured over the alpha grid: {', '.join(SWAP_METHODS)}")
    swap_error_term: bool = option(False, "latent_decode keeps the dictionary's error term (the released code: no)")
    swap_positions: str = option("last", "positions edited: last (prompt token, as released), 'last,new', all, ...")
    # --- the default model ----------------------------------------------------------------
    default_model: bool = option(True, "also run a shipped ontology on the default model: binding accuracy and swaps on text")
    model: str = option("smollm2", "model for that section: 'smollm2' (embedded default), a .gguf, a local HF directory")
    ontology: str = option("question_types", "ontology: a shipped name (question_types) or a .json/.jsonl file")
    model_layers: str = option("6,12,18,24", "layers of that model to bind concepts at (comma-separated)")
    heldout_fraction: float = option(0.3, "share of each concept's prompts held out for binding accuracy", gt=0, lt=1)
    model_n_free: int = option(256, "free latents of the default model's AlignSAE", min=1)
    model_steps: int = option(1500, "AlignSAE steps on the default model's prompts", min=1)
    model_alphas: str = option("20,50", "swap strengths shown on generated text")
    model_swap_method: str = option("latent_decode", f"swap method shown on generated text: {', '.join(SWAP_METHODS)}",
                                    choices=SWAP_METHODS)
    model_new_tokens: int = option(12, "tokens generated per swap example", min=1)
    swap_examples: int = option(5, "swap examples shown (one per source concept, to the next concept)", min=0)
    allow_download: bool = option(False, "download a hub model or hf: dataset when not in the local cache (off: offline, no network request)")
    # --- running --------------------------------------------------------------------------
    seed: int = option(0, "seed of dictionary training and of sampled questions", min=0)
    threads: int = option(1, "torch/BLAS threads (0: leave them); 1 avoids oversubscribing small shared machines",
                          min=0)
    progress: bool = option(True, "show progress bars and log lines")

    def sized(self) -> "AlignOptions":
        return dataclasses.replace(self, **QUICK) if self.quick else self


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
    for name in ("persons", "n_free", "steps", "batch_size", "swap_questions", "model_n_free", "model_steps",
                 "baseline_latents", "lm_steps"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(opts, name)}")
    _floats(opts.alphas, "alphas")
    _floats(opts.model_alphas, "model_alphas")
    if not opts.biographies and not opts.default_model:
        raise ConfigError("nothing to run: enable --biographies or --default-model")
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
