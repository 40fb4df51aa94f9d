#!/usr/bin/env bash
# Set up and run the test suite: bash scripts/test.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test,interop bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
