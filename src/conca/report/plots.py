"""Standard figures for conca reports.

All functions return a :class:`matplotlib.figure.Figure` and never call ``show``; pass
the result to :meth:`conca.report.html.Report.figure`, which embeds and closes it.
The non-interactive Agg backend is selected unless pyplot was already imported
(e.g. inside a notebook), so this is safe on headless machines.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

import matplotlib

if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["training_curves", "density_histogram", "frontier"]


def _to_float(value) -> float | None:
    if value is None:
        return None
    item = getattr(value, "item", None)
    if callable(item):
        value = item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _to_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch
        values = values.detach().to("cpu").double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def training_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    keys: Sequence[str] = ("loss", "fvu", "l0"),
    step_key: str = "step",
) -> Figure:
    """One subplot per metric key, one line per named run.

    Records lacking the key (or the step) are skipped. The "loss" axis is log-scaled
    when all of its finite values are positive.
    """
    keys = list(keys)
    if not keys:
        raise ValueError("training_curves needs at least one key")
    n = len(keys)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        plotted: list[float] = []
        for i, (name, history) in enumerate(histories.items()):
            steps, vals = [], []
            for rec in history:
                if key not in rec or step_key not in rec:
                    continue
                s, v = _to_float(rec[step_key]), _to_float(rec[key])
                if s is None or v is None:
                    continue
                steps.append(s)
                vals.append(v)
            if not vals:
                continue
            order = np.argsort(steps, kind="stable")
            ax.plot(np.asarray(steps)[order], np.asarray(vals)[order], color=f"C{i % 10}",
                    label=str(name), linewidth=1.5)
            plotted.extend(vals)
        finite = [v for v in plotted if math.isfinite(v)]
        if key == "loss" and finite and all(v > 0 for v in finite):
            ax.set_yscale("log")
        if not plotted:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_title(key)
        ax.set_xlabel(step_key)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.suptitle("Training curves")
    fig.tight_layout()
    return fig


def density_histogram(firing_frequencies: Mapping[str, object], bins: int = 50) -> Figure:
    """Overlaid histograms of log10(per-latent firing frequency), one per dictionary.

    Dead latents (frequency 0) cannot be drawn in log space; they are counted and
    reported in the legend label as ``"<name> (dead: N)"``.
    """
    bins = int(bins)
    if bins < 1:
        raise ValueError("bins must be >= 1")
    data = {}
    for name, freqs in firing_frequencies.items():
        arr = _to_numpy(freqs)
        arr = arr[np.isfinite(arr)]
        alive = arr[arr > 0]
        data[name] = (np.log10(alive), int(np.sum(arr <= 0)))

    all_vals = [v for v, _ in data.values() if v.size]
    if all_vals:
        lo = float(min(v.min() for v in all_vals))
        hi = float(max(v.max() for v in all_vals))
    else:
        lo, hi = -1.0, 0.0
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, (vals, dead)) in enumerate(data.items()):
        ax.hist(vals, bins=edges, alpha=0.5, color=f"C{i % 10}", edgecolor=f"C{i % 10}",
                label=f"{name} (dead: {dead})")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title("Latent firing-frequency density")
    ax.grid(True, alpha=0.3)
    if data:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def frontier(points: Sequence[Mapping[str, object]], x: str, y: str, group: str) -> Figure:
    """Scatter + line plot of ``y`` against ``x`` per group, points sorted by ``x``.

    Meant for sparsity–fidelity frontiers, e.g. ``x="l0", y="explained_variance",
    group="method"``. Points missing ``x`` or ``y`` are skipped.
    """
    groups: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        xv, yv = _to_float(p.get(x)), _to_float(p.get(y))
        if xv is None or yv is None:
            continue
        groups.setdefault(str(p.get(group)), []).append((xv, yv))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, pts) in enumerate(groups.items()):
        pts.sort(key=lambda t: t[0])
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", markersize=5, linewidth=1.5, color=f"C{i % 10}", label=name)
    if not groups:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {x}")
    ax.grid(True, alpha=0.3)
    if groups:
        ax.legend(title=group, fontsize="small")
    fig.tight_layout()
    return fig


def annotated_heatmap(grid: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, *,
                      figsize: tuple[float, float], cmap: str = "viridis", vmin: float | None = None,
                      vmax: float | None = None, xlabel: str | None = None, digits: int = 2, fontsize: float = 7,
                      dark_text_from: float | None = None) -> Figure:
    """A heatmap with each cell's value written on it; the cell text is white, or black from
    `dark_text_from` up (for light cells of the colormap)."""
    fig, ax = plt.subplots(figsize=figsize)
    im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            dark = dark_text_from is not None and grid[i, j] >= dark_text_from
            ax.text(j, i, f"{grid[i, j]:.{digits}f}", ha="center", va="center", fontsize=fontsize,
                    color="black" if dark else "white")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
