#!/usr/bin/env bash
# The main job: the demo's set-up (setup.sh --demo: idempotent, without the C++ tests and
# examples), then the large-batch demo, python -m torchlars.demo, with any arguments given
# (e.g. --full, --out-dir DIR, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --demo
source scripts/_python.sh
exec "$PY" -m torchlars.demo "$@"
