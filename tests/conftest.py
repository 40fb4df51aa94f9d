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
    raise ValueError(arch)


ARCHS = ["llama", "gpt2", "gpt_neox"]


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
