"""Shared pieces of the benchmarks: machine facts, the measured matmul peak, cached real
activations, child-process runs for peak memory, and JSON + markdown output.

Timings belong here, never in the test suite."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_CACHE = Path(os.environ.get("CONCA_BENCH_CACHE", "/tmp/conca_bench"))


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(dtype: torch.dtype, device: torch.device, size: int = 4096, shape: tuple[int, int, int] | None = None,
                 repeats: int = 5) -> float:
    """Achieved FLOP/s of a dense GEMM (best of `repeats`): the machine's matmul ceiling."""
    m, k, n = shape or (size, size, size)
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def real_activations(cache: Path, split: str, tokens: int, site: str = "final") -> torch.Tensor:
    """(tokens, d) activations of the default model on the default corpus, harvested once with
    `conca harvest` into `cache` and reused."""
    from conca.activations.stream import open_source, read_rows
    from conca.experiments.pipeline import HarvestOptions, run_harvest

    out = cache / f"acts_{split}"
    store_ok = (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text()).get("complete")
    if not store_ok or sum(open_source(out, site=site).chunk_sizes) < tokens:
        run_harvest(HarvestOptions(out=str(out), tokens=tokens, split=split, sites=site, progress=False))
    return read_rows(open_source(out, site=site), tokens)


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, spec: dict, timeout: int = 3600) -> dict:
    """Run `script --worker JSON` in a fresh process (so that its peak memory is its own) and
    return the JSON it prints last."""
    out = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({spec}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(out_dir: Path, name: str, payload: dict, tables: list[tuple[str, list[str], list[list]]],
                  notes: list[str] = ()) -> tuple[Path, Path]:
    """OUT/NAME.json (everything) and OUT/NAME.md (the tables, then the notes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# {name}", "", f"{payload['time']} · {payload['machine']['cpu']} · {payload['machine']['cpu_count']} CPUs · "
             f"torch {payload['machine']['torch']} · GPU: {payload['machine']['cuda'] or 'none'}", ""]
    for title, header, rows in tables:
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
        lines.append("")
    lines += [f"- {note}" for note in notes]
    md_path = out_dir / f"{name}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)
