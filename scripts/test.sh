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
# Inductor's cache of compiled kernels, kept in the build tree: a shared /tmp cache filled by
# runs with other settings (ATEN_CPU_CAPABILITY, another torch) once aborted the suite here.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$(cd "$BUILD_DIR" && pwd)/inductor-cache}"
CI=true "$PY" -m pytest -q tests "$@"
