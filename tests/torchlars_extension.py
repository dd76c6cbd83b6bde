"""The C++ pieces of torchlars for the tests that need them.

Running from the source tree (PYTHONPATH=python) there is no torchlars._C, and those tests
skip; in CI (CI set), where the package is installed, a missing extension is a failure.
"""

import importlib
import os

import pytest


def import_extension(module_name):
    if os.environ.get("CI"):
        return importlib.import_module(module_name)
    # exc_type: torchlars._extension turns the missing torchlars._C into a plain ImportError,
    # which pytest >= 9 no longer skips on by default (only ModuleNotFoundError).
    return pytest.importorskip(
        module_name,
        reason="torchlars._C is not built; install with `pip install --no-build-isolation .`",
        exc_type=ImportError,
    )
