"""Harvest pipeline: shards written by a background thread, and harvest sharded across torchrun ranks."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from conca.activations.harvest import harvest
from conca.activations.store import ActivationStore
from conca.cli import main
from conca.errors import ConfigError
from conca.text.batching import tokenize_contexts
from conca.text.corpus import load_documents
from conftest import torchrun


def test_shards_are_written_by_a_background_thread_in_order(tiny, text_file, tmp_path, monkeypatch):
    contexts = tokenize_contexts(load_documents(str(text_file)), tiny.tokenizer, ctx_len=16, max_contexts=24)
    writers = []
    real = ActivationStore.append_shard
    monkeypatch.setattr(ActivationStore, "append_shard",
                        lambda self, *a: writers.append(threading.current_thread().name) or real(self, *a))
    store = harvest(tiny, contexts, "final", tmp_path / "s", shard_contexts=8, progress=False)
    assert len(writers) == 3 and all(name.startswith("conca-writer") for name in writers)
    assert [s.contexts for s in store.manifest.shards] == [[0, 8], [8, 16], [16, 24]]
    with pytest.raises(ConfigError, match="must be positive"):
        harvest(tiny, contexts, "final", tmp_path / "t", shard_contexts=0, progress=False)


@pytest.mark.slow  # torchrun: two gloo processes
def test_harvest_sharded_across_two_ranks_merges_into_the_single_process_store(tiny_model_dirs, text_file, tmp_path):
    args = ["harvest", "--model", str(tiny_model_dirs["llama"]), "--text", str(text_file), "--sites", "final,resid.1",
            "--tokens", "400", "--ctx-len", "16", "--shard-contexts", "4", "--split", "all", "--device", "cpu",
            "--progress", "false"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    run = torchrun(args + ["--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = ActivationStore.open(tmp_path / "one"), ActivationStore.open(tmp_path / "two")
    assert two.manifest.complete and len(two.manifest.shards) == len(one.manifest.shards) > 2
    assert [s.contexts for s in two.manifest.shards] == [s.contexts for s in one.manifest.shards]
    assert {s.file.split("/")[0] for s in two.manifest.shards} == {"rank_000", "rank_001"}
    for i in range(len(one.manifest.shards)):
        a, b = one.load_shard(i), two.load_shard(i)
        assert torch.equal(a["token_ids"], b["token_ids"])
        assert torch.equal(a["positions"], b["positions"])  # global context indices, whichever rank wrote it
        for site in ("final", "resid.1"):
            torch.testing.assert_close(b[f"act.{site}"], a[f"act.{site}"], rtol=1e-5, atol=1e-5)
    assert two.manifest.extra == one.manifest.extra  # the merged store reads like a single-process one
    assert json.loads((tmp_path / "two" / "rank_001" / "manifest.json").read_text())["extra"]["ranks"]["world_size"] == 2


def test_harvest_device_option_is_resolved_before_loading(tmp_path):
    from conca.experiments.pipeline import HarvestOptions, run_harvest

    with pytest.raises(ConfigError, match="unknown device"):
        run_harvest(HarvestOptions(out=str(tmp_path), device="abacus"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            run_harvest(HarvestOptions(out=str(tmp_path), device="cuda"))


@pytest.mark.slow  # a harvest and a training running side by side
def test_training_follows_a_store_while_it_is_being_harvested(tiny, text_file, tmp_path, monkeypatch):
    import time

    import conca.activations.harvest as harvest_mod
    import conca.activations.stream as stream_mod
    from conca.activations.stream import open_source
    from conca.dictionaries import create
    from conca.experiments.pipeline import TrainOptions, run_train
    from conca.training.trainer import TrainConfig, train

    monkeypatch.setattr(stream_mod, "FOLLOW_POLL_S", 0.02)
    contexts = tokenize_contexts(load_documents(str(text_file)), tiny.tokenizer, ctx_len=16, max_contexts=48)
    real = harvest_mod.run_to_sites
    monkeypatch.setattr(harvest_mod, "run_to_sites", lambda *a, **k: time.sleep(0.15) or real(*a, **k))
    events = []
    producer = threading.Thread(target=lambda: harvest(tiny, contexts, "final", tmp_path / "s", shard_contexts=8,
                                                       batch_size=4, progress=False) and events.append(("done", time.monotonic())))
    producer.start()
    cfg = TrainConfig(steps=12, batch_size=64, init_tokens=128, eval_tokens=128, eval_every=12, checkpoint_every=12,
                      window_chunks=1, progress=False)

    def trained(source):
        torch.manual_seed(0)
        sae = create("topk", d_in=32, n_latents=64, k=4)
        train({"a": sae}, source, cfg)
        return sae.W_enc.detach().clone()

    following = open_source(tmp_path / "s", follow=True)
    assert not following.store.manifest.complete  # the harvest is still running
    real_load = following.load_chunk
    following.load_chunk = lambda i: events.append(("read", time.monotonic())) or real_load(i)
    concurrent = trained(following)
    producer.join()
    first_read, done = min(t for e, t in events if e == "read"), next(t for e, t in events if e == "done")
    assert first_read < done - 0.5  # training consumed shards while the harvest was still writing
    # Timing does not matter: following the finished store gives the same result, and the
    # option changes the first epoch's shard order compared to a plain (shuffled) run.
    assert torch.equal(concurrent, trained(open_source(tmp_path / "s", follow=True)))
    assert not torch.equal(concurrent, trained(open_source(tmp_path / "s")))
    opts = TrainOptions(activations=str(tmp_path / "s"), out=str(tmp_path / "run"), follow=True, steps=4, batch_size=64,
                        n_latents=64, eval_every=4, checkpoint_every=4, progress=False)
    assert run_train(opts)[0].histories["dictionary"]
