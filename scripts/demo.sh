#!/usr/bin/env bash
# The main job: the demo's set-up (setup.sh --demo: torch and the demo's packages, no build),
# then the large-batch demo, python -m torchlars.demo, with any arguments given (e.g. --full,
# --out-dir DIR, --device cuda). torchlars runs from the source tree: its Python optimizers
# are all the demo uses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --demo
source scripts/_python.sh
PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m torchlars.demo "$@"
