#!/usr/bin/env bash
# Every test, from any state: set-up (idempotent; see setup.sh), then the C++ suite (ctest, in
# the build tree that set-up left in $BUILD_DIR) and the Python suite (pytest, with CI=true
# so that a missing C++ extension fails instead of skipping). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/_python.sh
echo "== ctest"
ctest --test-dir "$BUILD_DIR" --output-on-failure --no-tests=error
echo "== pytest"
CI=true "$PY" -m pytest -q tests "$@"
