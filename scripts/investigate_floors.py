"""Why do trained dictionaries not beat their chance floors? A grid of `conca reproduce concepts` runs
that changes one thing at a time from the default run (training length, width, site, concept sets, text)
for TopK and LayerNorm ConCA, and tabulates held-out MPC beside both floors.

    python scripts/investigate_floors.py --out runs/floors [--pairs DIR_OF_27_SETS] [--prose PROSE.jsonl]

Thin runner over the library: every run is an ordinary reproduce run in OUT/<name>/ (resumable: a
finished run is skipped, or re-scored with --rerun), the activations are harvested once per site and
shared. Writes OUT/summary.json and OUT/summary.md from every finished run's results.json. One seed per configuration: the lift intervals are over the
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


def configurations(pairs: str, prose: str = "") -> dict[str, dict]:
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
    if prose:  # everyday English (scripts/generate_prose.py) instead of Python documentation
        grid["text_prose"] = {"text": prose}
    return grid


def store_for(out: Path, site: str, tokens: int, text: str) -> str:
    default = HarvestOptions().text
    path = out / (f"activations_{site}" if text == default else f"activations_{site}_{Path(text).stem}")
    run_harvest(HarvestOptions(out=str(path), sites=site, tokens=tokens, text=text, progress=False))
    return str(path)


def row(name: str, results: dict) -> list[dict]:
    rows = []
    for method, m in results["methods"].items():
        lift, floors = m.get("lift", {}), m.get("floors", {})
        rows.append({
            "config": name, "method": method, "n_latents": results["n_latents"], "site": results["site"],
            "concepts": len(results["concepts"]), "mpc": m["mpc"], "mpc_heldout": m["mpc_heldout"],
            "untrained_floor": floors["untrained"]["mpc_heldout"]["mean"],
            "lift_untrained": lift["untrained"]["mpc_heldout"],
            "permutation_floor": floors["permutation"]["mpc_heldout"]["mean"],
            "lift_permutation": lift["permutation"]["mpc_heldout"],
            "direction_recovery": m.get("direction_recovery"),
            "direction_floor": floors["untrained"].get("direction_recovery", {}).get("mean"),
            "lift_direction": lift["untrained"].get("direction_recovery"),
            "fvu": m["fvu"], "minutes": results["elapsed_s"] / 60})
    return rows


def markdown(rows: list[dict]) -> str:
    def iv(e: dict | None) -> str:
        return "—" if not e else f"{e['mean']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]"

    def num(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    lines = ["| config | method | latents | site | concepts | MPC in-sample | held-out MPC | untrained floor | lift "
             "(untrained) | permutation floor | lift (permutation) | direction recovery | untrained | lift | FVU |",
             "|" + "---|" * 15]
    for r in rows:
        lines.append(f"| {r['config']} | {r['method']} | {r['n_latents']} | {r['site']} | {r['concepts']} | {r['mpc']:.3f} | "
                     f"{r['mpc_heldout']:.3f} | {r['untrained_floor']:.3f} | {iv(r['lift_untrained'])} | "
                     f"{r['permutation_floor']:.3f} | {iv(r['lift_permutation'])} | {num(r['direction_recovery'])} | "
                     f"{num(r['direction_floor'])} | {iv(r['lift_direction'])} | {r['fvu']:.3f} |")
    return "\n".join(lines) + "\n"


def tabulate(out: Path, names: list[str]) -> list[dict]:
    """Rows of every configuration whose run has finished (OUT/<name>/results.json), in grid order."""
    rows = []
    for name in names:
        path = out / name / "results.json"
        if path.exists():
            rows += row(name, json.loads(path.read_text()))
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.md").write_text(markdown(rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/floors")
    parser.add_argument("--pairs", default="", help="a folder of the papers' 27 A<TAB>B word-pair files (optional)")
    parser.add_argument("--prose", default="", help="a JSONL corpus of everyday English (scripts/generate_prose.py): "
                                                     "adds the text_prose configuration")
    parser.add_argument("--only", default="", help="comma-separated configuration names, in the order to run (default: all)")
    parser.add_argument("--rerun", action="store_true", help="re-score finished configurations (training is reused)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    defaults = replace(ReproduceConceptsOptions(), **BASE)
    grid = configurations(args.pairs, args.prose)
    names = [n for n in args.only.split(",") if n] or list(grid)
    for name in names:
        if (out / name / "results.json").exists() and not args.rerun:
            continue
        for cached in (out / name / "runs").glob("seed*/scores.json") if args.rerun else ():
            cached.unlink()  # the dictionaries stay: only the scores are computed again
        opts = replace(defaults, out=str(out / name), **grid[name])
        opts = replace(opts, activations=store_for(out, opts.site, opts.train_tokens, opts.text))
        run_reproduce_concepts(opts, log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
        print(markdown(tabulate(out, list(grid))), flush=True)
    print(markdown(tabulate(out, list(grid))), flush=True)


if __name__ == "__main__":
    main()
