"""Security and robustness of conca's files: checkpoints hold data only (no pickle), one writer per
output folder, offline means no network request, and new files get the umask's mode."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conca.errors import ConfigError, CorruptDataError, InputError
from conca.fileio import LOCK_FILE, DirectoryLock, atomic_write_bytes
from conca.training.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"step": 1, "payload": _Payload(marker)}))


def _conca(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conca.cli", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


def _tiny_npy(path: Path) -> Path:
    np.save(path, np.random.default_rng(0).normal(size=(2048, 16)).astype(np.float32))
    return path


# --- checkpoints --------------------------------------------------------------------------
def _same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.stride() == b.stride() and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, where


def test_checkpoint_round_trip_is_exact(tmp_path):
    from conca.dictionaries import create

    torch.manual_seed(0)
    sae = create("topk", d_in=16, n_latents=48, k=3)
    adam = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(2):
        adam.zero_grad()
        sum(sae.loss_terms(torch.randn(32, 16), None).values()).backward()
        adam.step()
    tied = torch.nn.Linear(4, 4).weight.detach()
    state = {
        "step": 7, "lr": 1e-3 / 3, "history": [{"fvu": 0.25, "loss": float("nan"), "top": float("inf")}],
        "betas": (0.9, 0.999), "none": None, "flag": True, "name": "run",
        "dictionaries": {"a": sae.state_dict()}, "optimisers": {"a": adam.state_dict()},  # int keys inside
        "tied": {"weight": tied, "same": tied, "transposed": tied.t(), "row": tied[1]},
        "__odd": {3: "three", "__k": "v"}, "bf16": torch.ones(3, dtype=torch.bfloat16), "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(2.5),
    }
    save_checkpoint(tmp_path / "checkpoint.json", state)
    back = load_checkpoint(tmp_path / "checkpoint.json")
    _same(state, back)
    assert back["dictionaries"]["a"]._metadata == dict(sae.state_dict()._metadata)  # module versions kept
    assert not list(tmp_path.glob("*.pt"))


def test_tied_language_model_and_adamw_groups_resume_exactly(tmp_path):
    """The synthetic LM's checkpoint: GPT-2's tied embedding/unembedding and AdamW's two groups."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}])
    ids = torch.randint(0, 50, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    save_checkpoint(tmp_path / "lm_checkpoint.json", {"model": model.state_dict(), "optimizer": opt.state_dict()})
    state = load_checkpoint(tmp_path / "lm_checkpoint.json")
    _same({"model": model.state_dict(), "optimizer": opt.state_dict()}, state)
    torch.manual_seed(1)
    fresh = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    fresh.load_state_dict(state["model"])
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied after loading
    assert torch.equal(fresh.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_checkpoint_files_are_data_only_and_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.json"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    index = json.loads(path.read_text())
    assert index["state"]["step"] == 1 and (tmp_path / index["tensors_file"]).is_file()
    # Killed after the new tensors were written but before the JSON: the old checkpoint still loads.
    import conca.training.checkpoint as checkpoint_mod

    def die(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_mod, "atomic_write_text", die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert len(list(tmp_path.glob("checkpoint.*.safetensors"))) == 2
    assert load_checkpoint(path)["step"] == 1 and torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    monkeypatch.undo()
    save_checkpoint(path, {"step": 3, "w": torch.full((3,), 3.0)})
    assert len(list(tmp_path.glob("checkpoint.*.safetensors"))) == 1  # the orphan and the old one are gone
    assert load_checkpoint(path)["step"] == 3
    remove_checkpoint(path)
    assert load_checkpoint(path) is None and not list(tmp_path.iterdir())


def test_tampered_checkpoint_is_corrupt_data(tmp_path):
    path = tmp_path / "checkpoint.json"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    tensors = tmp_path / json.loads(path.read_text())["tensors_file"]
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="checksum"):
        load_checkpoint(path)
    index = json.loads(path.read_text())
    index["tensors_file"] = "../elsewhere.safetensors"
    path.write_text(json.dumps(index))
    with pytest.raises(CorruptDataError, match="not a plain file name"):
        load_checkpoint(path)
    path.write_text('"a string"')
    with pytest.raises(CorruptDataError, match="not a conca checkpoint"):
        load_checkpoint(path)


@pytest.mark.slow  # CLI subprocesses
def test_planted_pickle_checkpoint_is_refused_and_never_run(tmp_path):
    """A pickle in the old checkpoint's place would run code when unpickled: refused, never loaded."""
    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "run" / "checkpoint.pt", marker)
    x = _tiny_npy(tmp_path / "x.npy")
    result = _conca("train", "--activations", str(x), "--out", str(tmp_path / "run"), "--n-latents", "32", "--k", "4",
                    "--steps", "5", "--batch-size", "64", "--progress", "false")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("conca train: error: ") and "old pickle format" in lines[0], lines
    assert "delete it" in lines[0] and "checkpoint.pt" in lines[0]
    assert not marker.exists()
    # The synthetic LM's checkpoint goes through the same reader.
    _plant_pickle(tmp_path / "lm" / "lm_checkpoint.pt", marker)
    from conca.synthetic.qa_lm import CHECKPOINT_FILE

    with pytest.raises(InputError, match="old pickle format"):
        load_checkpoint(tmp_path / "lm" / CHECKPOINT_FILE)
    assert not marker.exists()


def test_no_pickle_loading_anywhere_in_the_source():
    source = Path(__file__).resolve().parents[1] / "src" / "conca"
    for path in source.rglob("*.py"):
        text = path.read_text()
        for needle in ("torch.load(", "pickle.load", "allow_pickle=True", "weights_only=False"):
            assert needle not in text, f"{path}: {needle}"


@pytest.mark.parametrize("key", ["step", "dictionaries", "train_config"])
def test_checkpoint_missing_a_key_is_corrupt_data_naming_file_and_key(tmp_path, key):
    from conca.activations.stream import TensorSource
    from conca.dictionaries import create
    from conca.training.trainer import TrainConfig, train

    x = torch.randn(1024, 8)
    cfg = TrainConfig(steps=4, batch_size=64, eval_every=2, checkpoint_every=2, init_tokens=256, eval_tokens=128,
                      progress=False, prefetch=0, warmup_steps=1)
    train({"a": create("topk", d_in=8, n_latents=16, k=2)}, TensorSource(x), cfg, out_dir=tmp_path)
    path = tmp_path / "checkpoint.json"
    index = json.loads(path.read_text())
    del index["state"][key]
    path.write_text(json.dumps(index))
    with pytest.raises(CorruptDataError, match=f"checkpoint {path} has no '{key}'"):
        train({"a": create("topk", d_in=8, n_latents=16, k=2)}, TensorSource(x), cfg, out_dir=tmp_path)


# --- one writer per folder ----------------------------------------------------------------
def _wait_for_holder(lock: Path, proc: subprocess.Popen, seconds: float = 120) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            return json.loads(lock.read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise AssertionError(f"{lock} never appeared")


@pytest.mark.slow  # CLI subprocesses, one of them training
def test_second_writer_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    x = _tiny_npy(tmp_path / "x.npy")
    out = tmp_path / "run"
    args = ["train", "--activations", str(x), "--out", str(out), "--n-latents", "64", "--k", "4",
            "--batch-size", "256", "--checkpoint-every", "1000000", "--eval-every", "1000000", "--progress", "false"]
    first = subprocess.Popen([sys.executable, "-m", "conca.cli", *args, "--steps", "1000000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        holder = _wait_for_holder(out / LOCK_FILE, first)
        assert holder["pid"] == first.pid and holder["command"].startswith("conca train")
        second = _conca(*args, "--steps", "5")
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("conca train: error: "), lines
        assert "in use by another conca process" in lines[0] and f"pid {first.pid}" in lines[0]
        assert holder["started"] in lines[0] and "conca train" in lines[0]
        assert first.poll() is None  # the holder runs on undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the killed holder's lock: the folder is taken over, its stale record replaced.
    assert (out / LOCK_FILE).exists()
    third = _conca(*args, "--steps", "5")
    assert third.returncode == 0, third.stderr
    assert not (out / LOCK_FILE).exists()  # released on exit


def test_lock_taken_over_from_a_killed_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from conca.fileio import DirectoryLock; "
        f"DirectoryLock({str(tmp_path / 'out')!r}, 'conca holder').acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} .*`conca holder`"):
            DirectoryLock(tmp_path / "out", "conca second").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with DirectoryLock(tmp_path / "out", "conca third") as lock:
        assert json.loads(lock.path.read_text())["command"] == "conca third"


def test_lock_is_released_on_errors_and_a_folder_it_created_is_removed(tmp_path, capsys):
    from conca.cli import main

    out = tmp_path / "new" / "run"
    assert main(["train", "--activations", str(tmp_path / "missing.npy"), "--out", str(out)]) == 1
    assert "conca train: error:" in capsys.readouterr().err
    assert not (out / LOCK_FILE).exists()
    with DirectoryLock(out, "conca again"):  # free again
        pass
    assert not out.exists()  # created for the lock, nothing written: removed
    (tmp_path / "file").write_text("x")
    assert main(["train", "--activations", "x.npy", "--out", str(tmp_path / "file")]) == 1
    assert "is a file, not a directory" in capsys.readouterr().err


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from conca.cli import _lock_output

    opts = SimpleNamespace(out=str(tmp_path / "run"))
    monkeypatch.setenv("RANK", "1")
    assert _lock_output("train", opts, []) is None
    monkeypatch.setenv("RANK", "0")
    lock = _lock_output("train", opts, [])
    try:
        assert (tmp_path / "run" / LOCK_FILE).exists()
    finally:
        lock.release()
    monkeypatch.delenv("RANK")
    assert _lock_output("steer", SimpleNamespace(out=str(tmp_path / "x.json")), []) is None  # a file, not a folder


# --- offline ------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is recorded and refused; the environment looks online."""
    import huggingface_hub.constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1] if len(args) > 1 else args[0])
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return attempts


def test_uncached_hub_model_without_downloads_makes_no_request(no_network):
    import huggingface_hub.constants

    from conca.models.load import load_model

    with pytest.raises(InputError, match="--allow-download"):
        load_model("some-org/not-cached-model")
    assert no_network == []
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ  # put back


def test_hf_text_without_downloads_makes_no_request(no_network):
    pytest.importorskip("datasets")
    from conca.text.corpus import load_documents

    with pytest.raises(InputError, match="local cache only"):
        load_documents("hf:some-org/not-cached-dataset")
    assert no_network == []


def test_hub_access_switches_offline_only_when_downloads_are_off(monkeypatch):
    import huggingface_hub.constants

    from conca.hub import hub_access

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with hub_access(False):
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True and os.environ["HF_DATASETS_OFFLINE"] == "1"
    with hub_access(True):
        assert huggingface_hub.constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ


# --- file modes ---------------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    from conca.activations.store import ActivationStore, Manifest, context_positions
    from conca.report.html import Report

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        Report("r").write(tmp_path / "report.html")
        store = ActivationStore.create_or_resume(tmp_path / "store", Manifest(
            model="m", sites=["final"], d_model=4, dtype="fp32", ctx_len=8, n_contexts_planned=1))
        info = store.append_shard({"final": torch.ones(2, 4)}, torch.tensor([1, 2]), (0, 1),
                                  context_positions(torch.ones(1, 2, dtype=torch.bool), 0))
    finally:
        os.umask(old)
    for path in (tmp_path / "a.bin", tmp_path / "report.html", tmp_path / "store" / "manifest.json",
                 tmp_path / "store" / info.file):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_a_save_clears_temporaries_left_by_a_killed_save(tmp_path):
    from conca.training.checkpoint import load_checkpoint, save_checkpoint

    (tmp_path / ".checkpoint.json.abc.tmp").write_text("half")
    (tmp_path / ".checkpoint.0123456789abcdef.safetensors.x.tmp").write_text("half")
    (tmp_path / ".metrics.json.q.tmp").write_text("not ours")
    save_checkpoint(tmp_path / "checkpoint.json", {"step": 3, "w": torch.ones(2)})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == ".metrics.json.q.tmp" and not any(".checkpoint" in n for n in names)
    assert load_checkpoint(tmp_path / "checkpoint.json")["step"] == 3
