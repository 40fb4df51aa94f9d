"""Trainer: loss goes down, schedules, resume after a kill, and every TrainConfig flag has an effect."""

from __future__ import annotations

import pytest
import torch

from conca.activations.stream import TensorSource
from conca.dictionaries import create, load_dictionary
from conca.errors import ConfigError, ShapeError
from conca.training.trainer import TrainConfig, lr_factor, train
from conftest import planted


def quick(**kw):
    base = dict(steps=150, batch_size=256, lr=3e-3, warmup_steps=10, eval_every=50, checkpoint_every=50,
                init_tokens=1024, eval_tokens=1024, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_loss_and_fvu():
    torch.manual_seed(0)
    sae = create("topk", d_in=16, n_latents=48, k=3)
    result = train({"a": sae}, TensorSource(planted()), quick(eval_every=5))
    hist = result.histories["a"]
    assert hist[-1]["fvu"] < 0.5 * hist[0]["fvu"] and hist[-1]["fvu"] < 0.15
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["l0"] <= 3.0
    assert result.tokens_per_s > 0


def test_many_dictionaries_see_the_same_batches():
    torch.manual_seed(0)
    a, b = create("topk", d_in=16, n_latents=48, k=3), create("topk", d_in=16, n_latents=48, k=3)
    b.load_state_dict(a.state_dict())
    train({"a": a, "b": b}, TensorSource(planted()), quick(steps=30))
    assert torch.equal(a.W_enc, b.W_enc)  # identical init + identical batches = identical result


def test_lr_schedule_warmup_and_decay():
    cfg = TrainConfig(steps=100, warmup_steps=10, decay_start=0.8)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(50, cfg) == pytest.approx(1.0)
    assert lr_factor(90, cfg) == pytest.approx(0.5)
    assert lr_factor(99, cfg) == pytest.approx(0.05)


def test_normalize_input_flag_changes_training_and_is_folded_back():
    x = planted() * 40
    runs = {}
    for flag in (True, False):
        torch.manual_seed(0)
        sae = create("topk", d_in=16, n_latents=48, k=3)
        result = train({"a": sae}, TensorSource(x), quick(steps=40, normalize_input=flag))
        runs[flag] = (result.input_scale, sae)
    assert runs[False][0] == 1.0 and runs[True][0] != pytest.approx(1.0)
    assert not torch.allclose(runs[True][1].W_enc, runs[False][1].W_enc)
    # Folded: the normalised run reconstructs raw-scale inputs directly.
    fvu = ((runs[True][1](x[:512]) - x[:512]).pow(2).sum() / (x[:512] - x[:512].mean(0)).pow(2).sum()).item()
    assert fvu < 0.6


def test_seed_changes_batches():
    outs = []
    for seed in (0, 1):
        torch.manual_seed(0)
        sae = create("topk", d_in=16, n_latents=48, k=3)
        train({"a": sae}, TensorSource(planted()), quick(steps=20, seed=seed))
        outs.append(sae.W_enc.detach().clone())
    assert not torch.equal(outs[0], outs[1])


def test_killed_training_resumes_to_the_same_result(tmp_path, monkeypatch):
    source = TensorSource(planted())
    torch.manual_seed(0)
    straight = create("topk", d_in=16, n_latents=48, k=3)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    train({"a": straight}, source, quick(steps=100), out_dir=tmp_path / "straight")

    interrupted = create("topk", d_in=16, n_latents=48, k=3)
    interrupted.load_state_dict(init)
    import conca.training.trainer as trainer_mod

    real_save = trainer_mod.save_checkpoint
    def save_then_die(path, state):
        real_save(path, state)
        if state["step"] == 50:
            raise KeyboardInterrupt
    monkeypatch.setattr(trainer_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train({"a": interrupted}, source, quick(steps=100), out_dir=tmp_path / "cut")
    monkeypatch.setattr(trainer_mod, "save_checkpoint", real_save)
    fresh = create("topk", d_in=16, n_latents=48, k=3)  # a new process: weights come from the checkpoint
    result = train({"a": fresh}, source, quick(steps=100), out_dir=tmp_path / "cut")
    assert [h["step"] for h in result.histories["a"]] == [50, 100]
    assert torch.allclose(fresh.W_enc, straight.W_enc, atol=1e-6)
    saved = load_dictionary(tmp_path / "cut" / "a")
    assert torch.allclose(saved.W_dec, straight.W_dec, atol=1e-6)


def test_resume_refuses_other_config(tmp_path):
    source = TensorSource(planted())
    train({"a": create("topk", d_in=16, n_latents=48, k=3)}, source, quick(steps=50), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="another configuration"):
        train({"a": create("topk", d_in=16, n_latents=48, k=3)}, source, quick(steps=50, lr=1e-2), out_dir=tmp_path)


def test_width_mismatch_and_bad_config():
    with pytest.raises(ShapeError, match="expects width 8"):
        train({"a": create("topk", d_in=8, n_latents=16, k=2)}, TensorSource(planted()), quick())
    with pytest.raises(ConfigError):
        TrainConfig(steps=0)


def test_transcoder_mode_learns_another_sites_output():
    from conca.activations.stream import PairedSource

    x = planted(d=16)
    g = torch.Generator().manual_seed(7)
    target = torch.relu(x @ torch.randn(16, 12, generator=g))  # an "MLP" from 16 to 12 dims
    torch.manual_seed(0)
    transcoder = create("topk", d_in=16, d_out=12, n_latents=64, k=4)
    result = train({"t": transcoder}, TensorSource(x), quick(eval_every=10), target_source=TensorSource(target))
    hist = result.histories["t"]
    assert hist[-1]["fvu"] < 0.5 * hist[0]["fvu"]
    assert transcoder(x[:3]).shape == (3, 12)
    with pytest.raises(ShapeError, match="reconstructs width 12, but the target has width 16"):
        train({"t": create("topk", d_in=16, d_out=12, n_latents=8, k=2)}, TensorSource(x), quick(), target_source=TensorSource(x))
    with pytest.raises(ShapeError, match="not row-aligned"):
        PairedSource(TensorSource(x), TensorSource(target[:100]))


@pytest.mark.parametrize("method", ["topk", "batchtopk", "matryoshka", "jumprelu", "relu_l1", "gated", "p_anneal", "structured"])
def test_every_method_trains_as_a_transcoder(method):
    x = planted(n=2048, d=16)
    target = torch.relu(x @ torch.randn(16, 12, generator=torch.Generator().manual_seed(7)))
    torch.manual_seed(0)
    options = {"k": 4} if method in ("topk", "batchtopk", "matryoshka") else {}
    transcoder = create(method, d_in=16, d_out=12, n_latents=48, **options)
    assert transcoder.is_transcoder
    result = train({"t": transcoder}, TensorSource(x), quick(steps=150, eval_every=50), target_source=TensorSource(target))
    assert transcoder(x[:5]).shape == (5, 12)
    fvu = [h["fvu"] for h in result.histories["t"]]
    assert all(torch.isfinite(torch.tensor(fvu))) and fvu[-1] < min(1.0, fvu[0])


def test_device_option_is_resolved_and_a_missing_gpu_is_named():
    from conca.runtime.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            train({"t": create("topk", d_in=16, n_latents=32, k=2)}, TensorSource(planted(n=512)), quick(device="cuda"))
    # The device is not part of what a checkpoint must match: a run can move between machines.
    from conca.training.trainer import _resumable

    assert _resumable(quick(device="cpu")) == _resumable(quick(device="auto"))


def test_trainer_phases_driven_step_by_step_give_train_s_result(tmp_path):
    from conca.training.trainer import Trainer

    source = TensorSource(planted())
    cfg = quick(steps=60, eval_every=20, checkpoint_every=25)
    torch.manual_seed(0)
    straight = create("topk", d_in=16, n_latents=48, k=3)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    expected = train({"a": straight}, source, cfg, out_dir=tmp_path / "train")

    stepped = create("topk", d_in=16, n_latents=48, k=3)
    stepped.load_state_dict(init)
    trainer = Trainer({"a": stepped}, source, cfg, out_dir=tmp_path / "phases")
    trainer.setup()
    evaluated, checkpointed = [], []
    while trainer.steps_done < cfg.steps:
        trainer.step()
        if trainer.eval_due:
            trainer.evaluate()
            evaluated.append(trainer.steps_done)
        if trainer.checkpoint_due:
            trainer.checkpoint()
            checkpointed.append(trainer.steps_done)
    result = trainer.finish()
    assert evaluated == [20, 40, 60] and checkpointed == [25, 50, 60]
    assert len(result.step_seconds) == 60 and result.resumed_from_step == 0
    assert result.input_scale == expected.input_scale
    for name, value in straight.state_dict().items():
        assert torch.equal(value, stepped.state_dict()[name]), name
    assert result.histories == expected.histories  # same losses, metrics and learning rates at the same steps
    assert torch.equal(load_dictionary(tmp_path / "phases" / "a").W_dec, load_dictionary(tmp_path / "train" / "a").W_dec)


def test_a_labelled_source_trains_as_labels_given_to_train():
    from conca.activations.labelled import LabelledSource

    x = planted(n=1024)
    labels = torch.arange(1024) % 5
    seen = {}
    for how in ("argument", "source"):
        torch.manual_seed(0)
        sae = create("topk", d_in=16, n_latents=48, k=3)
        received = []
        real = sae.loss_terms
        sae.loss_terms = lambda x, target=None, labels=None: received.append(labels) or real(x, target)
        if how == "argument":
            train({"a": sae}, TensorSource(x, chunk_rows=300), quick(steps=8), labels=labels)
        else:
            train({"a": sae}, LabelledSource(TensorSource(x, chunk_rows=300), labels), quick(steps=8))
        seen[how] = (received, sae.W_enc.detach().clone())
    assert len(seen["source"][0]) == 8 and all(lb.shape == (256, 1) and lb.dtype == torch.long for lb in seen["source"][0])
    assert all(torch.equal(a, b) for a, b in zip(seen["argument"][0], seen["source"][0]))
    assert torch.equal(seen["argument"][1], seen["source"][1])
    with pytest.raises(ConfigError, match="labels given twice"):
        train({"a": create("topk", d_in=16, n_latents=48, k=3)}, LabelledSource(TensorSource(x), labels), quick(steps=2),
              labels=labels)
