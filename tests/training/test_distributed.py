"""Data-parallel training under torchrun (2 CPU processes, gloo) matches one process on the same data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conca.activations.stream import TensorSource
from conca.cli import main
from conca.dictionaries import create, load_dictionary
from conca.errors import ConfigError
from conca.runtime import distributed
from conca.training.trainer import TrainConfig, train
from conftest import planted, torchrun


@pytest.mark.slow  # torchrun: two gloo processes
def test_two_gloo_ranks_train_like_one_process(tmp_path):
    np.save(tmp_path / "x.npy", planted(n=2048, d=16).numpy())
    # A short dead-latent horizon so that AuxK is active: its dead set and its variance
    # normaliser must be those of the global batch on both ranks.
    args = ["train", "--activations", str(tmp_path / "x.npy"), "--n-latents", "64", "--k", "3", "--steps", "40",
            "--batch-size", "256", "--lr", "3e-3", "--warmup-steps", "5", "--eval-every", "20",
            "--checkpoint-every", "20", "--dead-after-tokens", "256", "--progress", "false", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    run = torchrun(args + ["--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = load_dictionary(tmp_path / "one" / "dictionary"), load_dictionary(tmp_path / "two" / "dictionary")
    # Each rank sums its half of the batch and the halves are averaged: the same gradient as one
    # process up to float32 summation order. Observed differences are ~2e-7 after 40 steps; the
    # tolerance leaves room for other BLAS builds, while one flipped TopK selection would move
    # weights by ~1e-2.
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(two, name), getattr(one, name), rtol=1e-4, atol=1e-5, msg=name)
    history_one = json.loads((tmp_path / "one" / "metrics.json").read_text())["history"]
    history_two = json.loads((tmp_path / "two" / "metrics.json").read_text())["history"]
    assert any("auxk" in h for h in history_one), "the test should exercise AuxK"
    for a, b in zip(history_one, history_two):
        assert a.keys() == b.keys()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-3)
    assert (tmp_path / "two" / "checkpoint.json").exists()


def test_batch_must_split_evenly_across_ranks(monkeypatch):
    context = distributed.DistributedContext(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(distributed, "init_from_env", lambda device=None: context)
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        train({"a": create("topk", d_in=16, n_latents=32, k=2)}, TensorSource(planted(n=1024)),
              TrainConfig(steps=2, batch_size=256, progress=False))


def test_reductions_are_identities_outside_data_parallel():
    fired = torch.tensor([True, False])
    assert distributed.global_firing(fired, 7) == (fired, 7)
    assert distributed.share_weight() == 1
    rows = torch.randn(10, 3)
    torch.testing.assert_close(distributed.global_centred_sum_sq(rows), (rows - rows.mean(0)).pow(2).sum())
    assert distributed.init_from_env() is None  # not launched by torchrun


def _resync_worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    sae = create("relu_l1", d_in=8, n_latents=16)
    opt = torch.optim.Adam(sae.parameters())
    sum(sae.loss_terms(torch.randn(32, 8)).values()).backward()
    opt.step()
    assert not distributed.resync_if_diverged(sae, opt)  # identical ranks: nothing to do
    if rank == 1:  # as if this rank had resampled latents from its own share of the batch
        with torch.no_grad():
            sae.W_enc[:, :3] = 7.0
        opt.state[sae.W_enc]["exp_avg"].zero_()
    assert distributed.resync_if_diverged(sae, opt)
    torch.save({"W_enc": sae.W_enc.detach(), "exp_avg": opt.state[sae.W_enc]["exp_avg"]}, f"{out_file}.{rank}")
    # Both ranks done before either tears gloo down: a rank that destroys its group while the peer still
    # talks to it can abort the peer ("terminate called without an active exception", seen 1 run in 4).
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # torchrun: two gloo processes
def test_a_rank_that_diverged_gets_rank_zeros_weights_and_optimiser_state(tmp_path):
    torch.multiprocessing.spawn(_resync_worker, args=(str(tmp_path / "init"), str(tmp_path / "state")), nprocs=2)
    zero, one = torch.load(tmp_path / "state.0"), torch.load(tmp_path / "state.1")
    assert torch.equal(zero["W_enc"], one["W_enc"]) and torch.equal(zero["exp_avg"], one["exp_avg"])
    assert not (one["W_enc"][:, :3] == 7.0).all()


def test_shutdown_waits_for_the_peers_only_after_a_finished_command(monkeypatch):
    # A rank that tears gloo down while its peer still talks to it can abort the peer (seen in CI);
    # after an error the peer may never reach a barrier, so it must not be waited for.
    calls = []
    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.shutdown()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    distributed.shutdown(wait_for_peers=False)
    assert calls == ["destroy"]


def test_the_cli_waits_for_its_peers_after_a_finished_command_and_not_after_an_error(monkeypatch, capsys, tmp_path):
    waited = []
    monkeypatch.setattr(distributed, "shutdown", lambda wait_for_peers=True: waited.append(wait_for_peers))
    np.save(tmp_path / "x.npy", planted(n=256, d=8).numpy())
    assert main(["train", "--activations", str(tmp_path / "x.npy"), "--out", str(tmp_path / "ok"), "--n-latents", "16",
                 "--k", "2", "--steps", "2", "--batch-size", "64", "--progress", "false", "--device", "cpu"]) == 0
    assert main(["train", "--activations", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "bad"),
                 "--progress", "false"]) == 1
    assert "error" in capsys.readouterr().err
    assert waited == [True, False]
