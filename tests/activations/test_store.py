"""Activation store: atomic shards, checksums, resume, and streaming without a full load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conca.activations.harvest import harvest
from conca.activations.store import ActivationStore
from conca.activations.stream import BatchStream, NpySource, TensorSource, open_source, read_rows
from conca.errors import ConfigError, CorruptDataError, InputError, ShapeError
from conca.text.batching import tokenize_contexts
from conca.text.corpus import load_documents


@pytest.fixture(scope="module")
def contexts(tiny, text_file):
    return tokenize_contexts(load_documents(str(text_file)), tiny.tokenizer, ctx_len=16, max_contexts=40)


def test_harvest_writes_checksummed_shards_with_token_ids(tiny, contexts, tmp_path):
    store = harvest(tiny, contexts, "final,resid.1", tmp_path / "s", shard_contexts=16, progress=False)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["sites"] == ["final", "resid.1"]
    assert [s["contexts"] for s in manifest["shards"]] == [[0, 16], [16, 32], [32, 40]]
    assert manifest["n_tokens"] == contexts.n_tokens  # BOS positions excluded
    shard = store.load_shard(0)
    assert shard["act.final"].shape == (int(contexts.mask[:16].sum()), 32)
    assert torch.equal(shard["token_ids"], contexts.ids[:16][contexts.mask[:16]])
    assert not (shard["token_ids"] == tiny.tokenizer.bos_token_id).any()


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_store_dtype(tiny, contexts, tmp_path, dtype, torch_dtype):
    store = harvest(tiny, contexts.subset(0, 4), "final", tmp_path / dtype, dtype=dtype, progress=False)
    assert store.load_shard(0)["act.final"].dtype == torch_dtype


def test_interrupted_harvest_resumes_without_redoing_work(tiny, contexts, tmp_path, monkeypatch):
    full = harvest(tiny, contexts, "final", tmp_path / "full", shard_contexts=8, progress=False)
    import conca.activations.harvest as harvest_mod

    calls = {"n": 0}
    real = harvest_mod.run_to_sites

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # die inside the second shard
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(harvest_mod, "run_to_sites", dying)
    with pytest.raises(KeyboardInterrupt):
        harvest(tiny, contexts, "final", tmp_path / "cut", shard_contexts=8, batch_size=4, progress=False)
    partial = ActivationStore.open(tmp_path / "cut")
    assert len(partial.manifest.shards) == 1 and not partial.manifest.complete
    assert not list((tmp_path / "cut").glob("*.tmp"))
    calls["n"] = -1000  # no more failures
    counted = []
    monkeypatch.setattr(harvest_mod, "run_to_sites", lambda *a, **k: counted.append(1) or real(*a, **k))
    resumed = harvest(tiny, contexts, "final", tmp_path / "cut", shard_contexts=8, batch_size=4, progress=False)
    assert len(counted) == (40 - 8) // 4  # only the missing contexts were run
    assert resumed.manifest.complete and resumed.n_tokens == full.n_tokens
    for i in range(len(full.manifest.shards)):
        assert torch.equal(resumed.load_shard(i)["act.final"], full.load_shard(i)["act.final"])


def test_resume_refuses_a_different_configuration(tiny, contexts, tmp_path):
    harvest(tiny, contexts.subset(0, 4), "final", tmp_path / "s", progress=False)
    with pytest.raises(ConfigError, match="sites"):
        harvest(tiny, contexts.subset(0, 4), "resid.0", tmp_path / "s", progress=False)


def test_corrupted_shard_is_detected_by_checksum(tiny, contexts, tmp_path):
    store = harvest(tiny, contexts.subset(0, 8), "final", tmp_path / "s", progress=False)
    shard = tmp_path / "s" / store.manifest.shards[0].file
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="shard_00000.safetensors is corrupt"):
        list(zip(range(2), BatchStream(open_source(tmp_path / "s"), 8).batches()))


def test_missing_store_and_unknown_site(tmp_path, tiny, contexts):
    with pytest.raises(InputError, match="not found"):
        open_source(tmp_path / "nowhere")
    harvest(tiny, contexts.subset(0, 4), "final,resid.0", tmp_path / "s", progress=False)
    with pytest.raises(ConfigError, match="choose one with --site"):
        open_source(tmp_path / "s")
    with pytest.raises(ConfigError, match="'resid.2' is not in store"):
        open_source(tmp_path / "s", site="resid.2")


def test_npy_source_wrong_width_nan_and_shape(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((100, 8), dtype=np.float32))
    with pytest.raises(ShapeError, match="width 8, but 16 is expected"):
        open_source(tmp_path / "x.npy", expected_dim=16)
    bad = np.ones((10, 4), dtype=np.float32)
    bad[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(CorruptDataError, match="NaN"):
        read_rows(open_source(tmp_path / "nan.npy"), 10)
    np.save(tmp_path / "flat.npy", np.ones(10, dtype=np.float32))
    with pytest.raises(ShapeError, match="2-D"):
        open_source(tmp_path / "flat.npy")


def test_stream_is_a_shuffled_permutation_and_resumes_by_arithmetic():
    x = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 3)
    source = TensorSource(x, chunk_rows=100)
    stream = BatchStream(source, batch_size=50, seed=1, window_chunks=3)
    epoch = torch.cat([b for _, b in zip(range(20), stream.batches())])
    assert sorted(epoch[:, 0].tolist()) == list(range(1000))  # each row once per epoch
    assert epoch[:, 0].tolist() != list(range(1000))  # but shuffled
    from_start = [b for _, b in zip(range(30), stream.batches())]
    loaded = []
    source.load_chunk = lambda i, real=source.load_chunk: loaded.append(i) or real(i)
    resumed = [b for _, b in zip(range(5), stream.batches(start_step=25))]
    assert all(torch.equal(a, b) for a, b in zip(from_start[25:], resumed))
    assert len(loaded) <= 6  # skipped windows were not read


def test_stream_memory_is_bounded_by_window(tmp_path):
    np.save(tmp_path / "big.npy", np.random.rand(5000, 4).astype(np.float32))
    source = NpySource(tmp_path / "big.npy", chunk_rows=500)
    sizes = []
    source.load_chunk = lambda i, real=source.load_chunk: sizes.append(i) or real(i)
    batches = BatchStream(source, 100, window_chunks=2).batches()
    for _ in range(10):  # exactly one window: 2 chunks x 500 rows / 100
        next(batches)
    assert len(sizes) == 2  # only that window's chunks were read, not the whole file
    next(batches)
    assert len(sizes) == 4


def _harvest_three_shards(tiny, contexts, out):
    return harvest(tiny, contexts.subset(0, 24), "final", out, shard_contexts=8, progress=False)


@pytest.mark.parametrize("damage", ["delete", "flip_byte", "truncate"])
def test_rerunning_harvest_repairs_a_damaged_shard(tiny, contexts, tmp_path, damage, monkeypatch, capsys):
    reference = _harvest_three_shards(tiny, contexts, tmp_path / "ref")
    store = _harvest_three_shards(tiny, contexts, tmp_path / "s")
    shard = tmp_path / "s" / store.manifest.shards[1].file
    if damage == "delete":
        shard.unlink()
    elif damage == "flip_byte":
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    assert list(ActivationStore.open(tmp_path / "s").damaged_shards()) == [1]
    import conca.activations.harvest as harvest_mod

    counted = []
    real = harvest_mod.run_to_sites
    monkeypatch.setattr(harvest_mod, "run_to_sites", lambda *a, **k: counted.append(1) or real(*a, **k))
    repaired = _harvest_three_shards(tiny, contexts, tmp_path / "s")
    assert len(counted) == 1  # only the damaged shard's 8 contexts were run again (batch size 8)
    assert "repairing 1 damaged shard" in capsys.readouterr().err
    assert repaired.manifest.complete and repaired.damaged_shards() == {}
    assert repaired.n_tokens == reference.n_tokens
    for i in range(3):
        assert torch.equal(repaired.load_shard(i)["act.final"], reference.load_shard(i)["act.final"])


def test_shard_size_is_recorded_and_checked(tiny, contexts, tmp_path):
    store = harvest(tiny, contexts.subset(0, 8), "final", tmp_path / "s", progress=False)
    info = store.manifest.shards[0]
    assert info.size == (tmp_path / "s" / info.file).stat().st_size
    with open(tmp_path / "s" / info.file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CorruptDataError, match="bytes, the manifest records"):
        ActivationStore.open(tmp_path / "s").load_shard(0)


def _edit_manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest = edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_token_count_must_match_the_shard(tiny, contexts, tmp_path):
    harvest(tiny, contexts.subset(0, 8), "final", tmp_path / "s", progress=False)

    def one_more_token(m):
        m["shards"][0]["n_tokens"] += 1
        return m

    _edit_manifest(tmp_path / "s", one_more_token)
    with pytest.raises(CorruptDataError, match="token_ids has shape"):
        ActivationStore.open(tmp_path / "s").load_shard(0)


@pytest.mark.parametrize("file", ["../outside.safetensors", "/etc/passwd", "sub/shard.safetensors", "..", "",
                                  "rank_000/../../x"])
def test_manifest_shard_file_must_stay_inside_the_store(tiny, contexts, tmp_path, file):
    harvest(tiny, contexts.subset(0, 8), "final", tmp_path / "s", progress=False)

    def point_elsewhere(m):
        m["shards"][0]["file"] = file
        return m

    _edit_manifest(tmp_path / "s", point_elsewhere)
    with pytest.raises(CorruptDataError, match="not a plain file name"):
        ActivationStore.open(tmp_path / "s")


@pytest.mark.parametrize("content,message", [
    ('"just a string"', "holds a JSON str, not an object"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"model": "m"}', "field 'sites' is missing"),
    (None, "field 'd_model' is 'wide'"),
    (None, "field 'shards\\[0\\].sha256'"),
    (None, "unknown field 'colour'"),
    (None, "shards\\[0\\] is a JSON int"),
])
def test_malformed_manifest_is_corrupt_data_naming_the_file(tiny, contexts, tmp_path, content, message):
    harvest(tiny, contexts.subset(0, 8), "final", tmp_path / "s", progress=False)
    if content is not None:
        (tmp_path / "s" / "manifest.json").write_text(content)
    else:
        def edit(m):
            if "d_model" in message:
                m["d_model"] = "wide"
            elif "sha256" in message:
                m["shards"][0]["sha256"] = 12
            elif "colour" in message:
                m["colour"] = "blue"
            else:
                m["shards"][0] = 7
            return m

        _edit_manifest(tmp_path / "s", edit)
    with pytest.raises(CorruptDataError, match=message) as info:
        ActivationStore.open(tmp_path / "s")
    assert "manifest.json" in str(info.value)


def test_rank_sub_store_shard_names_are_accepted(tiny, contexts, tmp_path):
    """A store merged from torchrun ranks lists `rank_RRR/NAME`: that stays inside the store."""
    harvest(tiny, contexts.subset(0, 8), "final", tmp_path / "s", progress=False)
    (tmp_path / "s" / "rank_000").mkdir()
    (tmp_path / "s" / "shard_00000.safetensors").rename(tmp_path / "s" / "rank_000" / "shard_00000.safetensors")

    def into_rank_folder(m):
        m["shards"][0]["file"] = "rank_000/shard_00000.safetensors"
        return m

    _edit_manifest(tmp_path / "s", into_rank_folder)
    assert ActivationStore.open(tmp_path / "s").load_shard(0)["act.final"].shape[1] == 32
