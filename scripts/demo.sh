#!/usr/bin/env bash
# Set up and run the demo on the embedded default model: bash scripts/demo.sh [conca demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m conca.cli demo --out demo_out "$@"
