"""The report of `conca sweep`: the sparsity-fidelity frontiers of an SAE family, every point and
the training curves."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml

from conca.report import plots
from conca.report.html import Report

HEADLINE = ("l0", "explained_variance", "ce_loss_recovered", "kl_div", "mse_sum", "dead_fraction", "dense_fraction")


def write_report(path: Path, summary: dict, histories: dict, opts) -> Path:
    """`opts`: the run's SweepOptions."""
    report = Report("conca sweep", subtitle=f"SAE family at site {summary['site']} of {Path(summary['model']).name}")
    report.paragraph(
        f"Every dictionary has {opts.expansion}x latents and was trained for {opts.steps} steps of {opts.batch_size} "
        "tokens on the very same batches (one activation stream, one optimiser per dictionary), then evaluated on "
        f"{summary['heldout_tokens']} held-out tokens. Up and to the left is better: more fidelity for fewer active latents."
    )
    for y, caption in (("explained_variance", "Sparsity vs reconstruction: L0 against explained variance (about the mean)."),
                       ("ce_loss_recovered", "Sparsity vs downstream fidelity: L0 against CE-loss recovered (vs zero-ablation).")):
        figure = plots.frontier(summary["points"], x="l0", y=y, group="method")
        figure.axes[0].set_xscale("log")  # L0 spans orders of magnitude across methods
        report.figure(figure, caption=caption + " Log-scaled L0.")
    report.heading("All points")
    report.table([{"dictionary": p["name"], **{k: p.get(k) for k in HEADLINE}} for p in summary["points"]],
                 columns=["dictionary", *HEADLINE])
    report.heading("Training curves")
    report.figure(plots.training_curves(histories, keys=["fvu", "l0"]))
    report.heading("Configuration")
    report.code(yaml.safe_dump(asdict(opts), sort_keys=False))
    return report.write(path)
