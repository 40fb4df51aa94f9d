"""`conca demo` end to end on a tiny model (the real-model run is the README's demo command)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np

from conca.cli import main
from conftest import SAMPLE_TEXT


def test_demo_writes_report_and_metrics(tmp_path, tiny_model_dirs):
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"Document {i}. " + SAMPLE_TEXT * 3 for i in range(20)))
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--model", str(tiny_model_dirs["llama"]), "--text", str(text),
            "--train-tokens", "2000", "--eval-tokens", "300", "--ctx-len", "32", "--steps", "30",
            "--batch-size", "128", "--expansion", "2", "--k", "4", "--progress", "false"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"final", "resid.1"}  # resid.mid -> middle of 3 layers
    for site_metrics in metrics["sites"].values():
        for key in ("explained_variance", "l0", "ce_loss_recovered", "kl_div", "dead_fraction"):
            assert isinstance(site_metrics[key], float)
        assert site_metrics["l0"] <= 4
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "ce_loss_recovered" in html
    assert (out / "config.yaml").exists() and (out / "activations" / "manifest.json").exists()


def test_killed_training_process_resumes(tmp_path):
    """A real SIGKILL mid-run: the rerun continues from the last checkpoint and finishes."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(4000, 16)).astype(np.float32))
    cmd = [sys.executable, "-m", "conca.cli", "train", "--activations", str(tmp_path / "x.npy"), "--out",
           str(tmp_path / "run"), "--n-latents", "512", "--k", "8", "--steps", "1500", "--batch-size", "512",
           "--checkpoint-every", "20", "--eval-every", "500", "--progress", "false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "run" / "checkpoint.json"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (tmp_path / "run" / "metrics.json").exists()
    from conca.training.checkpoint import load_checkpoint

    step_at_kill = load_checkpoint(checkpoint)["step"]
    assert 0 < step_at_kill < 1500
    assert not list((tmp_path / "run").glob("*.tmp"))  # no half-written files
    finished = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["history"][-1]["step"] == 1500
    assert metrics["resumed_from_step"] == step_at_kill
