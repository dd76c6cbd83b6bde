#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a machine with a CUDA torch installed:
#
#   bash scripts/gpu_run.sh            # the full benchmark (about 10 min on one H100)
#   bash scripts/gpu_run.sh --quick    # a first look
#
# 1. builds torchlars (liblars, the custom operators, torchlars._C) against the installed
#    torch, with the C++ tests when GoogleTest is installed;
# 2. runs the test suite with CI=true, so the CUDA tests run (sync-free step, CUDA graph
#    capture, side streams), and ctest, when pytest / GoogleTest are there;
# 3. runs bench/bench_step.py on CUDA: the step times and targets, host syncs, CUDA graph
#    replay and kernel launches, written to bench/results/step_cuda.{md,json,png};
# 4. builds and runs the Google Benchmark of bench/cpp on CUDA when Google Benchmark is
#    installed, written to bench/results/cpp_cuda.{txt,json}.
# Nothing is downloaded: a GPU machine without network access keeps what it has, and a
# step whose tool is missing says so and is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
QUICK=()
[ "${1:-}" = "--quick" ] && QUICK=(--quick)

$PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'scripts/gpu_run.sh: torch sees no CUDA device')"

has_cmake_package() {  # a CMake package config installed system-wide (Debian's -dev packages)
    compgen -G "/usr/lib/*/cmake/$1" >/dev/null || compgen -G "/usr/lib/cmake/$1" >/dev/null \
        || compgen -G "/usr/local/lib*/cmake/$1" >/dev/null
}
TESTS=OFF
if has_cmake_package GTest; then TESTS=ON; else echo "== GoogleTest not installed: no C++ tests"; fi

echo "== build against $($PYTHON -c 'import torch; print(torch.__version__)')"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-8} $PYTHON -m pip install -q --no-build-isolation \
    --no-deps -C cmake.define.LARS_BUILD_TESTS=$TESTS -C cmake.define.LARS_BUILD_EXAMPLES=ON .

status=0
if [ "$TESTS" = ON ]; then
    echo "== ctest"
    ctest --test-dir build/python --output-on-failure || status=1
fi
if $PYTHON -c "import pytest" 2>/dev/null; then
    echo "== pytest (CI=true: a missing extension fails instead of skipping)"
    CI=true $PYTHON -m pytest -q tests || status=1
else
    echo "== pytest not installed: no Python tests"
fi

echo "== bench/bench_step.py --device cuda ${QUICK[*]}"
$PYTHON bench/bench_step.py --device cuda "${QUICK[@]}" --out bench/results/step_cuda || status=1

if has_cmake_package benchmark; then
    echo "== Google Benchmark (bench/cpp)"
    prefix=$($PYTHON -c 'import torchlars; print(torchlars.cmake_prefix_path)')
    cmake -S bench/cpp -B build/bench-cuda -G Ninja -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
    cmake --build build/bench-cuda
    build/bench-cuda/bench_lars --benchmark_min_time=0.5 \
        --benchmark_out=bench/results/cpp_cuda.json --benchmark_out_format=json \
        | tee bench/results/cpp_cuda.txt || status=1
else
    echo "== Google Benchmark not installed (Debian: libbenchmark-dev): no C++ benchmark"
fi
exit $status
