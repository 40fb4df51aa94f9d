"""The forward precision of a harvest: bf16 autocast with Linear weights converted once."""

from __future__ import annotations

import pytest
import torch

from conca.errors import ConfigError
from conca.models import precision
from conca.models.precision import cpu_has_fast_bf16, forward_precision, resolve_forward_dtype
from conca.models.sites import parse_sites, run_to_sites


def test_auto_picks_bf16_on_a_cpu_only_when_it_computes_bf16_natively(monkeypatch):
    assert resolve_forward_dtype("auto", "cpu") == ("bf16" if cpu_has_fast_bf16() else "fp32")
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert resolve_forward_dtype("auto", "cpu") == "fp32"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert resolve_forward_dtype("auto", "cpu") == "bf16"


@pytest.mark.parametrize("explicit", ["fp32", "bf16"])
def test_an_explicit_dtype_is_kept_whatever_the_device(explicit):
    assert resolve_forward_dtype(explicit, "cpu") == explicit


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ConfigError, match="forward dtype"):
        resolve_forward_dtype("fp8", "cpu")


def test_bf16_forward_equals_plain_autocast_and_differs_from_fp32(tiny_llama):
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    sites = parse_sites("final,resid.1")
    fp32 = run_to_sites(tiny_llama, ids, sites)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run_to_sites(tiny_llama, ids, sites)
    with forward_precision(tiny_llama, "bf16") as resolved:
        ours = run_to_sites(tiny_llama, ids, sites)
    assert resolved == "bf16"
    for site in sites:
        assert ours[site].dtype == torch.float32  # the residual stream and norms stay fp32
        assert torch.equal(ours[site], autocast[site])
        assert not torch.equal(ours[site], fp32[site])
        assert torch.allclose(ours[site], fp32[site], atol=0.1, rtol=0.05)


def test_the_fp32_weights_come_back_after_the_block_even_on_error(tiny_llama):
    before = {name: p for name, p in tiny_llama.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with forward_precision(tiny_llama, "bf16"):
            assert any(p.dtype == torch.bfloat16 for p in tiny_llama.parameters())
            raise RuntimeError("boom")
    after = dict(tiny_llama.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] and after[name].dtype == torch.float32 for name in before)
    assert not torch.is_autocast_enabled("cpu")


def test_a_tied_lm_head_keeps_the_embedding_in_fp32(tiny_llama):
    tiny_llama.tie_weights()
    head = tiny_llama.get_output_embeddings()
    tied = head.weight is tiny_llama.get_input_embeddings().weight
    with forward_precision(tiny_llama, "bf16"):
        assert tiny_llama.get_input_embeddings().weight.dtype == torch.float32
        if tied:
            assert head.weight.dtype == torch.float32


def test_fp32_changes_nothing(tiny_llama):
    weights = [p for p in tiny_llama.parameters()]
    with forward_precision(tiny_llama, "fp32") as resolved:
        assert resolved == "fp32"
        assert [p for p in tiny_llama.parameters()] == weights
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_forward_on_cuda_matches_fp32_closely_and_restores_the_weights(tiny_llama):
    model = tiny_llama.to("cuda")
    ids = torch.randint(3, 300, (2, 12), device="cuda")
    sites = parse_sites("final")
    fp32 = run_to_sites(model, ids, sites)[sites[0]]
    with forward_precision(model, "auto") as resolved:
        ours = run_to_sites(model, ids, sites)[sites[0]]
    assert resolved == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert ours.dtype == torch.float32 and torch.allclose(ours, fp32, atol=0.1, rtol=0.05)
    assert all(p.dtype == torch.float32 for p in model.parameters())
