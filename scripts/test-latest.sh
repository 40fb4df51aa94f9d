#!/usr/bin/env bash
# Drift check: install the newest releases of conca's dependencies (no constraints.txt) into a
# fresh virtual environment and run the test suite there, so that a new upstream release that
# breaks conca is seen here before users see it. torch stays at the CPU build of 2.13.0 (set
# TORCH_VERSION to try another). Usage: bash scripts/test-latest.sh [pytest options]
# The venv is made in a temporary folder and removed afterwards (VENV=DIR keeps it there).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-$(mktemp -d)/venv}
[ -n "${VENV:-}" ] || trap 'rm -rf "$(dirname "$venv")"' EXIT
"${PYTHON:-python3}" -m venv "$venv"
export PYTHON="$venv/bin/python"
LOCK=none EXTRAS=test,interop bash scripts/install.sh
echo "newest releases installed (differences from constraints.txt):"
# pip freeze spells names as published (pydantic_core): normalise them as constraints.txt does
"$PYTHON" -m pip freeze --exclude-editable | sed 's/==/ ==/' | awk '{n=$1; gsub(/[_.]/,"-",n); print tolower(n) $2}' | sed 's/+.*//' | sort > "$(dirname "$venv")/latest.txt"
grep -v '^#' constraints.txt | sort | comm -13 - "$(dirname "$venv")/latest.txt" | sed 's/^/  /' || true
"$PYTHON" -m pytest -q -p no:cacheprovider "$@"
