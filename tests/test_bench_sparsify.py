"""The conca-vs-sparsify benchmark at toy size: both libraries' TopK runs learn and both land in
the results. Skipped where sparsify (eai-sparsify, an optional benchmark peer) is not installed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sparsify")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sparsify.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sparsify", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sparsify_trains_both_libraries_on_the_same_rows_and_reports_both(tmp_path):
    # Rank-8 data that a 64-latent TopK dictionary can reconstruct well: a side whose training
    # step were broken (wrong forward, no optimiser step) stays near its starting FVU (about 0.5 or
    # more after 3 steps here), both reach about 0.2 in 40 steps.
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1280, 8)) @ rng.standard_normal((8, 24))).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    _bench().main(["--npy", str(tmp_path / "acts.npy"), "--latents", "64", "--k", "8", "--batch", "128", "--steps", "40",
                   "--warmup", "2", "--rounds", "1", "--lr", "3e-3", "--threads", "1", "--device", "cpu",
                   "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "bench_sparsify.json").read_text())
    [row] = result["rows"]
    for side in ("conca", "sparsify"):
        assert row[f"{side}_tokens_per_s"] > 0
        assert math.isfinite(row[f"{side}_fvu"]) and row[f"{side}_fvu"] < 0.3, (side, row[f"{side}_fvu"])
    assert row["speedup"] == pytest.approx(row["conca_tokens_per_s"] / row["sparsify_tokens_per_s"])
    assert "sparsify" in (tmp_path / "out" / "bench_sparsify.md").read_text()
