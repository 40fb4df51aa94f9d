"""Shared fixtures: a tiny offline tokenizer and tiny randomly initialised causal LMs.

Nothing here downloads: the tokenizer is trained in-process on a few sentences and the
models are built from configs with random weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.\n"
    "Concepts are recovered by unmixing representations. Sparse dictionaries find directions.\n"
    "Paris is the capital of France; Berlin is the capital of Germany; Rome is the capital of Italy.\n"
)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _tiny_config(arch: str, vocab_size: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                          bos_token_id=0, eos_token_id=1)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        # Gemma 3's text model: sandwich norms, (1 + w) RMSNorm, sqrt(d)-scaled embeddings, and a
        # sliding window shorter than the tests' sequences next to a full-attention layer.
        return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    raise ValueError(arch)


ARCHS = ["llama", "gpt2", "gpt_neox", "gemma3"]


def make_tiny_model(arch: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch, len(tokenizer)))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    """The tiny llama model directory loaded as conca loads a model (one copy per test module)."""
    from conca.models.load import load_model

    return load_model(str(tiny_model_dirs["llama"]))


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    """A fresh tiny llama (function scope: tests change its weights' dtype and tie them)."""
    return make_tiny_model("llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """Each tiny architecture saved as a local model directory (model + tokenizer)."""
    dirs = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(f"tiny_{arch}")
        make_tiny_model(arch, tiny_tokenizer).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(SAMPLE_TEXT * 20)
    return path


def planted(n=4096, d=16, n_features=24, active=3, seed=0):
    """Sparse combinations of unit directions plus an offset: a TopK SAE can recover these."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, n_features)
    idx = torch.rand(n, n_features, generator=g).argsort(1)[:, :active]
    codes.scatter_(1, idx, torch.rand(n, active, generator=g) * 3 + 1)
    return codes @ directions + 5.0


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more only contend on small shared machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`conca ARGS` under torchrun: nproc CPU processes (gloo), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "conca.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


# ---- fake atlas data (the JSON shapes of conca.atlas.cards, docs: notes on issue 16) for the site tests ----
ATLAS_WORDS = [" the", " cat", "def", " Paris", "\n", " dog", "ing", " of", " France", "(", " return", " She",
               " river", "123", " blue", ".", " king", " queen", "\t", " model"]


def fake_atlas_tokens(latent: int) -> tuple[list[str], list[str]]:
    """(fires_on, promotes) of a fake latent: fixed picks from ATLAS_WORDS, so tests can predict search results."""
    w = ATLAS_WORDS
    return [w[latent % len(w)], w[(latent * 7 + 3) % len(w)]], [w[(latent * 3 + 1) % len(w)], w[(latent * 11 + 5) % len(w)]]


def fake_atlas_card(latent: int, n_tokens: int = 1000, signed: bool = False) -> dict:
    """One card: density and max grow with the latent number (latent % 50 == 5: dead; % 50 == 7: dense)."""
    fires_on, promotes = fake_atlas_tokens(latent)
    dead, dense = latent % 50 == 5, latent % 50 == 7
    n_firing = 0 if dead else (200 if dense else 1 + latent % 40)
    top_value = 0.0 if dead else 1.0 + (latent % 97) / 10

    def example(k: int, value: float) -> dict:
        tokens = ["The", " quick", ATLAS_WORDS[(latent + k) % len(ATLAS_WORDS)], fires_on[0], " over", " the", " lazy"]
        values = [0.0, value * 0.2, value * 0.5, value, 0.0, -value * 0.3 if signed else 0.0, value * 0.1]
        return {"tokens": tokens, "values": values, "target": 3, "value": value, "context": 10 + k, "position": 3 + k}

    top = [] if dead else [example(k, round(top_value * (1 - k / 10), 4)) for k in range(5)]
    return {
        "latent": latent, "n_tokens": n_tokens, "n_firing": n_firing, "density": n_firing / n_tokens,
        "max": top_value, "mean_firing": None if dead else top_value / 2, "signed": signed,
        "flags": ["dead"] if dead else (["dense"] if dense else []),
        "sites": {"in": "resid.1", "out": None},
        "top": top, "bottom": [example(k, -1.0 - k / 10) for k in range(3)] if signed else [],
        "quantiles": [] if dead else [{"range": [top_value * g / 3, top_value * (g + 1) / 3],
                                       "examples": [example(g, round(top_value * (g + 0.5) / 3, 4))]} for g in range(3)],
        "histogram": None if dead else {"edges": [top_value * i / 10 for i in range(11)],
                                        "counts": [10 - i for i in range(10)], "note": "10 bins over 55 firing values"},
        "vocab": {"how": "exact at final", "top": [[t, 2.0 - i / 10] for i, t in enumerate(promotes)],
                  "bottom": [[" zzz", -1.5]]},
        "describe": None if latent % 2 else {"clamp_value": 10.0, "prompts": [
            {"prompt": "Once upon a time", "baseline": " there was a", "clamped": fires_on[0] * 3}]},
        "concept": {"name": "male-female", "correlation": 0.61} if latent % 10 == 3 else None,
        "stability": {"cosine": 0.9, "partner": (latent * 13) % 300, "compare": "other/topk"} if latent % 3 == 0 else None,
    }


def fake_atlas_index(n_latents: int, cards: list[dict] | None = None) -> dict:
    """The columnar index of `cards` (default: fake_atlas_card for 0 .. n_latents-1)."""
    cards = cards if cards is not None else [fake_atlas_card(i) for i in range(n_latents)]
    tokens = [fake_atlas_tokens(c["latent"]) for c in cards]
    return {
        "title": "Fake atlas", "model": "tiny-llama", "site": "resid.1", "out_site": None, "method": "topk",
        "dictionary": "runs/fake/topk", "n_latents": n_latents, "n_tokens": 1000, "signed": False,
        "source": "held-out text", "vocab_how": "exact at final", "dense_threshold": 0.1,
        "columns": {"density": [c["density"] for c in cards], "max": [c["max"] for c in cards],
                    "mean_firing": [c["mean_firing"] for c in cards],
                    "concept": [(c["concept"] or {}).get("name") for c in cards],
                    "concept_corr": [(c["concept"] or {}).get("correlation") for c in cards],
                    "stability": [(c["stability"] or {}).get("cosine") for c in cards],
                    "fires_on": [t[0] for t in tokens], "promotes": [t[1] for t in tokens],
                    "suppresses": [[" zzz"] for _ in cards], "flags": [c["flags"] for c in cards]},
        "highlights": [{"latent": 13, "why": "highest concept correlation (male-female, 0.61)"}],
    }
