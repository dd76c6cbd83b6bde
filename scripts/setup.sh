#!/usr/bin/env bash
# Set up a machine for torchlars, idempotently: system packages, a Python environment (the
# active one, else .venv, see _python.sh), torch (kept if there; else the CPU build of
# $TORCH_VERSION), and torchlars built against that torch with its C++ tests and examples.
#
# `setup.sh --demo` (what scripts/demo.sh runs) sets up only what the demo needs: torch and the
# demo's few packages. The demo runs torchlars from the source tree (python/), whose pure-Python
# optimizers need no build, so a first run does not wait for the C++ build; scripts/test.sh
# builds and installs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
demo_only=false
case "${1:-}" in
    --demo) demo_only=true ;;
    "") ;;
    *) echo "setup.sh: unknown argument $1 (the only option is --demo)" >&2; exit 2 ;;
esac

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_packages=()
if command -v apt-get >/dev/null; then
    packages=()
    $demo_only || packages+=(g++ cmake ninja-build libgtest-dev libbenchmark-dev)
    for package in "${packages[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || apt_packages+=("$package")
    done
    # A system Python needs its venv module from Debian, and its headers for the build.
    if [ "$PY" = "$PWD/.venv/bin/python" ] && [ ! -x "$PY" ] && ! "$BASE_PY" -c "import ensurepip" 2>/dev/null; then
        apt_packages+=("python3-venv")
    fi
    if ! $demo_only && ! "$BASE_PY" -c 'import os, sysconfig, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)'; then
        apt_packages+=("python3-dev")
    fi
    if [ ${#apt_packages[@]} -gt 0 ]; then
        echo "== apt-get install ${apt_packages[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
    fi
fi

if [ ! -x "$PY" ]; then
    echo "== creating .venv with $BASE_PY (no Python environment is active)"
    "$BASE_PY" -m venv --system-site-packages .venv
fi
echo "== Python: $PY"

pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
    # The CPU build: PyPI's Linux torch is the CUDA build, several GB. PyTorch's CPU index
    # serves +cpu builds (a local wheel store configured for pip may serve them too).
    echo "== installing torch==$TORCH_VERSION+cpu"
    pip_install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
        || pip_install "torch==$TORCH_VERSION+cpu" --index-url https://download.pytorch.org/whl/cpu \
               --extra-index-url https://pypi.org/simple \
        || pip_install "torch==$TORCH_VERSION"
fi
echo "== torch $("$PY" -W ignore -c 'import torch; print(torch.__version__)')"
if $demo_only; then
    pip_install mnist1d matplotlib tqdm
    exit 0
fi
# triton: tests/test_triton.py runs the Triton kernels on the CPU through Triton's interpreter.
# A triton already there (the one of a CUDA torch) is kept.
python_packages=("scikit-build-core>=0.10" mnist1d matplotlib tqdm pytest)
"$PY" -c "import triton" 2>/dev/null || python_packages+=("triton==3.9.0")
pip_install "${python_packages[@]}"
# One build, kept in $BUILD_DIR (incremental on a rerun): the package, and the C++ tests and
# examples that scripts/test.sh runs with ctest there.
echo "== building torchlars with its C++ tests and examples"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} pip_install --no-build-isolation --no-deps \
    --config-settings=build-dir="$BUILD_DIR" --config-settings=cmake.define.LARS_BUILD_TESTS=ON \
    --config-settings=cmake.define.LARS_BUILD_EXAMPLES=ON .
