"""How long `conca --help` and `conca CMD --help` take, beside a bare Python start in the same run.

    python benchmarks/bench_cli.py --out benchmarks/results/ [--runs 9]

Building the parser must not import torch or transformers (tests/cli/test_cli.py checks the
imports); this measures what that buys in wall time. Medians over --runs fresh processes."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

COMMANDS = {"python -c pass": ["-c", "pass"], "conca --help": ["-m", "conca.cli", "--help"],
            "conca train --help": ["-m", "conca.cli", "train", "--help"],
            "conca reproduce concepts --help": ["-m", "conca.cli", "reproduce", "concepts", "--help"]}


def wall_seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    times = {name: [] for name in COMMANDS}
    for _ in range(args.runs):  # interleaved, so a change in load touches every command alike
        for name, command in COMMANDS.items():
            times[name].append(wall_seconds(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    bare = medians["python -c pass"]
    rows = [[name, round(medians[name], 3), round(medians[name] - bare, 3)] for name in COMMANDS]
    write_results(args.out, "bench_cli", {"runs": args.runs, "seconds": times, "median_s": medians},
                  [("Wall time of a fresh process (median)", ["command", "median s", "over bare python s"], rows)],
                  notes=[f"{args.runs} runs each, interleaved; goal: conca --help under 0.5 s"])
    print("\n".join(f"{name}: {medians[name]:.3f} s" for name in COMMANDS))


if __name__ == "__main__":
    main()
