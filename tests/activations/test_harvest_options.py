"""Harvest options for scale: the bf16 forward, compiled layers, the norm-outlier rule, the disk check."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conca.activations import harvest as harvest_module
from conca.activations.harvest import harvest
from conca.activations.outliers import check_ratio, exclude_outliers, outlier_mask
from conca.activations.store import ActivationStore
from conca.activations.stream import StoreSource
from conca.errors import ConfigError, InputError
from conca.models.compiled import compiled_layers, should_compile
from conca.models.sites import layer_list, parse_sites, run_to_sites
from conca.text.batching import tokenize_contexts
from conca.text.corpus import load_documents


@pytest.fixture(scope="module")
def contexts(tiny, text_file):
    return tokenize_contexts(load_documents(str(text_file)), tiny.tokenizer, ctx_len=16, max_contexts=24)


# --- the norm-outlier rule, in closed form ---------------------------------------------------------
def test_a_token_far_above_the_median_norm_is_dropped_and_the_rest_kept():
    acts = torch.ones(9, 4)  # norm 2 each
    acts[3] *= 50  # norm 100 = 50 x the median
    drop = outlier_mask({"final": acts}, 10.0)
    assert drop.tolist() == [i == 3 for i in range(9)]
    assert not outlier_mask({"final": acts}, 60.0).any()  # 50x is under a 60x limit


def test_a_token_is_dropped_when_it_is_an_outlier_at_any_site():
    a, b = torch.ones(5, 2), torch.ones(5, 2)
    a[1] *= 20
    b[4] *= 20
    positions = torch.stack([torch.arange(5), torch.arange(5) + 10], dim=1)
    kept, ids, kept_positions, n = exclude_outliers({"a": a, "b": b}, torch.arange(5), positions, 5.0)
    assert n == 2 and ids.tolist() == [0, 2, 3]
    assert kept_positions.tolist() == [[0, 10], [2, 12], [3, 13]]  # the same tokens dropped from positions
    assert kept["a"].shape == kept["b"].shape == (3, 2)


def test_ratio_zero_keeps_everything():
    acts = torch.ones(4, 2)
    acts[0] *= 1000
    kept, ids, _, n = exclude_outliers({"s": acts}, torch.arange(4), torch.zeros(4, 2), 0.0)
    assert n == 0 and ids.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [0.5, 1.0, -2])
def test_a_ratio_that_would_drop_ordinary_tokens_is_refused(bad):
    with pytest.raises(ConfigError, match="max_norm_ratio"):
        check_ratio(bad)


# --- harvest ---------------------------------------------------------------------------------------
def test_the_outlier_rule_is_recorded_and_drops_tokens(tiny, contexts, tmp_path):
    full = harvest(tiny, contexts, "resid.1", tmp_path / "all", shard_contexts=8, progress=False)
    norms = torch.cat([full.load_shard(i)["act.resid.1"] for i in range(3)]).norm(dim=-1)
    ratio = float(norms.max() / norms.median()) * 0.9  # below the largest token's ratio: drops at least one
    cut = harvest(tiny, contexts, "resid.1", tmp_path / "cut", shard_contexts=8, progress=False, max_norm_ratio=ratio)
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert manifest["extra"]["max_norm_ratio"] == pytest.approx(ratio)
    assert 0 < full.manifest.n_tokens - cut.manifest.n_tokens < full.manifest.n_tokens // 10
    assert json.loads((tmp_path / "all" / "manifest.json").read_text())["extra"]["max_norm_ratio"] == 0.0


def test_a_store_that_drops_outliers_cannot_be_followed(tiny, contexts, tmp_path):
    harvest(tiny, contexts, "final", tmp_path / "s", shard_contexts=8, progress=False, max_norm_ratio=50.0)
    with pytest.raises(InputError, match="cannot be followed"):
        StoreSource(ActivationStore.open(tmp_path / "s"), "final", follow=True)


def test_the_forward_dtype_is_recorded_and_a_resume_must_keep_it(tiny, contexts, tmp_path, monkeypatch):
    fp32 = harvest(tiny, contexts, "final", tmp_path / "a", shard_contexts=8, progress=False, forward_dtype="fp32")
    bf16 = harvest(tiny, contexts, "final", tmp_path / "b", shard_contexts=8, progress=False, forward_dtype="bf16")
    assert fp32.manifest.extra["forward_dtype"] == "fp32" and bf16.manifest.extra["forward_dtype"] == "bf16"
    x, y = fp32.load_shard(0)["act.final"], bf16.load_shard(0)["act.final"]
    assert x.shape == y.shape and not torch.equal(x, y) and torch.allclose(x, y, atol=0.1, rtol=0.05)
    with pytest.raises(ConfigError, match="forward_dtype"):
        harvest(tiny, contexts, "final", tmp_path / "a", shard_contexts=8, progress=False, forward_dtype="bf16")


def test_a_harvest_that_would_fill_the_disk_is_refused_before_any_shard(tiny, contexts, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(harvest_module.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=1000))
    with pytest.raises(ConfigError, match="GiB free"):
        harvest(tiny, contexts, "final", tmp_path / "s", shard_contexts=8, progress=False)
    assert not list((tmp_path / "s").glob("shard_*"))


# --- compiled layers -------------------------------------------------------------------------------
def test_auto_compiles_long_harvests_only():
    assert should_compile("auto", 100_000) and not should_compile("auto", 99_999)
    assert should_compile("on", 1) and not should_compile("off", 10**9)


def test_compiled_layers_give_the_eager_activations_and_are_restored(tiny, contexts, tmp_path):
    eager = harvest(tiny, contexts, "final,resid.1", tmp_path / "eager", shard_contexts=12, batch_size=5,
                    progress=False)
    compiled = harvest(tiny, contexts, "final,resid.1", tmp_path / "compiled", shard_contexts=12, batch_size=5,
                       progress=False, compile="on")  # 12 = 5 + 5 + 2: the last batch is padded
    for site in ("act.final", "act.resid.1"):
        a, b = eager.load_shard(1)[site], compiled.load_shard(1)[site]
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
    assert eager.manifest.n_tokens == compiled.manifest.n_tokens
    assert all("forward" not in layer.__dict__ for layer in layer_list(tiny.model))


def test_a_layer_holding_a_hooked_submodule_stays_eager(tiny):
    sites = parse_sites("mlp_out.1")
    with compiled_layers(tiny.model, sites) as n:
        layers = layer_list(tiny.model)
        assert n == len(layers) - 1 and "forward" not in layers[1].__dict__
        ids = torch.randint(3, 200, (2, 8))
        assert run_to_sites(tiny.model, ids, sites)[sites[0]].shape == (2, 8, 32)
