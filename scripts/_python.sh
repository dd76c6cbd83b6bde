# Sourced by the scripts of this folder: sets PY to the Python that torchlars is set up in.
#
# - $PYTHON if given, else `python3` (the active venv's or conda env's, when one is active);
# - an interpreter that is not inside an environment (a system Python, which PEP 668 may close
#   to pip; a bare pyenv build) gets a project environment, .venv, made with it. It sees that
#   interpreter's packages (--system-site-packages), so a CUDA torch already installed there,
#   as on a GPU machine, is kept and used.

in_environment() {  # a venv (sys.prefix differs from the base) or a conda env
    "$1" -c 'import os, sys; sys.exit(0 if sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta")) else 1)'
}

BASE_PY=${PYTHON:-python3}
if ! command -v "$BASE_PY" >/dev/null; then
    echo "scripts: no $BASE_PY on PATH; install Python >= 3.10, or set PYTHON=/path/to/python" >&2
    exit 1
fi
if in_environment "$BASE_PY"; then
    PY=$(command -v "$BASE_PY")
else
    PY="$PWD/.venv/bin/python"
fi

# The scikit-build-core build tree (pyproject.toml's build-dir), where ctest runs.
BUILD_DIR=${LARS_BUILD_DIR:-build/python}
