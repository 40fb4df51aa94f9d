"""Model loading and capture sites on tiny random Llama, GPT-2, GPT-NeoX and Gemma 3 models (no downloads)."""

from __future__ import annotations

import pytest
import torch

from conca.errors import ConfigError, InputError
from conca.models import sites as sites_mod
from conca.models.load import load_model, resolve_model_spec
from conca.models.sites import Site, parse_sites, replace_output, run_to_sites
from conftest import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_match_hidden_states_and_modules(arch, tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs[arch]))
    ids = torch.randint(3, 300, (2, 12))
    wanted = parse_sites("final,resid.0,resid.2,mlp_out.1,attn_out.1,mlp_in.1")
    acts = run_to_sites(loaded.model, ids, wanted)
    with torch.no_grad():
        hidden = loaded.model(ids, output_hidden_states=True).hidden_states
    # HF hidden_states[L+1] is the residual stream after block L; the last one is after the final norm.
    assert torch.allclose(acts[Site("resid", 0)], hidden[1], atol=1e-5)
    assert torch.allclose(acts[Site("final")], hidden[-1], atol=1e-5)
    block = sites_mod.layer_list(loaded.model)[1]
    mlp = sites_mod._child(block, sites_mod._MLP_NAMES, "MLP")
    # Gemma 3 norms the MLP's output before adding it to the stream: mlp_out is that norm's output.
    written_by = getattr(block, "post_feedforward_layernorm", mlp)
    seen = {}
    handles = [mlp.register_forward_hook(lambda m, a, o: seen.update(inp=a[0])),
               written_by.register_forward_hook(lambda m, a, o: seen.update(out=o))]
    with torch.no_grad():
        loaded.model(ids)
    for handle in handles:
        handle.remove()
    assert torch.allclose(acts[Site("mlp_out", 1)], seen["out"], atol=1e-6)
    assert torch.allclose(acts[Site("mlp_in", 1)], seen["inp"], atol=1e-6)
    assert acts[Site("attn_out", 1)].shape == (2, 12, 32)
    assert not torch.allclose(acts[Site("attn_out", 1)], acts[Site("mlp_out", 1)])


def test_forward_stops_after_deepest_site(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs["llama"]))
    layers = sites_mod.layer_list(loaded.model)
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    run_to_sites(loaded.model, torch.randint(3, 300, (1, 8)), [Site("resid", 0)])
    for h in handles:
        h.remove()
    assert calls == [0]  # blocks 1 and 2 never ran


def test_replace_output_changes_logits_and_hook_is_removed(tiny_model_dirs):
    model = load_model(str(tiny_model_dirs["gpt2"])).model
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        clean = model(ids).logits
        with replace_output(model, Site("resid", 1), lambda x: x * 0):
            ablated = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(clean, ablated)
    assert torch.equal(clean, after)
    assert all(not layer._forward_hooks for layer in sites_mod.layer_list(model))


@pytest.mark.parametrize("bad", ["resid", "resid.x", "bogus.3", "final.2", ""])
def test_unknown_site_is_named(bad):
    with pytest.raises(ConfigError, match="site|no sites"):
        parse_sites(bad)


def test_layer_out_of_range(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs["llama"]))
    with pytest.raises(ConfigError, match="out of range.*3 layers"):
        run_to_sites(loaded.model, torch.randint(3, 300, (1, 4)), [Site("resid", 7)])


def test_unknown_model_is_named(tmp_path):
    with pytest.raises(InputError, match="unknown model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(InputError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_default_model_resolves_to_embedded_gguf():
    folder, gguf = resolve_model_spec(None)
    assert gguf.endswith(".gguf") and "SmolLM2" in gguf
    assert resolve_model_spec("smollm2") == (folder, gguf)
