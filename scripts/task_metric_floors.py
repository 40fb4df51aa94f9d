"""SAEBench's SCR, TPP and first-letter absorption for saved dictionaries, each beside untrained
dictionaries of the same method and config (the floor SAEBench does not report).

    python scripts/task_metric_floors.py DICT_DIR [DICT_DIR ...] --out OUT.json [--untrained 3] [--absorption true]

Every dictionary must read the same model and site (recorded in its config.json). An untrained
dictionary is a fresh initialisation (seeds 0..N-1) of the trained one's method and config, with the
trained one's input scale folded in, so it sees the activations at the same scale as the trained
one, and with the inference state training sets from data (BatchTopK's threshold, BatchNorm's running
statistics) set on the first 32 contexts of the SCR texts (`Dictionary.calibrate`). The model runs
once per metric for all of them (`scr_tpp_on_model`, `absorption_on_model`).
Thin runner over the library; writes OUT.json (every result) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from conca.dictionaries.base import create, load_dictionary, read_meta
from conca.dictionaries.provenance import read_recorded
from conca.evaluation.absorption_data import absorption_on_model
from conca.evaluation.scr_data import load_scr_dataset, scr_tpp_on_model
from conca.evaluation.scr_tpp import N_VALUES
from conca.fileio import atomic_write_json
from conca.models.capture import site_activations
from conca.models.load import load_model
from conca.text.batching import tokenize_contexts


def untrained_like(path: Path, seed: int):
    """A fresh dictionary of the saved one's method and config, its input scale folded in."""
    meta = read_meta(path / "config.json")
    torch.manual_seed(seed)
    dictionary = create(meta["method"], **meta["config"])
    scale = meta.get("input_scale_folded")
    if scale:
        dictionary.fold_input_scale(float(scale))
    return dictionary.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dictionaries", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--untrained", type=int, default=3, help="untrained draws per dictionary")
    parser.add_argument("--absorption", default="true", choices=("true", "false"))
    args = parser.parse_args()
    recorded = [read_recorded(p) for p in args.dictionaries]
    if len({(r.model, r.site) for r in recorded}) != 1:
        raise SystemExit("task_metric_floors: error: the dictionaries read different models or sites")
    model, site = recorded[0].model, recorded[0].site
    loaded = load_model(model)
    texts = [row["text"] for row in load_scr_dataset()]
    calibration = site_activations(loaded, tokenize_contexts(texts, loaded.tokenizer, max_contexts=32), site)
    dictionaries = {}
    for path in args.dictionaries:
        name = f"{path.parent.name}/{path.name}"
        dictionaries[name] = load_dictionary(path).eval()
        for seed in range(args.untrained):
            dictionaries[f"untrained {name} #{seed}"] = untrained_like(path, seed).calibrate(calibration)
    started = time.perf_counter()
    results = {"model": loaded.name, "site": site, "n_values": list(N_VALUES), "untrained_draws": args.untrained,
               "scr_tpp": scr_tpp_on_model(loaded, site, dictionaries)}
    results["scr_tpp_s"] = time.perf_counter() - started
    if args.absorption == "true":
        started = time.perf_counter()
        results["absorption"] = absorption_on_model(loaded, site, dictionaries)
        results["absorption_s"] = time.perf_counter() - started
    atomic_write_json(args.out, results)
    print(table(results))


def table(results: dict) -> str:
    n_values = results["n_values"]
    lines = ["| dictionary | " + " | ".join(f"SCR N={n}" for n in n_values) + " | "
             + " | ".join(f"TPP N={n}" for n in n_values) + " | absorption fraction | full absorption |",
             "|---|" + "---|" * (2 * len(n_values) + 2)]
    for name, r in results["scr_tpp"].items():
        scr = [f"{r['scr'].get(f'scr_metric_threshold_{n}', float('nan')):.3f}" for n in n_values]
        tpp = [f"{r['tpp'].get(f'tpp_threshold_{n}_total_metric', float('nan')):.3f}" for n in n_values]
        ab = results.get("absorption", {}).get(name, {})
        cells = [f"{ab[k]:.3f}" if isinstance(ab.get(k), float) else "" for k in
                 ("mean_absorption_fraction_score", "mean_full_absorption_score")]
        lines.append(f"| {name} | " + " | ".join(scr + tpp + cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
