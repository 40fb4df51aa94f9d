"""Named sizes for the commands that harvest and train: `--preset medium|paper`.

A preset fills in option values below a config file and the flags (defaults < preset < --config <
flags), so `conca harvest --preset medium --tokens 500000` is the medium preset with fewer tokens.
Light module (no torch): the options classes read these tables to build the parser.

- medium: >= 2M real tokens of the built-in corpora (`pydoc+docstrings`: the default corpus's
  training split and the `docstrings` corpus, each split on its own) at the final site, sized so that
  harvest plus training one TopK dictionary finish within an hour on 2 CPU cores (bf16 forward
  and bf16 storage: 2.4 GB on disk for SmolLM2's d = 576).
- paper: the concept papers' settings (SPEC.md: Pythia-70M's final hidden state, the first 200M
  tokens of the deduplicated Pile in 128-token contexts, D = 32768, k = 32, 20000 steps of batch
  10000, Adam lr 1e-4 with 200 warm-up steps). Meant for a GPU; the model and the Pile come from
  the hub, so they need --allow-download once (or a local copy passed with --model / --text).
"""

from __future__ import annotations

PRESET_NAMES = ("medium", "paper")
PRESET_HELP = ("sizes and settings: 'medium' (>= 2M tokens of pydoc+docstrings; harvest + one TopK "
               "dictionary in <= 1 h on 2 CPU cores) or 'paper' (the concept papers' settings, for a GPU); flags and "
               "--config override it")

MEDIUM_TOKENS = 2_097_152  # 2^21 requested: >= 2M stored once the EOS tokens between documents are masked out
MEDIUM_TEXT = "pydoc+docstrings"  # the default corpus's training split too: its held-out part stays unseen
PAPER_MODEL = "EleutherAI/pythia-70m"
PAPER_TEXT = "hf:EleutherAI/the_pile_deduplicated"
PAPER_TOKENS = 200_000_000

_MEDIUM_TRAIN = {"expansion": 8, "k": 32, "steps": 1536, "batch_size": 4096, "lr": 1e-3, "warmup_steps": 100}
_PAPER_TRAIN = {"n_latents": 32768, "k": 32, "steps": 20000, "batch_size": 10000, "lr": 1e-4, "warmup_steps": 200}

HARVEST = {
    "medium": {"text": MEDIUM_TEXT, "tokens": MEDIUM_TOKENS, "sites": "final", "ctx_len": 128, "dtype": "bf16",
               "forward_dtype": "auto", "batch_size": 16, "shard_contexts": 128},
    "paper": {"model": PAPER_MODEL, "text": PAPER_TEXT, "tokens": PAPER_TOKENS, "sites": "final", "ctx_len": 128,
              "dtype": "bf16", "forward_dtype": "auto", "batch_size": 256, "shard_contexts": 1024},
}
TRAIN = {
    "medium": {"method": "topk", **_MEDIUM_TRAIN, "dead_after_tokens": 1_000_000, "eval_every": 128,
               "checkpoint_every": 256},
    "paper": {"method": "topk", **_PAPER_TRAIN, "dead_after_tokens": 10_000_000, "eval_every": 1000,
              "checkpoint_every": 2000, "autocast": "bf16"},
}
DEMO = {
    "medium": {"text": MEDIUM_TEXT, "sites": "final", "train_tokens": MEDIUM_TOKENS, "eval_tokens": 16384,
               "expansion": 8, "k": 32, "steps": 1536, "batch_size": 4096, "lr": 1e-3},
    "paper": {"model": PAPER_MODEL, "text": PAPER_TEXT, "sites": "final", "train_tokens": PAPER_TOKENS,
              "eval_tokens": 65536, "expansion": 64, "k": 32, "steps": 20000, "batch_size": 10000, "lr": 1e-4},
}
SWEEP = {
    "medium": {"text": MEDIUM_TEXT, "train_tokens": MEDIUM_TOKENS, "eval_tokens": 16384, "expansion": 8,
               "steps": 1536, "batch_size": 4096, "lr": 1e-3},
    "paper": {"model": PAPER_MODEL, "text": PAPER_TEXT, "train_tokens": PAPER_TOKENS, "eval_tokens": 65536,
              "expansion": 64, "steps": 20000, "batch_size": 10000, "lr": 1e-4},
}
REPRODUCE = {
    # One pass over the 2M tokens (512 steps of 4,096), not train's three: seven methods x three seeds at
    # 1,536 steps would take ~8 h of training on 2 CPU cores; one pass is ~2.6 h and still sees every token.
    "medium": {"text": MEDIUM_TEXT, "train_tokens": MEDIUM_TOKENS, "eval_tokens": 16384, "expansion": 8,
               "steps": 512, "batch_size": 4096, "lr": 1e-3, "warmup_steps": 100, "seeds": 3,
               # Table 3's exp clamps and Fig. 2's grid are the short-run ablations: at this size they would
               # triple the run's hours, so the medium run compares the seven methods only.
               "exp_clamps": "", "ablation": False},
    "paper": {"model": PAPER_MODEL, "text": PAPER_TEXT, "train_tokens": PAPER_TOKENS, "eval_tokens": 65536,
              "n_latents": 32768, "steps": 20000, "batch_size": 10000, "lr": 1e-4, "warmup_steps": 200,
              "ablation_steps": 20000, "ablation_batch_size": 10000},
}
