#!/usr/bin/env bash
# Everything that needs a GPU, in one command, within 8 minutes on one GPU without network:
#
#   bash scripts/gpu_run.sh
#
# 1. builds torchlars against the installed torch (pip install --no-build-isolation --no-deps .);
# 2. runs the CUDA tests of tests/test_triton.py (Triton kernels on the GPU: parity, no sync, CUDA
#    graph replay, aligned kernels and <= 4 launches by torch.profiler, LAMB, a CPU weight-decay tensor);
# 3. runs bench/gpu_checks.py: LARSSGD (Triton), LARS(SGD(foreach=True)) and LARS(SGD(fused=True))
#    against SGD(fused=True) and compiled SGD(foreach=True), and the Triton LAMB against
#    AdamW(fused=True), on ResNet-50's 161 tensors and 996 small tensors, fp32 and bf16, with kernels
#    per step (torch.profiler), a step under set_sync_debug_mode("error"), the host time of a step
#    (gradients kept / reallocated every step), achieved bandwidth, and a CUDA-graph replay against
#    eager; it writes bench/results/step_cuda.{md,json} after every case;
# 4. compiles every kernel specialisation ahead of time at this machine's triton
#    (tests/test_triton_compile.py: no spills, vector loads), then the CUDA tests of the rest of the suite.
# Every stage runs under `timeout`, capped by what is left of the 8 minutes (BUDGET_S), so a
# hang costs only its stage; a failed stage is reported and the next one still runs.
# Without a CUDA device (or with --dry-run) it says what it would measure and runs the benchmark's
# dry run on CPU tensors through Triton's interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The project's environment (scripts/setup.sh's .venv) where the interpreter on PATH has no torch.
if ! $PYTHON -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
fi
BUDGET_S=${BUDGET_S:-470}  # 8 minutes less a margin for the summary
START=$SECONDS

if [ "${1:-}" = "--dry-run" ] || ! $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "scripts/gpu_run.sh: no CUDA device (or --dry-run). On a GPU it would: build torchlars; run the CUDA"
    echo "tests of tests/test_triton.py; run bench/gpu_checks.py (below, what it measures); compile every kernel"
    echo "specialisation (tests/test_triton_compile.py); run the other CUDA tests. The benchmark's dry run:"
    TRITON_INTERPRET=1 TORCHLARS_TRITON_ON_CPU=1 timeout 300 $PYTHON bench/gpu_checks.py --dry-run --no-compile \
        --sets resnet50 --dtype fp32
    exit $?
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

SUMMARY=()
status=0
stage() {  # stage NAME CAP_S COMMAND...: run COMMAND under timeout min(CAP_S, time left)
    local name=$1 cap=$2 left rc t0=$SECONDS
    shift 2
    left=$((BUDGET_S - (SECONDS - START)))
    [ "$cap" -gt "$left" ] && cap=$left
    if [ "$cap" -le 10 ]; then
        SUMMARY+=("$name: skipped (out of time)")
        status=1
        return
    fi
    echo "== $name (timeout ${cap}s): $*"
    timeout --kill-after=10 "$cap" "$@"
    rc=$?
    case $rc in
        0) SUMMARY+=("$name: ok ($((SECONDS - t0)) s)") ;;
        124|137) SUMMARY+=("$name: TIMED OUT after ${cap} s"); status=1 ;;
        *) SUMMARY+=("$name: FAILED rc=$rc ($((SECONDS - t0)) s)"); status=1 ;;
    esac
}

echo "== torch $($PYTHON -c 'import torch; print(torch.__version__, torch.version.cuda)'), triton $($PYTHON -c 'import triton; print(triton.__version__)' 2>&1 | tail -1)"
stage build 200 env CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    $PYTHON -m pip install -q --no-build-isolation --no-deps \
    -C cmake.define.LARS_BUILD_TESTS=OFF -C cmake.define.LARS_BUILD_EXAMPLES=OFF .
if $PYTHON -c "import pytest" 2>/dev/null; then
    # CI=true: a missing extension fails instead of skipping.
    stage tests_triton 90 env CI=true $PYTHON -m pytest -q -p no:cacheprovider tests/test_triton.py -k cuda
fi
mkdir -p bench/results
stage bench 300 $PYTHON bench/gpu_checks.py --out bench/results/step_cuda
if $PYTHON -c "import pytest" 2>/dev/null; then
    stage compile_kernels 60 $PYTHON -m pytest -q -p no:cacheprovider tests/test_triton_compile.py
    stage tests_cuda 60 env CI=true $PYTHON -m pytest -q -p no:cacheprovider tests -k cuda \
        --ignore=tests/test_triton.py
else
    SUMMARY+=("tests: skipped (pytest not installed)")
fi

echo "== summary"
printf '  %s\n' "${SUMMARY[@]}"
echo "== total wall-clock $((SECONDS - START)) s; results in bench/results/step_cuda.{md,json}"
exit $status
