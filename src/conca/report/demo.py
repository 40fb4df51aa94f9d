"""The report of `conca demo`: each site's headline metrics with what they mean, the training
curves and the latent densities."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml

from conca.report import plots
from conca.report.html import Report

HEADLINE = ("explained_variance", "fvu", "l0", "ce_loss_recovered", "ce_loss_recovered_saelens", "kl_div",
            "dead_fraction", "dense_fraction", "mse_sum", "mse_mean", "cosine_similarity", "l2_ratio",
            "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated", "ce_loss_zero_ablated_saelens",
            "kl_div_score", "kl_div_score_saelens")
# What each headline row is, shown beside it in the report.
MEANING = {
    "explained_variance": "1 − Σ‖x−x̂‖² / Σ‖x−x̄‖² (about the mean)",
    "fvu": "1 − explained_variance",
    "l0": "active latents per token",
    "ce_loss_recovered": "conca: (CE_zero − CE_sae) / (CE_zero − CE_clean), zeros at the real-token positions only",
    "ce_loss_recovered_saelens": "SAELens' ce_loss_score: the same with zeros at every position, BOS included",
    "kl_div": "KL(p_clean ‖ p_sae) per scored token (nats)",
    "dead_fraction": "latents that never fired on the held-out tokens",
    "dense_fraction": "latents firing on > 10 % of them",
    "mse_sum": "E‖x−x̂‖², summed over dimensions (SAELens' mse)",
    "mse_mean": "mse_sum / d (mean over dimensions too)",
    "cosine_similarity": "E cos(x, x̂)",
    "l2_ratio": "E ‖x̂‖ / ‖x‖",
    "ce_loss_clean": "CE of the unchanged model",
    "ce_loss_spliced": "CE with the SAE's reconstruction spliced in",
    "ce_loss_zero_ablated": "CE with zeros at the real-token positions (conca)",
    "ce_loss_zero_ablated_saelens": "CE with zeros at every position (SAELens' ce_loss_with_ablation)",
    "kl_div_score": "conca: (KL_zero − KL_sae) / KL_zero",
    "kl_div_score_saelens": "SAELens' kl_div_score (zeros at every position)",
}


def write_report(path: Path, summary: dict, histories: dict, densities: dict, opts) -> Path:
    """`opts`: the run's DemoOptions."""
    report = Report("conca demo", subtitle=f"TopK SAEs on {Path(summary['model']).name}")
    report.paragraph(
        f"Each site's activations were harvested from the training documents of the corpus ({opts.text}); a TopK SAE "
        f"with {opts.expansion}x latents and k={opts.k} was trained for {opts.steps} steps of {opts.batch_size} tokens, "
        f"then evaluated on {summary['heldout_tokens']} tokens of held-out documents. Explained variance is about the "
        "mean; MSE is given both summed over dimensions per token (mse_sum, the scale of SAELens' mse) and as a "
        "per-dimension mean (mse_mean). The SAE's reconstruction replaces the site's activation at the real-text "
        "positions (BOS and EOS are left alone). CE-loss recovered is reported twice: ce_loss_recovered (conca) "
        "compares it with zero-ablation of those same positions; ce_loss_recovered_saelens is SAELens' run_evals "
        "ce_loss_score, whose zero-ablation zeroes every position, BOS included: on a Llama-type model that gives "
        "uniform predictions (CE = ln(vocab)), a milder baseline than conca's (zeros with BOS intact give confidently "
        "wrong predictions), so the same SAE scores lower. KL is KL(clean || spliced) per token."
    )
    report.heading("Metrics on held-out text")
    sites = list(summary["sites"])
    rows = [{"metric": key, **{site: summary["sites"][site].get(key) for site in sites},
             "meaning": MEANING.get(key, "")} for key in HEADLINE]
    report.table(rows, columns=["metric", *sites, "meaning"])
    report.heading("Training curves")
    report.figure(plots.training_curves(histories, keys=["loss", "fvu", "l0"]),
                  caption="Loss on training batches; FVU and L0 on a fixed sample of activations, during training.")
    report.heading("Latent density")
    report.figure(plots.density_histogram(densities),
                  caption="log10 of the fraction of held-out tokens on which each latent fires.")
    if summary.get("atlases"):
        report.heading("Latent atlas: look at the concepts")
        report.paragraph(
            "Every latent of each site's SAE has a card in the atlas: its top-activating held-out contexts and "
            "quantile groups with tokens highlighted by activation, an activation histogram, the tokens its decoder "
            "direction promotes and suppresses (vocabulary projection), and, for some, greedy continuations with the "
            "latent clamped high. The index sorts, filters and searches by token. A few highlights, chosen "
            "automatically:")
        for site, atlas in summary["atlases"].items():
            report.heading(f"{site}: {atlas['n_cards']} latents ({atlas['dead']} dead, {atlas['dense']} dense)", level=3)
            report.links([(f"open the atlas of {site}", atlas["index"], ""), *[
                (f"latent {h['latent']}", f"{atlas['index']}#latent={h['latent']}", h["why"])
                for h in atlas["highlights"]]])
    report.heading("Configuration")
    report.code(yaml.safe_dump(asdict(opts), sort_keys=False))
    return report.write(path)
