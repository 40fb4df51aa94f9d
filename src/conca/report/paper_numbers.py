"""The papers' published numbers that `conca reproduce concepts` puts beside ours (SPEC §2.5, §3.6, §7).

All on Pythia-70M's final layer (after the final LayerNorm), D = 32,768 latents, 20,000 steps of
10,000 tokens of the deduplicated Pile, the 27 word-pair concepts of Park et al. (2023).
MSE is the squared error summed over dimensions, averaged over tokens, on Pythia-70M's scale, so
only the ordering (not the value) is comparable across models.
"""

from __future__ import annotations

# I-Predict (arXiv:2503.08980 v3) Table 2: matched Pearson (exp of latents) per concept.
IPREDICT_METHODS = ("topk", "batchtopk", "p_anneal", "structured")
IPREDICT_TABLE2: dict[str, tuple[float, float, float, float]] = {
    "3psg__ved": (0.432, 0.332, 0.680, 0.691),
    "adj__adj_plus_ly": (0.379, 0.396, 0.794, 0.833),
    "adj__comparative": (0.425, 0.334, 0.592, 0.727),
    "adj__superlative": (0.321, 0.302, 0.772, 0.746),
    "adj__un_plus_adj": (0.534, 0.472, 0.741, 0.732),
    "country__capital": (0.205, 0.165, 0.495, 0.540),
    "english__french": (0.291, 0.265, 0.666, 0.649),
    "french__german": (0.264, 0.226, 0.550, 0.607),
    "french__spanish": (0.389, 0.264, 0.560, 0.561),
    "frequent__infrequent": (0.262, 0.255, 0.472, 0.554),
    "german__spanish": (0.250, 0.251, 0.667, 0.701),
    "lower__upper": (0.204, 0.293, 0.531, 0.543),
    "male__female": (0.413, 0.312, 0.532, 0.544),
    "noun__plural": (0.357, 0.346, 0.636, 0.650),
    "pronoun__possessive": (0.725, 0.779, 0.998, 0.991),
    "small__big": (0.327, 0.225, 0.506, 0.547),
    "thing__color": (0.588, 0.574, 0.895, 0.880),
    "thing__part": (0.240, 0.207, 0.400, 0.453),
    "verb__3psg": (0.312, 0.268, 0.622, 0.617),
    "verb__v_plus_able": (0.458, 0.361, 0.763, 0.806),
    "verb__v_plus_er": (0.318, 0.363, 0.609, 0.666),
    "verb__v_plus_ment": (0.407, 0.288, 0.623, 0.674),
    "verb__v_plus_tion": (0.429, 0.357, 0.653, 0.706),
    "verb__ved": (0.371, 0.333, 0.573, 0.656),
    "verb__ving": (0.369, 0.485, 0.612, 0.728),
    "ving__3psg": (0.286, 0.233, 0.646, 0.711),
    "ving__ved": (0.304, 0.245, 0.627, 0.682),
}
IPREDICT_AVERAGE = {"topk": 0.365, "batchtopk": 0.331, "p_anneal": 0.638, "structured": 0.674}
# Coverage@0.5 as published, over 28 rows (their script appends an "average" row; SPEC §1.1).
IPREDICT_COVERAGE = {"topk": 0.107, "batchtopk": 0.071, "p_anneal": 0.893, "structured": 0.964}

# ConCA (arXiv:2601.20420 v2) Table 5, pythia-70m column: (MPC, MPC std, MSE, MSE std).
CONCA_TABLE5: dict[str, tuple[float, float, float, float]] = {
    "conca_batchnorm_softplus": (0.6500, 0.00552, 8.3305, 4.10287),
    "conca_groupnorm_softplus": (0.7285, 0.00094, 9.0071, 1.36961),
    "conca_layernorm_softplus": (0.7325, 0.00015, 7.6272, 0.40461),
    "batchtopk": (0.5687, 0.00691, 24.6165, 0.10317),
    "topk": (0.5851, 0.01090, 22.9035, 0.03389),
    "p_anneal": (0.6474, 0.00816, 7.7097, 0.08165),
}

# ConCA Table 3 (App. N): LayerNorm ConCA with g = exp and the latents clamped, vs SoftPlus.
CONCA_TABLE3: dict[str, tuple[float, float, float, float]] = {
    "exp_clamp20": (0.7029, 0.0081, 10.59, 2.10),
    "exp_clamp30": (0.7055, 0.0148, 11.18, 0.85),
    "exp_clamp40": (0.7020, 0.0077, 11.03, 0.97),
    "exp_clamp50": (0.7006, 0.0018, 10.65, 0.55),
    "conca_layernorm_softplus": (0.7324, 0.0002, 7.63, 0.40),
}

# ConCA Fig. 2 ablation (figure only): MPC 0.72-0.74 for every non-BatchNorm configuration.
CONCA_FIG2_MPC_RANGE = (0.72, 0.74)

# AlignSAE (arXiv:2512.02004; SPEC §4.5), GPT-2 124M fine-tuned on 1,000 synthetic persons, 6 relations.
# Layer L = HF hidden_states[L] (L = 0: the embeddings; L >= 1: the output of block L-1).
ALIGNSAE_ALPHAS = (0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# Swap success by layer x alpha (`results/sae_eval_swap_extended/swap_summary.csv` @ 9bf29e8; 1000 swaps each;
# decode(z') written into the input embeddings at the last prompt position).
ALIGNSAE_SWAP: dict[int, tuple[float, ...]] = {
    0: (0.0, 0.0, 0.0, 0.003, 0.016, 0.027, 0.109, 0.131, 0.122, 0.119, 0.117, 0.117),
    1: (0.0, 0.0, 0.0, 0.0, 0.01, 0.083, 0.038, 0.017, 0.039, 0.059, 0.011, 0.004),
    2: (0.0, 0.0, 0.0, 0.0, 0.272, 0.232, 0.1, 0.107, 0.092, 0.163, 0.187, 0.178),
    3: (0.0, 0.0, 0.056, 0.307, 0.449, 0.232, 0.161, 0.134, 0.134, 0.127, 0.124, 0.124),
    4: (0.0, 0.0, 0.037, 0.315, 0.632, 0.253, 0.156, 0.142, 0.14, 0.131, 0.124, 0.124),
    5: (0.031, 0.212, 0.654, 0.831, 0.482, 0.182, 0.124, 0.117, 0.116, 0.116, 0.116, 0.116),
    6: (0.033, 0.176, 0.536, 0.846, 0.632, 0.234, 0.12, 0.102, 0.094, 0.092, 0.092, 0.092),
    7: (0.004, 0.106, 0.548, 0.821, 0.492, 0.175, 0.103, 0.093, 0.093, 0.093, 0.092, 0.092),
    8: (0.038, 0.214, 0.591, 0.807, 0.492, 0.2, 0.116, 0.1, 0.097, 0.093, 0.092, 0.092),
    9: (0.0, 0.0, 0.243, 0.794, 0.608, 0.252, 0.145, 0.12, 0.105, 0.095, 0.087, 0.087),
    10: (0.021, 0.165, 0.478, 0.726, 0.37, 0.137, 0.105, 0.101, 0.1, 0.098, 0.098, 0.098),
    11: (0.0, 0.002, 0.117, 0.701, 0.595, 0.297, 0.17, 0.132, 0.121, 0.116, 0.116, 0.116),
}
ALIGNSAE_BEST_SWAP = {"swap_success": 0.846, "alpha": 2, "layer": 6}
# Per layer (n_free = 10k; `pipeline_summary.json` @ 18a6054): (train slot acc, test-OOD slot acc, diagonal acc).
ALIGNSAE_BINDING: dict[int, tuple[float, float, float]] = {
    0: (0.232, 0.165, 0.238), 1: (0.794, 0.419, 0.750), 2: (0.913, 0.650, 0.906), 3: (0.935, 0.751, 0.941),
    4: (0.981, 0.839, 0.973), 5: (1.000, 0.887, 1.000), 6: (1.000, 0.912, 1.000), 7: (1.000, 0.877, 1.000),
    8: (0.999, 0.902, 0.999), 9: (1.000, 0.897, 0.999), 10: (0.994, 0.865, 0.997), 11: (0.994, 0.908, 0.995),
}
ALIGNSAE_BASE_MODEL_ACCURACY = {"id": 1.000, "ood": 0.734}
# Unsupervised ReLU-L1 SAE (10k features): best diagonal accuracy 0.846 (layer 9); 0.338 at layer 6.
ALIGNSAE_TRADITIONAL_DIAGONAL = {"best": 0.846, "best_layer": 9, "layer6": 0.338}
# Concept fragmentation per layer 0-11 (third-party plot data; SPEC §4.5).
ALIGNSAE_FRAGMENTATION = {
    "alignsae_effective_features": (5.706, 3.239, 1.997, 2.627, 2.601, 1.571, 1.809, 1.339, 1.046, 1.053, 1.055, 1.001),
    "alignsae_top1": (0.253, 0.520, 0.753, 0.637, 0.714, 0.893, 0.844, 0.936, 0.991, 0.990, 0.990, 1.000),
    "sae_effective_features": (743.873, 600.364, 275.956, 474.001, 501.939, 589.424, 585.605, 632.580, 732.881,
                               975.815, 1497.367, 2004.418),
    "sae_top1_range": (0.006, 0.027),
}
# AlignSAE 2-hop (SPEC §4.5, §7): 40 entities x 20 relations, a 6-layer GPT-2-style LM; grokking probe: top-1
# binding of the final SAE on the LM's checkpoints reaches 1.0 from epoch 25 (of 100); swap success about 4x that
# of unsupervised SAEs (no absolute numbers published in SPEC).
ALIGNSAE_TWO_HOP = {"grokking_top1": 1.0, "grokking_from_epoch": 25, "grokking_epochs": 100,
                    "swap_ratio_over_unsupervised": 4.0, "entities": 40, "relations": 20}
