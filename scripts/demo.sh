#!/usr/bin/env bash
# The main job: set-up (idempotent; see setup.sh), then the large-batch demo, python -m
# torchlars.demo, with any arguments given (e.g. --full, --out-dir DIR, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/_python.sh
exec "$PY" -m torchlars.demo "$@"
