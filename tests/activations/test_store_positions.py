"""Store format 2: every stored token carries [context, position]; format-1 stores still read, and
`conca store upgrade` gives them positions from the recorded text, or refuses and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from conca.activations import upgrade as upgrade_module
from conca.activations.harvest import harvest
from conca.activations.store import MANIFEST, ActivationStore, Manifest, context_positions
from conca.activations.stream import BatchStream, open_source
from conca.activations.upgrade import upgrade_store
from conca.cli import main
from conca.errors import ConfigError, InputError
from conca.experiments.pipeline import HarvestOptions, run_harvest
from conca.fileio import bytes_sha256
from conca.runtime import distributed
from conca.text.splits import contexts_for
from conftest import SAMPLE_TEXT

CTX_LEN, TOKENS, SHARD_CONTEXTS = 16, 300, 8


def harvest_options(out: Path, text: Path, **kwargs) -> HarvestOptions:
    return HarvestOptions(out=str(out), text=str(text), sites="final,resid.1", tokens=TOKENS, ctx_len=CTX_LEN,
                          shard_contexts=SHARD_CONTEXTS, device="cpu", progress=False, **kwargs)


def recorded_contexts(text: Path, tokenizer):
    """The contexts run_harvest reads for harvest_options (its split: train)."""
    return contexts_for(tokenizer, str(text), "train", TOKENS, CTX_LEN)


def assert_positions_rebuild_contexts(store: ActivationStore, contexts) -> None:
    """Every stored token is the token at its recorded [context, position], each at most once, inside
    its shard's contexts."""
    seen = set()
    for i, info in enumerate(store.manifest.shards):
        ids, positions = store.read_tokens(i)
        c, p = positions[:, 0].long(), positions[:, 1].long()
        assert torch.equal(contexts.ids[c, p], ids)
        assert bool(contexts.mask[c, p].all())  # never a BOS or other special token
        assert bool(((c >= info.contexts[0]) & (c < info.contexts[1])).all())
        seen |= set(map(tuple, positions.tolist()))
    assert len(seen) == store.n_tokens


def outlier_ratio(store: ActivationStore) -> float:
    """A max_norm_ratio that drops at least the token of largest norm at resid.1 (and few others)."""
    norms = torch.cat([store.load_shard(i, "resid.1")["act"] for i in range(len(store.manifest.shards))]).norm(dim=-1)
    return float(norms.max() / norms.median()) * 0.9


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def downgrade_to_format_1(path: Path) -> None:
    """Rewrite a store as conca wrote it before positions (format 1): shards without "positions",
    manifests (the top one and any rank_RRR/ ones) with format_version 1 and the new checksums."""
    rewritten: dict[Path, bytes] = {}
    for manifest_file in [path / MANIFEST, *sorted(path.glob(f"rank_*/{MANIFEST}"))]:
        manifest = json.loads(manifest_file.read_text())
        for shard in manifest["shards"]:
            file = manifest_file.parent / shard["file"]
            if file not in rewritten:
                tensors = st_load(file.read_bytes())
                del tensors["positions"]
                start, stop = shard["contexts"]
                rewritten[file] = st_save(tensors, metadata={"contexts": f"{start}:{stop}"})
                file.write_bytes(rewritten[file])
            shard["sha256"], shard["size"] = bytes_sha256(rewritten[file]), len(rewritten[file])
        manifest["format_version"] = 1
        manifest_file.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A .txt of many documents (blank-line separated), so that the train / held-out split has both."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(f"Document {i}. {SAMPLE_TEXT}" for i in range(20)))
    return path


@pytest.fixture(scope="module")
def fresh(tiny, corpus, tmp_path_factory) -> ActivationStore:
    """A store harvested by this conca (format 2), through run_harvest so that it records its text."""
    return run_harvest(harvest_options(tmp_path_factory.mktemp("fresh") / "s", corpus), tiny)


@pytest.fixture()
def old_store(fresh, tmp_path) -> Path:
    """The same store as an older conca wrote it (format 1, no positions)."""
    path = tmp_path / "old"
    path.mkdir()
    for name, data in files_of(fresh.path).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    downgrade_to_format_1(path)
    return path


# --- writing positions -----------------------------------------------------------------------------
def test_harvest_writes_positions_that_rebuild_every_context(fresh, tiny, corpus):
    contexts = recorded_contexts(corpus, tiny.tokenizer)
    assert fresh.has_positions and fresh.manifest.format_version == 2
    assert len(fresh.manifest.shards) > 2 and fresh.n_tokens == contexts.n_tokens
    assert_positions_rebuild_contexts(fresh, contexts)
    # in the stored order: context by context, position by position, every masked-in token
    positions = torch.cat([fresh.read_tokens(i)[1] for i in range(len(fresh.manifest.shards))])
    assert torch.equal(positions, context_positions(contexts.mask, 0))


def test_read_tokens_returns_the_shards_token_ids_and_positions(fresh):
    ids, positions = fresh.read_tokens(1)
    shard = fresh.load_shard(1, "final")
    assert ids.dtype == torch.int64 and positions.dtype == torch.int32
    assert ids.shape == (fresh.manifest.shards[1].n_tokens,) and positions.shape == (len(ids), 2)
    assert torch.equal(ids, shard["token_ids"]) and torch.equal(positions, shard["positions"])
    assert int(positions[0, 0]) == fresh.manifest.shards[1].contexts[0] == SHARD_CONTEXTS  # global, not per shard


def test_outlier_exclusion_drops_the_same_tokens_from_positions(tiny, corpus, fresh, tmp_path):
    cut = run_harvest(harvest_options(tmp_path / "cut", corpus, max_norm_ratio=outlier_ratio(fresh)), tiny)
    assert 0 < fresh.n_tokens - cut.n_tokens
    assert_positions_rebuild_contexts(cut, recorded_contexts(corpus, tiny.tokenizer))
    # each kept token's activation is the one the full store holds at the same [context, position]
    full = {tuple(p): fresh.load_shard(i, "resid.1")["act"][j] for i in range(len(fresh.manifest.shards))
            for j, p in enumerate(fresh.read_tokens(i)[1].tolist())}
    for i in range(len(cut.manifest.shards)):
        shard = cut.load_shard(i, "resid.1")
        for act, p in zip(shard["act"], shard["positions"].tolist()):
            assert torch.equal(act, full[tuple(p)])


def test_ranks_of_a_sharded_harvest_record_global_context_indices(tiny, corpus, fresh, tmp_path, monkeypatch):
    # The torchrun path without torchrun: each rank's harvest in turn (rank 0 last: it merges).
    contexts = recorded_contexts(corpus, tiny.tokenizer)
    merged = harvest_as_two_ranks(tiny, contexts, tmp_path / "two", fresh.manifest.extra, monkeypatch)
    assert {s.file.split("/")[0] for s in merged.manifest.shards} == {"rank_000", "rank_001"}
    for i in range(len(fresh.manifest.shards)):
        assert torch.equal(merged.read_tokens(i)[1], fresh.read_tokens(i)[1])
    assert_positions_rebuild_contexts(merged, contexts)


def harvest_as_two_ranks(tiny, contexts, out: Path, extra: dict, monkeypatch) -> ActivationStore:
    """The torchrun path of harvest without torchrun: rank 1's harvest, then rank 0's, which merges."""
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    for rank in (1, 0):
        context = distributed.DistributedContext(rank, 2, rank, torch.device("cpu"))
        monkeypatch.setattr(distributed, "init_from_env", lambda device=None, context=context: context)
        try:
            merged = harvest(tiny, contexts, "final,resid.1", out, shard_contexts=SHARD_CONTEXTS, extra=dict(extra),
                             progress=False)
        except InputError:
            assert rank == 1  # its last step opens the merged store, which rank 0 has not written yet
    return merged


def test_append_shard_needs_positions_of_one_row_per_token(tmp_path):
    store = ActivationStore.create_or_resume(tmp_path / "s", Manifest(model="m", sites=["final"], d_model=4,
                                                                      dtype="fp32", ctx_len=3, n_contexts_planned=1))
    with pytest.raises(ValueError, match="needs token positions"):
        store.append_shard({"final": torch.ones(2, 4)}, torch.tensor([5, 6]), (0, 1))
    with pytest.raises(InputError, match=r"expected \(2, 2\)"):
        store.append_shard({"final": torch.ones(2, 4)}, torch.tensor([5, 6]), (0, 1), torch.zeros(3, 2))
    store.append_shard({"final": torch.ones(2, 4)}, torch.tensor([5, 6]), (0, 1),
                       context_positions(torch.tensor([[False, True, True]]), 0))
    assert store.read_tokens(0)[1].tolist() == [[0, 1], [0, 2]]


# --- format 1 --------------------------------------------------------------------------------------
def test_a_format_1_store_streams_for_training_as_before(old_store, fresh):
    old = ActivationStore.open(old_store)
    assert not old.has_positions and old.manifest.format_version == 1
    old.verify()
    source, same = open_source(str(old_store), site="final"), open_source(str(fresh.path), site="final")
    for i in range(len(source.chunk_sizes)):
        assert torch.equal(source.load_chunk(i), same.load_chunk(i))
    batch = next(BatchStream(source, batch_size=32).batches())
    assert batch.shape == (32, 32) and torch.isfinite(batch).all()
    assert "positions" not in old.load_shard(0, "final")


def test_a_format_1_store_is_refused_where_positions_are_needed(old_store, tiny, corpus):
    old = ActivationStore.open(old_store)
    expected = (f"store {old_store} has no token positions (written by an older conca, format 1): re-harvest it, "
                f"or run `conca store upgrade --store {old_store}`")
    with pytest.raises(InputError) as refused:
        old.require_positions("conca inspect")
    assert str(refused.value).startswith(expected) and "conca inspect" in str(refused.value)
    with pytest.raises(InputError, match="no token positions"):
        old.read_tokens(0)
    # a harvest does not mix shards of both formats in one store
    with pytest.raises(ConfigError, match="conca store upgrade"):
        run_harvest(harvest_options(old_store, corpus), tiny)


def test_a_store_of_a_newer_format_is_refused(fresh, tmp_path):
    manifest = json.loads((fresh.path / MANIFEST).read_text())
    manifest["format_version"] = 3
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="written by a newer conca .*upgrade conca"):
        ActivationStore.open(tmp_path)


def test_a_manifest_without_a_format_version_is_format_1(fresh):
    manifest = json.loads((fresh.path / MANIFEST).read_text())
    del manifest["format_version"]
    assert Manifest.from_json(manifest).format_version == 1


# --- upgrade ---------------------------------------------------------------------------------------
def test_upgrade_writes_the_positions_a_fresh_harvest_writes(old_store, fresh):
    store = upgrade_store(old_store)
    assert store.has_positions and ActivationStore.open(old_store).manifest.format_version == 2
    store.verify()
    for i in range(len(fresh.manifest.shards)):
        a, b = store.load_shard(i), fresh.load_shard(i)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # only the listed (new) shard files remain
    assert set(files_of(old_store)) - {MANIFEST, "config.yaml"} == {s.file for s in store.manifest.shards}
    before = files_of(old_store)
    assert upgrade_store(old_store).has_positions and files_of(old_store) == before  # again: nothing changes


def test_an_upgrade_cut_short_leaves_the_old_store_and_can_be_run_again(old_store, fresh, monkeypatch):
    before = files_of(old_store)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(upgrade_module, "atomic_write_json", killed)  # dies just before the manifest switches
    with pytest.raises(KeyboardInterrupt):
        upgrade_store(old_store)
    assert files_of(old_store) == before
    ActivationStore.open(old_store).verify()
    monkeypatch.undo()
    assert upgrade_store(old_store).has_positions


def test_upgrade_of_a_store_merged_from_ranks_updates_each_rank(tiny, corpus, fresh, tmp_path, monkeypatch):
    contexts = recorded_contexts(corpus, tiny.tokenizer)
    harvest_as_two_ranks(tiny, contexts, tmp_path / "two", fresh.manifest.extra, monkeypatch)
    downgrade_to_format_1(tmp_path / "two")
    store = upgrade_store(tmp_path / "two", tokenizer=tiny.tokenizer)
    assert_positions_rebuild_contexts(store, contexts)
    for rank in ("rank_000", "rank_001"):
        sub = ActivationStore.open(tmp_path / "two" / rank)
        assert sub.has_positions and all(s.file.endswith(".v2.safetensors") for s in sub.manifest.shards)
        sub.verify()
        assert sorted(p.name for p in (tmp_path / "two" / rank).glob("*.safetensors")) == \
            sorted(s.file for s in sub.manifest.shards)


def test_upgrade_refuses_a_store_whose_outlier_tokens_were_dropped(tiny, corpus, fresh, tmp_path):
    run_harvest(harvest_options(tmp_path / "cut", corpus, max_norm_ratio=outlier_ratio(fresh)), tiny)
    downgrade_to_format_1(tmp_path / "cut")
    before = files_of(tmp_path / "cut")
    with pytest.raises(InputError, match="do not match the recorded text .*max_norm_ratio.*re-harvest"):
        upgrade_store(tmp_path / "cut")
    assert files_of(tmp_path / "cut") == before


def test_upgrade_refuses_a_store_whose_text_has_changed(tiny, corpus, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(corpus.read_text())
    run_harvest(harvest_options(tmp_path / "s", text), tiny)
    downgrade_to_format_1(tmp_path / "s")
    text.write_text(corpus.read_text().replace("fox", "cat"))  # same length in tokens, other tokens
    before = files_of(tmp_path / "s")
    with pytest.raises(InputError, match="do not match the recorded text .*re-harvest"):
        upgrade_store(tmp_path / "s")
    assert files_of(tmp_path / "s") == before


def test_upgrade_refuses_when_the_disk_is_too_small(old_store, monkeypatch):
    real = upgrade_module.shutil.disk_usage
    monkeypatch.setattr(upgrade_module.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    before = files_of(old_store)
    with pytest.raises(ConfigError, match="GiB is free"):
        upgrade_store(old_store)
    assert files_of(old_store) == before


# --- the command -----------------------------------------------------------------------------------
def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("conca store upgrade: error: "), lines
    return lines[0]


def test_store_upgrade_command_reports_what_it_did(old_store, capsys):
    assert main(["store", "upgrade", "--store", str(old_store)]) == 0
    store = ActivationStore.open(old_store)
    assert capsys.readouterr().out.strip() == (f"upgraded {old_store}: {len(store.manifest.shards)} shards, "
                                               f"{store.n_tokens} tokens now carry positions")
    before = files_of(old_store)
    assert main(["store", "upgrade", "--store", str(old_store)]) == 0  # already done: a note, nothing changed
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("conca store upgrade: note: ") and "already" in captured.err
    assert files_of(old_store) == before


def test_store_upgrade_command_refuses_bad_input_in_one_line(old_store, tmp_path, capsys):
    assert "not an activation store" in one_error_line(capsys, ["store", "upgrade", "--store", str(tmp_path)])
    assert "not found" in one_error_line(capsys, ["store", "upgrade", "--store", str(tmp_path / "missing")])
    assert "needs --store" in one_error_line(capsys, ["store", "upgrade"])
    assert "GGUF file not found" in one_error_line(capsys, ["store", "upgrade", "--store", str(old_store),
                                                            "--model", str(tmp_path / "no.gguf")])
    manifest = json.loads((old_store / MANIFEST).read_text())
    manifest["extra"]["text"] = str(tmp_path / "gone.txt")  # the recorded text is no longer there
    (old_store / MANIFEST).write_text(json.dumps(manifest))
    before = files_of(old_store)
    assert "gone.txt" in one_error_line(capsys, ["store", "upgrade", "--store", str(old_store)])
    assert files_of(old_store) == before
