#!/usr/bin/env bash
# Set up a fresh machine: system packages, a pinned CPU torch, and torchlars built against it.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null && ! dpkg -s libgtest-dev libbenchmark-dev >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq cmake ninja-build libgtest-dev libbenchmark-dev >/dev/null
fi

PYTHON=${PYTHON:-python3}
# Keep a torch that is already there (the CUDA build on a GPU machine); otherwise pin the
# CPU build, since an unpinned torch would pull a multi-GB CUDA wheel.
if ! $PYTHON -c "import torch" 2>/dev/null; then
    $PYTHON -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
$PYTHON -m pip install -q "scikit-build-core>=0.10" pytest mnist1d matplotlib tqdm
# One build, kept in build/python: the wheel, and the C++ tests and example that
# scripts/test.sh runs with ctest there.
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} $PYTHON -m pip install -q --no-build-isolation \
    -C cmake.define.LARS_BUILD_TESTS=ON -C cmake.define.LARS_BUILD_EXAMPLES=ON .
