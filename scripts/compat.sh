#!/usr/bin/env bash
# The whole suite (C++ and Python) on other torch releases than CI's 2.13: for each version
# given (default: the newest this project claims to support and the oldest), a fresh venv in
# build/compat/torch-VERSION with that torch from PyPI as pip resolves it (on Linux, the CUDA
# build), torchlars built against it, then scripts/test.sh. The CUDA builds run on the CPU
# when the machine has no GPU. A summary line per version is appended to build/compat/results.txt.
#
#   bash scripts/compat.sh                 # 2.14.1 and 2.11.0
#   bash scripts/compat.sh 2.12.0          # one version
set -uo pipefail
cd "$(dirname "$0")/.."
BASE_PY=${PYTHON:-python3}
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(2.14.1 2.11.0)
mkdir -p build/compat
status=0
for version in "${versions[@]}"; do
    venv="build/compat/torch-$version"
    log="build/compat/torch-$version.log"
    echo "== torch $version: $venv (log: $log)"
    start=$(date +%s)
    {
        [ -x "$venv/bin/python" ] || "$BASE_PY" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$version"
        # Its own build tree: build/python belongs to the main environment.
        PYTHON="$venv/bin/python" LARS_BUILD_DIR="build/compat/build-$version" bash scripts/test.sh
    } >"$log" 2>&1
    result=$?
    summary=$(grep -E "^[0-9]+ passed|passed|failed|error" "$log" | grep -E "passed|failed" | tail -1)
    ctest_line=$(grep -E "tests passed|tests failed" "$log" | tail -1)
    line="torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "$version (not installed)"), $(g++ -dumpfullversion 2>/dev/null | sed 's/^/g++ /'), $(cmake --version | head -1): ctest: ${ctest_line:-none}; pytest: ${summary:-none}; exit $result; $(( $(date +%s) - start )) s"
    echo "$line" | tee -a build/compat/results.txt
    [ $result -eq 0 ] || status=1
done
exit $status
