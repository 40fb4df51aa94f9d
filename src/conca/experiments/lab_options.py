"""The options of `conca simulate` and `conca align` (the synthetic labs), light like
`conca.experiments.options`: no torch at import, so the parser is built without it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from conca.config import option
from conca.experiments.options import allow_download_option, model_option, progress_option

ALIGN_ACTIVATIONS = ("identity", "relu", "topk")  # conca.dictionaries.align.ACTIVATIONS
ALIGN_LOSS_NAMES = ("mse", "ce")  # conca.dictionaries.align.ALIGN_LOSSES
SWAP_METHODS = ("latent_decode", "decoder_column")  # conca.interventions.swap.SWAP_METHODS


@dataclass
class SimulateOptions:
    out: str = option("simulate_out", "output directory", path="out_dir")
    # --- the objectives (rows of the table; the first is the headline of results.json) ---
    objectives: str = option("diverse,app_m", "comma-separated objectives, the first the headline: 'diverse' (one "
                                              "shared f predicting many-outcome targets: the diversity condition holds) "
                                              "and 'app_m' (ConCA App. M's masked single bit, as literally as the paper "
                                              "allows)", listed=True)
    target_vocab: int = option(32, "diverse objective: outcomes of each target token y", min=2)
    target_scale: float = option(1.5, "diverse objective: std of the per-concept logits of p(y|z) (larger: each y "
                                      "more informative)", gt=0)
    targets: int = option(8, "diverse objective: target tokens per training sample, all predicted from one f(x)", min=1)
    # --- the table world (ConCA App. M) ---
    n_latents: int = option(5, "latent concepts in the table world (ConCA App. M: 5)", min=1)
    cardinality: int = option(2, "values per latent (2: binary, as in both papers; >2: k-valued)", min=2)
    graph: str = option("er", "latent DAG: 'chain', 'er' (with --expected-edges), 'erK' (K*n expected edges) "
                              "or edges '0->1,1->2'", listed=True)
    expected_edges: float = option(10.0, "expected edges of an 'er' graph (ConCA App. M: 10; capped at n(n-1)/2)",
                                   min=0)
    prob_low: float = option(0.2, "conditionals p(z_j=1|parents) ~ U[prob_low, prob_high] (papers: 0.2)", min=0, max=1)
    prob_high: float = option(0.8, "upper end of the conditionals' uniform range (papers: 0.8)", min=0, max=1)
    observed: int = option(12, "observed binary variables of the table world, both objectives (not stated in the paper)",
                           min=1)
    observed_order: str = option("random", "which pool variables are observed: 'random' subset or 'sequential' "
                                           "(permutation by permutation)", choices=("random", "sequential"))
    flip_prob: float = option(0.05, "diverse objective: probability of flipping each observed bit (a stochastic "
                                     "p(x|z))", min=0, max=1)
    app_m_flip_prob: float = option(0.0, "App. M row and the Fig. 2 sweeps: bit-flip probability (0: the papers' "
                                         "deterministic mixing)", min=0, max=1)
    representation_dim: int = option(10, "width of the predictor's last layer f(x) in the table (ConCA App. M: 10)",
                                     min=1)
    compare_dim: int = option(256, "also run App. M's row at this representation width, probes only (0: skip)", min=0)
    hidden: int = option(256, "width of the predictor's other layers (papers: 256); also f(x)'s width in the Fig. 2 sweeps",
                         min=1)
    samples: int = option(20000, "training samples per world", min=1)
    steps: int = option(2000, "diverse objective: predictor training steps (Adam)", min=1)
    app_m_steps: int = option(1000, "App. M row: predictor training steps (not stated in the paper)", min=1)
    batch_size: int = option(256, "predictor batch size", min=1)
    lr: float = option(1e-3, "diverse objective: predictor learning rate", gt=0)
    app_m_lr: float = option(1e-4, "App. M row and the Fig. 2 sweeps: predictor learning rate (papers: Adam 1e-4)", gt=0)
    eval_pairs: int = option(500, "evaluation: counterfactual pairs per concept (or 2x as many samples per concept)",
                             min=1)
    counterfactual: bool = option(True, "evaluate on pairs differing in one concept (ConCA App. M); false: observational samples")
    log_eps: float = option(1e-6, "log-posteriors are clamped at log(log_eps)", gt=0, lt=1)
    methods: str = option("conca_layernorm_softplus,conca_groupnorm_softplus,conca_batchnorm_softplus,p_anneal,relu_l1,topk",
                          "dictionaries scored against the truth: comma-separated registered methods, 'all', or 'none'",
                          listed=True)
    method_options: str = option("", "per-method options 'METHOD:key=value,key=value;METHOD2:...'")
    dict_latents: int = option(0, "latents per dictionary (0: sum of cardinalities = number of marginal log-posteriors)",
                               min=0)
    dict_steps: int = option(600, "dictionary training steps", min=1)
    dict_batch_size: int = option(256, "dictionary batch size", min=1)
    dict_lr: float = option(1e-3, "dictionary peak learning rate", gt=0)
    seeds: int = option(3, "seeds per configuration (mean and std reported)", min=1)
    seed: int = option(0, "first seed", min=0)
    # --- I-Predict Fig. 2 ---
    sweep_observed: str = option("2,3,4,6,12,24", "Fig. 2 left: comma-separated observed-variable counts (empty: skip)",
                                 listed=True)
    sweep_chain: int = option(3, "Fig. 2 left: latents in the chain (papers: 3)", min=1)
    graph_types: str = option("er1,er2,er3", "Fig. 2 right: comma-separated graphs (empty: skip)", listed=True)
    graph_sizes: str = option("4,6,8", "Fig. 2 right: comma-separated latent counts (papers: 4..8)", listed=True)
    graph_observed_per_latent: int = option(3, "Fig. 2 right: observed variables per latent", min=1)
    sweep_steps: int = option(500, "predictor steps in the Fig. 2 sweeps (0: --steps)", min=0)
    # --- token world ---
    token_world: bool = option(True, "also train a causal transformer on the token-sequence world")
    token_length: int = option(12, "token world: tokens per sequence", min=2)
    token_vocab: int = option(16, "token world: vocabulary size", min=2)
    token_steps: int = option(600, "token world: transformer training steps", min=1)
    # --- running ---
    quick: bool = option(False, "tiny sizes (for tests and smoke runs): every size is capped")
    threads: int = option(1, "torch and BLAS threads during the run (0: leave them); 1 avoids oversubscribing "
                             "small shared machines", min=0)
    progress: bool = progress_option("log progress")


QUICK = {"persons": 16, "lm_layers": 2, "lm_width": 32, "lm_heads": 2, "lm_steps": 40, "lm_eval_every": 20,
         "n_free": 32, "epochs": 20, "two_hop_epochs": 10, "baseline_latents": 32, "alphas": "1,10", "swap_questions": 4,
         "model_n_free": 16, "model_steps": 40, "model_alphas": "5", "model_new_tokens": 4, "swap_examples": 2,
         "two_hop_entities": 6, "two_hop_relations": 4, "two_hop_train_questions": 60, "two_hop_test_questions": 12,
         "two_hop_lm_steps": 40, "two_hop_eval_every": 10, "two_hop_swap_questions": 3}


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
    select_fraction: float = option(0.0, "share of the dictionary-train persons (2-hop: training questions) held out "
                                         "to pick the AlignSAE checkpoint by best diagonal accuracy on them; 0 (default):"
                                         " keep the last step (held-out binding peaks early, swaps need the trained "
                                         "slots)", min=0, lt=1)
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
                                "hidden_states[L+1])", listed=True)
    # --- AlignSAE -------------------------------------------------------------------------
    n_free: int = option(1024, "free latents (the released per-layer sweep: 10,000); concept slots come after them",
                         min=1)
    activation: str = option("identity", f"encoder activation on the free bank: {', '.join(ALIGN_ACTIVATIONS)} "
                                         "(identity = the released code)", choices=ALIGN_ACTIVATIONS)
    k: int = option(32, "active free latents for --activation topk", min=1)
    align_loss: str = option("mse", "slot alignment loss: mse (to one-hot; 1-hop code) or ce (cross-entropy; 2-hop code)",
                             choices=ALIGN_LOSS_NAMES)
    recon_coeff: float = option(1.0, "weight of the reconstruction MSE", min=0)
    sparse_coeff: float = option(1e-3, "weight of the L1 on free latents", min=0)
    align_coeff: float = option(1.0, "weight of the slot alignment loss", min=0)
    indep_coeff: float = option(1e-2, "weight of the free-free decorrelation", min=0)
    ortho_coeff: float = option(1e-2, "weight of the concept-free decorrelation", min=0)
    value_coeff: float = option(0.5, "weight of the value-prediction heads (0: no heads)", min=0)
    pretrain_fraction: float = option(0.05, "share of the steps spent on stage 1 (reconstruction only; the released "
                                            "per-layer sweep: 20 of 420 epochs)", min=0, lt=1)
    pretrain_sparsity: bool = option(False, "stage 1 also pays the free-latent L1")
    steps: int = option(0, "AlignSAE training steps per layer (stage 1 + stage 2); 0: --epochs passes over the "
                           "layer's training rows", min=0)
    epochs: int = option(420, "with --steps 0, the biography AlignSAE's passes over its training rows (the released "
                              "per-layer sweep: 20 + 400; fewer leave the relation in the free bank, so swaps need a "
                              "larger alpha)", min=1)
    batch_size: int = option(64, "AlignSAE batch size (the released code: 64)", min=1)
    lr: float = option(1e-3, "AlignSAE peak learning rate (the released code: 1e-3)", gt=0)
    baseline: bool = option(True, "also train an unsupervised ReLU-L1 SAE per layer (fragmentation, matched-feature binding)")
    baseline_latents: int = option(1024, "latents of the unsupervised SAE", min=1)
    baseline_l1: float = option(0.1, "L1 coefficient of the unsupervised SAE (inputs scaled to E||x||^2 = d)", min=0)
    baseline_swaps: bool = option(True, "also swap through the unsupervised SAE (each relation's Hungarian-matched "
                                        "feature as its slot), same trials, alphas and methods")
    # --- the 2-hop world (uses the LM sizes and AlignSAE options above) -------------------
    two_hop: bool = option(True, "run the 2-hop world: binding, swaps beside an unsupervised SAE, the grokking probe")
    two_hop_entities: int = option(24, "entities of the 2-hop world (the released code: 40)", min=3)
    two_hop_relations: int = option(20, "relations of the 2-hop world (the released code: 20)", min=2)
    two_hop_train_questions: int = option(2000, "2-hop questions the LM trains on (the released code: 4k)", min=2)
    two_hop_test_questions: int = option(200, "held-out 2-hop compositions (binding, swaps, the grokking probe)", min=1)
    two_hop_lm_steps: int = option(3000, "training steps of the 2-hop LM (the released code: 100 epochs)", min=1)
    two_hop_eval_every: int = option(150, "2-hop LM steps between accuracy checks and grokking-probe snapshots", min=1)
    two_hop_epochs: int = option(200, "with --steps 0, the 2-hop AlignSAE's passes over its training rows (the "
                                      "released 2-hop code: 200)", min=1)
    two_hop_swap_questions: int = option(20, "held-out 2-hop questions swapped, each to every other relation", min=1)
    # --- swaps ----------------------------------------------------------------------------
    alphas: str = option("0.1,0.5,1,2,5,10,20,50,100", "swap strengths alpha (comma-separated; the paper: 0.1 .. 1000)",
                         listed=True)
    swap_questions: int = option(100, "test-ID questions swapped, each to all 5 other relations (the paper: 200)",
                                 min=1)
    swap_methods: str = option("latent_decode,decoder_column", "how a swap edits the activation, comma-separated, each "
                                                               f"measured over the alpha grid: {', '.join(SWAP_METHODS)}",
                                                               listed=True)
    swap_error_term: bool = option(False, "latent_decode keeps the dictionary's error term (the released code: no)")
    swap_positions: str = option("last", "positions edited: last (prompt token, as released), 'last,new', all, ...",
                                 listed=True)
    # --- the default model ----------------------------------------------------------------
    default_model: bool = option(True, "also run a shipped ontology on the default model: binding accuracy and swaps on text")
    model: str = model_option(help="model for that section: 'smollm2' (embedded default), a .gguf, a local HF directory")
    ontology: str = option("question_types", "ontology: a shipped name (question_types) or a .json/.jsonl file")
    model_layers: str = option("6,12,18,24", "layers of that model to bind concepts at (comma-separated)", listed=True)
    heldout_fraction: float = option(0.3, "share of each concept's prompts held out for binding accuracy", gt=0, lt=1)
    model_n_free: int = option(256, "free latents of the default model's AlignSAE", min=1)
    model_steps: int = option(1500, "AlignSAE steps on the default model's prompts", min=1)
    model_alphas: str = option("20,50", "swap strengths shown on generated text", listed=True)
    model_swap_method: str = option("latent_decode", f"swap method shown on generated text: {', '.join(SWAP_METHODS)}",
                                    choices=SWAP_METHODS)
    model_new_tokens: int = option(12, "tokens generated per swap example", min=1)
    swap_examples: int = option(5, "swap examples shown (one per source concept, to the next concept)", min=0)
    allow_download: bool = allow_download_option()
    # --- running --------------------------------------------------------------------------
    seed: int = option(0, "seed of dictionary training and of sampled questions", min=0)
    threads: int = option(1, "torch/BLAS threads (0: leave them); 1 avoids oversubscribing small shared machines",
                          min=0)
    progress: bool = progress_option("show progress bars and log lines")

    def sized(self) -> "AlignOptions":
        return dataclasses.replace(self, **QUICK) if self.quick else self
