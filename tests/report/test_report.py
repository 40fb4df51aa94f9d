"""Tests for the self-contained HTML report builder and the standard plots."""

from __future__ import annotations

import base64
import re

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from conca.report import plots
from conca.report.html import Report, format_value

import matplotlib.pyplot as plt  # noqa: E402  (after conca.report.plots selected Agg)


def _history(n: int = 5, scale: float = 1.0) -> list[dict[str, float]]:
    return [{"step": 100 * i, "loss": scale / (i + 1), "fvu": 0.5 / (i + 1), "l0": 32.0 - i} for i in range(n)]


def _full_report() -> Report:
    rep = Report("Tiny SAE <run>", subtitle="subtitle & more")
    rep.heading("Metrics")
    rep.paragraph("User text with <script>alert('x')</script> inside")
    rep.table(
        [
            {"site": "resid_0", "fvu": 0.123456, "l0": 12, "dead": None},
            {"site": "resid_1", "fvu": 12345.678, "l0": 7, "dead": 3},
        ],
        caption="Per-site metrics",
    )
    rep.key_values({"seed": 0, "lr": 0.000312345, "model": "tiny-gpt2"}, caption="Config summary")
    rep.figure(plots.training_curves({"a": _history(), "b": _history(scale=2.0)}), caption="curves")
    rep.figure(plots.frontier([{"l0": 1, "ev": 0.5, "m": "sae"}], x="l0", y="ev", group="m"))
    rep.code("layer: 6\nname: <b>not bold</b>\n")
    return rep


# ----------------------------------------------------------------------------- html


def test_full_report_is_self_contained_html(tmp_path):
    out = _full_report().write(tmp_path / "nested" / "dir" / "report.html")
    assert out == tmp_path / "nested" / "dir" / "report.html"
    assert out.is_file()
    text = out.read_text(encoding="utf-8")

    assert text.lstrip().lower().startswith("<!doctype html>")
    assert text.rstrip().endswith("</html>")
    for tag in ("<html", "<head>", "<body>", "</body>", "<style>", "<title>"):
        assert tag in text
    # title/subtitle are escaped
    assert "<title>Tiny SAE &lt;run&gt;</title>" in text
    assert "subtitle &amp; more" in text
    # user text is escaped, never live markup
    assert "<script>" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "&lt;b&gt;not bold&lt;/b&gt;" in text and "<pre>" in text
    # numbers formatted to 4 significant digits, None -> em dash, ints exact
    assert ">0.1235<" in text and "0.123456" not in text
    assert ">1.235e+04<" in text
    assert ">0.0003123<" in text
    assert ">\u2014<" in text
    assert '<td class="num">12</td>' in text
    assert "Per-site metrics" in text and "Config summary" in text
    # one embedded PNG per figure, and they decode to real PNGs
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 2
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    # self-contained: no network references
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower() and "<link" not in text.lower()


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("old contents")
    Report("First").paragraph("one").write(path)
    Report("Second").paragraph("two").write(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    text = path.read_text()
    assert "Second" in text and "First" not in text and "old contents" not in text


def test_write_failure_cleans_up_temp_file(tmp_path, monkeypatch):
    import os

    def boom(src, dst):
        raise OSError("simulated")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        Report("x").write(tmp_path / "r.html")
    assert list(tmp_path.iterdir()) == []


def test_table_columns_order_missing_and_escaping():
    rep = Report("t").table(
        [{"b": 1.0, "a": "<x>"}, {"a": "y"}],
        columns=["a", "b", "c"],
    )
    html = rep.render()
    thead = re.search(r"<thead>(.*?)</thead>", html, re.S).group(1)
    headers = re.findall(r"<th[^>]*>(.*?)</th>", thead)
    assert headers == ["a", "b", "c"]
    assert "&lt;x&gt;" in html and "<x>" not in html
    # row 2 lacks b and c; row 1 lacks c -> 3 dashes
    assert html.count(">\u2014<") == 3
    # default columns follow the first row's key order
    html2 = Report("t").table([{"z": 1, "y": 2}]).render()
    assert re.findall(r'<th scope="col"[^>]*>(.*?)</th>', html2) == ["z", "y"]


def test_empty_table_and_key_values_render():
    html = Report("t").table([]).key_values({}).render()
    assert "(no rows)" in html and "(empty)" in html


def test_figure_is_closed_after_embedding():
    fig = plots.frontier([{"x": 1, "y": 2, "g": "a"}], x="x", y="y", group="g")
    assert plt.fignum_exists(fig.number)
    Report("t").figure(fig)
    assert not plt.fignum_exists(fig.number)


def test_heading_levels_and_validation():
    html = Report("t").heading("Sub", level=3).render()
    assert "<h3>Sub</h3>" in html
    with pytest.raises(ValueError):
        Report("t").heading("bad", level=7)


def test_builder_methods_chain():
    rep = Report("t")
    assert rep.heading("Heading-h").paragraph("Para-p").code("Code-c").key_values({"Key-k": 1}).table(
        [{"Col-a": 1}]) is rep
    html = rep.render()
    # Every chained call adds its block, in call order.
    positions = [html.find(text) for text in ("Heading-h", "Para-p", "Code-c", "Key-k", "Col-a")]
    assert all(p >= 0 for p in positions) and positions == sorted(positions)


@pytest.mark.parametrize(
    "value, expected",
    [
        (0.123456, "0.1235"),
        (1.0, "1"),
        (123456.0, "1.235e+05"),
        (None, "\u2014"),
        (42, "42"),
        (True, "True"),
        (float("nan"), "nan"),
        (np.float32(0.5), "0.5"),
        (np.int64(7), "7"),
        (torch.tensor(2.718281828), "2.718"),
        ([0.11111, 2], "[0.1111, 2]"),
        ("text", "text"),
    ],
)
def test_format_value(value, expected):
    assert format_value(value) == expected


# ----------------------------------------------------------------------------- plots


def test_agg_backend_selected():
    assert matplotlib.get_backend().lower() == "agg"


def test_training_curves_axes_and_lines():
    fig = plots.training_curves({"site_a": _history(), "site_b": _history(scale=3.0)})
    try:
        assert isinstance(fig, Figure)
        assert len(fig.axes) == 3
        assert [ax.get_title() for ax in fig.axes] == ["loss", "fvu", "l0"]
        for ax in fig.axes:
            assert len(ax.get_lines()) == 2
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["site_a", "site_b"]
            assert ax.get_xlabel() == "step"
        assert fig.axes[0].get_yscale() == "log"
        assert fig.axes[1].get_yscale() == "linear"
    finally:
        plt.close(fig)


def test_training_curves_skips_records_missing_key_and_linear_for_nonpositive_loss():
    hist = [{"step": 0, "loss": -1.0}, {"step": 1, "fvu": 0.4}, {"step": 2, "loss": 0.5, "fvu": 0.3}]
    fig = plots.training_curves({"run": hist}, keys=["loss", "fvu"])
    try:
        assert len(fig.axes) == 2
        loss_line = fig.axes[0].get_lines()[0]
        assert list(loss_line.get_xdata()) == [0, 2]
        assert list(fig.axes[1].get_lines()[0].get_xdata()) == [1, 2]
        assert fig.axes[0].get_yscale() == "linear"  # a non-positive loss disables log scale
    finally:
        plt.close(fig)


def test_density_histogram_reports_dead_counts():
    rng = np.random.default_rng(0)
    a = torch.tensor(np.concatenate([10 ** rng.uniform(-5, -1, size=100), np.zeros(3)]), dtype=torch.float32)
    b = np.concatenate([10 ** rng.uniform(-4, -2, size=50), np.zeros(7)])
    all_dead = np.zeros(4)
    fig = plots.density_histogram({"sae": a, "cca": b, "broken": all_dead}, bins=20)
    try:
        assert isinstance(fig, Figure) and len(fig.axes) == 1
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["sae (dead: 3)", "cca (dead: 7)", "broken (dead: 4)"]
        assert ax.get_xlabel() == "log10 firing frequency"
        assert ax.get_ylabel() == "latents"
        # only alive latents are counted in the bars
        counts = [sum(p.get_height() for p in container.patches) for container in ax.containers]
        assert counts == [100, 50, 0]
    finally:
        plt.close(fig)


def test_frontier_groups_sorted_by_x():
    points = [
        {"method": "sae", "l0": 64, "explained_variance": 0.9},
        {"method": "cca", "l0": 8, "explained_variance": 0.6},
        {"method": "sae", "l0": 8, "explained_variance": 0.5},
        {"method": "cca", "l0": 32, "explained_variance": 0.85},
        {"method": "sae", "l0": 16, "explained_variance": 0.7},
        {"method": "sae", "l0": None, "explained_variance": 0.1},  # skipped
    ]
    fig = plots.frontier(points, x="l0", y="explained_variance", group="method")
    try:
        ax = fig.axes[0]
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == ["sae", "cca"]
        assert list(lines[0].get_xdata()) == [8, 16, 64]
        assert list(lines[0].get_ydata()) == [0.5, 0.7, 0.9]
        assert list(lines[1].get_xdata()) == [8, 32]
        assert ax.get_xlabel() == "l0" and ax.get_ylabel() == "explained_variance"
    finally:
        plt.close(fig)
