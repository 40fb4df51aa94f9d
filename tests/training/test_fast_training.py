"""Trainer fast paths: bf16 autocast, read-ahead thread, fused Adam; each changes what it claims
and nothing else."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import conca.dictionaries.topk as topk_module
from conca.activations.stream import BatchStream, TensorSource, prefetch
from conca.dictionaries import create
from conca.errors import ConfigError, CorruptDataError
from conca.experiments.pipeline import TrainOptions
from conca.training.trainer import TrainConfig, _adam, train
from conftest import planted
from test_training import quick as training_quick


def quick(**kw):
    return training_quick(**{"steps": 60, "eval_every": 30, "checkpoint_every": 30, **kw})


def test_bf16_autocast_changes_the_computation_dtype_and_still_trains(monkeypatch):
    seen = []
    real = topk_module.pre_activations
    monkeypatch.setattr(topk_module, "pre_activations", lambda *a: seen.append(real(*a).dtype) or real(*a))
    results = {}
    for autocast in ("none", "bf16"):
        seen.clear()
        torch.manual_seed(0)
        sae = create("topk", d_in=16, n_latents=48, k=3)
        result = train({"a": sae}, TensorSource(planted()), quick(autocast=autocast))
        results[autocast] = (set(seen), result.histories["a"], sae)
    assert results["none"][0] == {torch.float32} and results["bf16"][0] == {torch.bfloat16}
    history = results["bf16"][1]
    assert history[-1]["fvu"] < 0.5 and history[-1]["fvu"] < history[0]["fvu"]
    assert all(p.dtype == torch.float32 for p in results["bf16"][2].parameters())  # master weights
    assert not torch.equal(results["bf16"][2].W_enc, results["none"][2].W_enc)
    with pytest.raises(ConfigError, match="unknown autocast"):
        TrainConfig(autocast="fp8")


def test_prefetch_reads_in_a_background_thread_and_gives_the_same_batches():
    source = TensorSource(planted(), chunk_rows=512)
    readers = []
    real_load = source.load_chunk
    source.load_chunk = lambda i: readers.append(threading.current_thread().name) or real_load(i)
    weights = {}
    for depth in (0, 2):
        readers.clear()
        torch.manual_seed(0)
        sae = create("topk", d_in=16, n_latents=48, k=3)
        train({"a": sae}, source, quick(steps=20, prefetch=depth))
        weights[depth] = sae.W_enc.detach().clone()
        stream_readers = set(readers[2:])  # the first reads are the init sample, on the main thread
        assert stream_readers == ({"conca-prefetch"} if depth else {threading.main_thread().name})
    assert torch.equal(weights[0], weights[2])
    with pytest.raises(ConfigError, match="prefetch"):
        TrainConfig(prefetch=-1)


def test_prefetch_hands_reader_errors_to_the_consumer_and_stops_when_closed():
    def failing():
        yield torch.zeros(1)
        raise CorruptDataError("bad shard")

    items = prefetch(failing(), depth=1)
    assert torch.equal(next(items), torch.zeros(1))
    with pytest.raises(CorruptDataError, match="bad shard"):
        next(items)
    endless = prefetch(BatchStream(TensorSource(planted(n=512)), 64).batches(), depth=2)
    next(endless)
    endless.close()  # must not hang
    assert list(prefetch(iter([1, 2, 3]))) == [1, 2, 3]


def test_closing_a_prefetch_waits_for_its_reader_and_gives_up_on_one_that_blocks(monkeypatch):
    # A reader still inside a torch op when the interpreter exits aborts the process (exit -6, seen
    # after a finished `conca train` in CI): closing waits until the item in hand is done.
    def slow():
        while True:
            time.sleep(0.3)
            yield torch.zeros(1)

    def readers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "conca-prefetch"]

    items = prefetch(slow(), depth=1)
    next(items)
    time.sleep(0.05)  # the reader is now inside slow()'s sleep, producing the next item
    items.close()
    assert not readers()
    # A reader blocked for good (a --follow source waiting for shards) is left after the timeout.
    from conca.activations import stream as stream_module

    monkeypatch.setattr(stream_module, "JOIN_TIMEOUT_S", 0.2)
    release = threading.Event()

    def blocked():
        yield torch.zeros(1)
        release.wait()
        yield torch.zeros(1)

    items = prefetch(blocked(), depth=1)
    next(items)
    started = time.perf_counter()
    items.close()
    assert time.perf_counter() - started < 5 and readers()
    release.set()


def test_fused_adam_takes_the_reference_steps():
    torch.manual_seed(0)
    a = create("topk", d_in=16, n_latents=48, k=3)
    b = create("topk", d_in=16, n_latents=48, k=3)
    b.load_state_dict(a.state_dict())
    fast = _adam(a, quick())
    reference = torch.optim.Adam(b.parameters(), lr=3e-3, foreach=False, fused=False)
    x = planted(n=256)
    for _ in range(5):
        for d, opt in ((a, fast), (b, reference)):
            opt.zero_grad()
            sum(d.loss_terms(x).values()).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_compile_option_compiles_each_loss(monkeypatch):
    compiled = []
    # Compiling for real takes a minute on CPU; agreement of the compiled loss is checked by hand
    # (see training.optim.maybe_compile). Here: the flag routes every dictionary's loss through torch.compile.
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or fn)
    dictionaries = {"a": create("topk", d_in=16, n_latents=48, k=3), "b": create("topk", d_in=16, n_latents=48, k=3)}
    train(dictionaries, TensorSource(planted()), quick(steps=2, compile=False))
    assert compiled == []
    train(dictionaries, TensorSource(planted()), quick(steps=2, compile=True))
    assert [fn.__self__ for fn in compiled] == list(dictionaries.values())


def test_cli_options_reach_the_train_config():
    cfg = TrainOptions(activations="x.npy", out="o", autocast="bf16", prefetch=0, compile=True).train_config()
    assert (cfg.autocast, cfg.prefetch, cfg.compile) == ("bf16", 0, True)
