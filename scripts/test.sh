#!/usr/bin/env bash
# Run every test: the C++ suite (ctest, in the build tree scripts/setup.sh's pip install
# left in build/python, so nothing compiles twice), then the Python suite (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ctest --test-dir build/python --output-on-failure --no-tests=error
$PYTHON -m pytest -q tests "$@"
