"""`conca sweep` on a tiny model: one stream, many dictionaries, a frontier in the report."""

from __future__ import annotations

import json

import pytest

from conca.cli import main
from conca.errors import ConfigError
from conca.experiments.sweep import SweepOptions, build_family, parse_grid
from conftest import SAMPLE_TEXT


def test_parse_grid_and_family_names():
    assert parse_grid("topk:k=8|16; relu_l1:l1_coeff=1|10") == {"topk": ("k", [8, 16]), "relu_l1": ("l1_coeff", [1, 10])}
    family = build_family(SweepOptions(methods="topk", grid="topk:k=2|3"), d=32)
    assert list(family) == ["topk@k=2", "topk@k=3"]
    assert [d.config.k for d in family.values()] == [2, 3]
    with pytest.raises(ConfigError, match="bad grid entry"):
        parse_grid("topk")
    with pytest.raises(ConfigError, match="has no option 'l1_coeff'"):
        build_family(SweepOptions(methods="topk", grid="topk:l1_coeff=1"), d=32)


def test_sweep_writes_frontier_report(tmp_path, tiny_model_dirs):
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"Document {i}. " + SAMPLE_TEXT * 3 for i in range(20)))
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), "--model", str(tiny_model_dirs["gpt2"]), "--text", str(text),
                 "--methods", "topk", "--grid", "topk:k=2|4|8", "--train-tokens", "1500", "--eval-tokens", "300",
                 "--ctx-len", "32", "--steps", "30", "--batch-size", "128", "--progress", "false"]) == 0
    results = json.loads((out / "results.json").read_text())
    l0 = {p["name"]: p["l0"] for p in results["points"]}
    assert l0["topk@k=2"] <= 2 < l0["topk@k=8"] <= 8  # the knob moves along the sparsity axis
    ev = {p["name"]: p["explained_variance"] for p in results["points"]}
    assert ev["topk@k=8"] > ev["topk@k=2"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3


def test_every_registered_method_has_a_grid_whose_knob_exists():
    from conca.dictionaries import get_method, methods
    from conca.experiments.sweep import default_grid

    grid = default_grid()
    assert set(methods()) <= set(grid)
    for method, (knob, values) in grid.items():
        assert hasattr(get_method(method).Config(d_in=64, n_latents=128), knob), (method, knob)
        assert len(values) >= 2


def test_default_grid_values_and_family_are_those_of_conca_sweep():
    """The declared grids reproduce the sweep's published defaults exactly (values and order)."""
    from conca.experiments.sweep import default_grid, sae_family

    coeffs = [1.0, 10.0, 100.0]
    family = {"topk": ("k", [16, 32, 64]), "batchtopk": ("k", [16, 32, 64]), "matryoshka": ("k", [32, 64]),
              "jumprelu": ("l0_coeff", coeffs), "relu_l1": ("l1_coeff", coeffs), "gated": ("l1_coeff", coeffs),
              "p_anneal": ("l1_coeff", coeffs), "structured": ("sparsity_coeff", coeffs)}
    grid = default_grid()
    assert sae_family() == list(family)
    assert {m: grid[m] for m in family} == family
    assert grid["conca"] == ("alpha", [1.0, 100.0, 1000.0]) and grid["align"] == ("sparse_coeff", [1e-3, 1e-1, 1.0])
    assert list(grid)[:len(family)] == list(family) and list(grid)[-1] == "align"
