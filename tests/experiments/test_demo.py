"""`conca demo` end to end on a tiny model (the real-model run is the README's demo command)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conca.cli import main
from conftest import SAMPLE_TEXT


@pytest.mark.slow  # a whole `conca demo` run
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
        for key in ("explained_variance", "l0", "ce_loss_recovered", "ce_loss_recovered_saelens", "kl_div",
                    "dead_fraction"):
            assert isinstance(site_metrics[key], float) and np.isfinite(site_metrics[key]), key
        assert 0 < site_metrics["l0"] <= 4  # TopK with k=4: some latents fire, never more than k
        assert site_metrics["explained_variance"] <= 1.0 and 0.0 <= site_metrics["dead_fraction"] <= 1.0
        assert site_metrics["kl_div"] >= 0.0
        # The recovered fraction is the one its reported parts give (a random tiny model: no sign is assumed).
        clean, spliced, zero = (site_metrics[k] for k in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated"))
        assert zero != clean
        assert site_metrics["ce_loss_recovered"] == pytest.approx((zero - spliced) / (zero - clean), rel=1e-6)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "ce_loss_recovered" in html
    assert "ce_loss_recovered_saelens" in html and "SAELens&#x27; ce_loss_score" in html  # both, each explained
    assert (out / "config.yaml").exists() and (out / "activations" / "manifest.json").exists()
    # Each site's atlas, built from held-out text and linked from the report with its highlights.
    for site in ("final", "resid.1"):
        atlas = metrics["atlases"][site]
        assert (out / atlas["index"]).is_file() and (out / "atlas" / site / "data" / "index.js").is_file()
        assert atlas["n_cards"] == 64 and atlas["n_tokens"] > 0  # 2 x 32 latents, one card each
        assert f'href="atlas/{site}/index.html"' in html
        for highlight in atlas["highlights"]:
            assert f'href="atlas/{site}/index.html#latent={highlight["latent"]}"' in html
    assert (out / "atlas_activations" / "manifest.json").exists()


@pytest.mark.slow  # a CLI training subprocess, killed and rerun
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
    # (A kill during a save may leave a temporary file, never a half-written checkpoint: it loaded above.)
    finished = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["history"][-1]["step"] == 1500
    assert metrics["resumed_from_step"] == step_at_kill
    assert not list((tmp_path / "run").glob("*.tmp"))  # the resumed run cleared any temporaries of the kill


@pytest.mark.slow  # whole `conca demo` runs
def test_demo_rerun_reuses_finished_work_and_recomputes_when_an_eval_setting_changes(tmp_path, tiny_model_dirs,
                                                                                     monkeypatch):
    from conca.experiments import demo

    evaluated = []
    real_evaluate = demo.evaluate_dictionary

    def counting_evaluate(loaded, dictionary, site, contexts, **kwargs):
        evaluated.append((site, contexts.n_tokens))
        return real_evaluate(loaded, dictionary, site, contexts, **kwargs)

    monkeypatch.setattr(demo, "evaluate_dictionary", counting_evaluate)
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"Document {i}. " + SAMPLE_TEXT * 3 for i in range(20)))
    settings = dict(out=str(tmp_path / "demo"), model=str(tiny_model_dirs["llama"]), text=str(text), sites="final",
                    train_tokens=1000, eval_tokens=300, ctx_len=32, steps=10, batch_size=128, expansion=2, k=4,
                    progress=False)

    def run(**changes):
        lines: list[str] = []
        summary = demo.run_demo(demo.DemoOptions(**{**settings, **changes}), log=lines.append)
        return summary, "\n".join(lines)

    first, first_log = run()
    assert len(evaluated) == 1 and "harvesting" in first_log
    second, second_log = run()
    assert len(evaluated) == 1  # the evaluation was not run again ...
    assert json.dumps(second["sites"]) == json.dumps(first["sites"])  # ... and its metrics are the same
    assert "activations: reusing" in second_log and "complete" in second_log
    assert "train final: reusing finished dictionary" in second_log
    assert "evaluate final: reusing metrics (same dictionary digest and eval settings" in second_log
    assert "harvesting" not in second_log and "evaluating" not in second_log
    assert not list((tmp_path / "demo" / "evaluations").glob("*.tmp*"))

    third, third_log = run(eval_tokens=150)  # another evaluation setting: computed afresh
    assert len(evaluated) == 2 and evaluated[1][1] < evaluated[0][1]
    assert "evaluating final" in third_log and "tokens changed" in third_log
    assert third["sites"]["final"]["n_scored_tokens"] != first["sites"]["final"]["n_scored_tokens"]
    run(eval_tokens=150)
    assert len(evaluated) == 2  # and that result is the one reused next time


def test_dictionary_digest_follows_every_weight_and_the_config():
    import torch

    from conca.dictionaries.base import create
    from conca.evaluation.cache import dictionary_digest

    torch.manual_seed(0)
    dictionary = create("topk", d_in=8, n_latents=16, k=2)
    digest = dictionary_digest(dictionary)
    assert digest == dictionary_digest(dictionary) and len(digest) == 64
    live = {**dict(dictionary.named_parameters()), **dict(dictionary.named_buffers())}
    for name in dictionary.inference_state():
        tensor = live[name]
        with torch.no_grad():
            original = tensor.clone()
            tensor[(0,) * tensor.ndim] += 1e-3
            assert dictionary_digest(dictionary) != digest, name
            tensor.copy_(original)
    assert dictionary_digest(dictionary) == digest
    dictionary.config.k = 3  # same weights, another encoding
    assert dictionary_digest(dictionary) != digest
