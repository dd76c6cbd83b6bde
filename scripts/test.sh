#!/usr/bin/env bash
# Run every test: the Python suite (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
$PYTHON -m pytest -q tests "$@"
