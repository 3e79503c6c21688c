#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU. pytest exits non-zero (5) if it collects nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # idle OpenMP threads sleep instead of spinning on a busy CPU
python -m pytest -q "$@"
