"""Why do trained dictionaries not beat their chance floors? A grid of `conca reproduce concepts` runs
that changes one thing at a time from the default run (training length, width, site, concept sets)
for TopK and LayerNorm ConCA, and tabulates held-out MPC beside both floors.

    python scripts/investigate_floors.py --out runs/floors [--pairs DIR_OF_27_SETS]

Thin runner over the library: every run is an ordinary reproduce run in OUT/<name>/ (resumable: a
finished run is reused), the activations are harvested once per site and shared. Writes
OUT/summary.json and OUT/summary.md. One seed per configuration: the lift intervals are over the
floors' 20 draws, not over seeds (the medium run has the seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from conca.experiments.options import HarvestOptions, ReproduceConceptsOptions
from conca.experiments.pipeline import run_harvest
from conca.experiments.reproduce import run_reproduce_concepts

METHODS = "topk,conca_layernorm_softplus"
BASE = dict(methods=METHODS, seeds=1, exp_clamps="", ablation=False, downstream=False, tasks="", progress=False)


def configurations(pairs: str) -> dict[str, dict]:
    """name -> the options that differ from the default run (131k tokens, 2x width, 600 steps, final)."""
    grid = {
        "base": {},
        "steps150": {"steps": 150, "warmup_steps": 30},
        "steps2400": {"steps": 2400},
        "width1x": {"expansion": 1},
        "width8x": {"expansion": 8},
        "site_resid8": {"site": "resid.8"},
        "site_resid15": {"site": "resid.15"},
    }
    if pairs:
        grid["pairs_papers27"] = {"pairs": pairs}
    return grid


def store_for(out: Path, site: str, tokens: int) -> str:
    path = out / f"activations_{site}"
    run_harvest(HarvestOptions(out=str(path), sites=site, tokens=tokens, progress=False))
    return str(path)


def row(name: str, results: dict, seconds: float) -> list[dict]:
    rows = []
    for method, m in results["methods"].items():
        lift = m.get("lift", {})
        rows.append({
            "config": name, "method": method, "n_latents": results["n_latents"], "site": results["site"],
            "mpc": m["mpc"], "mpc_heldout": m["mpc_heldout"],
            "untrained_floor": m["floors"]["untrained"]["mpc_heldout"]["mean"],
            "lift_untrained": lift["untrained"]["mpc_heldout"],
            "permutation_floor": m["floors"]["permutation"]["mpc_heldout"]["mean"],
            "lift_permutation": lift["permutation"]["mpc_heldout"],
            "fvu": m["fvu"], "minutes": seconds / 60})
    return rows


def markdown(rows: list[dict]) -> str:
    def iv(e: dict) -> str:
        return f"{e['mean']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]"

    lines = ["| config | method | latents | site | MPC in-sample | held-out MPC | untrained floor | lift (untrained) | "
             "permutation floor | lift (permutation) | FVU |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['config']} | {r['method']} | {r['n_latents']} | {r['site']} | {r['mpc']:.3f} | "
                     f"{r['mpc_heldout']:.3f} | {r['untrained_floor']:.3f} | {iv(r['lift_untrained'])} | "
                     f"{r['permutation_floor']:.3f} | {iv(r['lift_permutation'])} | {r['fvu']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/floors")
    parser.add_argument("--pairs", default="", help="a folder of the papers' 27 A<TAB>B word-pair files (optional)")
    parser.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    defaults = replace(ReproduceConceptsOptions(), **BASE)
    grid = configurations(args.pairs)
    names = [n for n in args.only.split(",") if n] or list(grid)
    summary = out / "summary.json"
    rows = json.loads(summary.read_text()) if summary.exists() else []
    done = {r["config"] for r in rows}
    for name in names:
        if name in done:  # tabulated by an earlier invocation
            continue
        opts = replace(defaults, out=str(out / name), **grid[name])
        opts = replace(opts, activations=store_for(out, opts.site, opts.train_tokens))
        t0 = time.perf_counter()
        results = run_reproduce_concepts(opts, log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
        rows += row(name, results, results.get("elapsed_s", time.perf_counter() - t0))
        (out / "summary.json").write_text(json.dumps(rows, indent=1))
        (out / "summary.md").write_text(markdown(rows))
        print(markdown(rows), flush=True)


if __name__ == "__main__":
    main()
