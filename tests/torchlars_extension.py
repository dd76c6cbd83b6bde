"""The C++ pieces of torchlars for the tests that need them.

Running from the source tree (PYTHONPATH=python) there is no torchlars._C, and those tests
skip; in CI (CI set), where the package is installed, a missing extension is a failure.
"""

import importlib
import inspect
import os
import subprocess
import sys

import pytest
import torch


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


def assert_same_bits_on_every_cpu_capability(steps_on, inputs, tmp_path):
    """``steps_on(inputs)`` (a module-level function of a test file: it runs again by name in a
    fresh process) gives the same bits under ATen's default and AVX2 builds as under this
    machine's best one: liblars builds its kernels for each and runs the one torch runs
    (``ATEN_CPU_CAPABILITY`` picks it)."""
    torch.save(inputs, tmp_path / "inputs.pt")
    native = steps_on(inputs)
    source = inspect.getfile(steps_on)
    module = os.path.splitext(os.path.basename(source))[0]
    run = (f"import sys, torch; sys.path.insert(0, sys.argv[3]); from {module} import {steps_on.__name__} as steps_on; "
           "torch.save(steps_on(torch.load(sys.argv[1])), sys.argv[2])")
    for capability in ("default", "avx2"):
        path = tmp_path / f"{capability}.pt"
        subprocess.run([sys.executable, "-c", run, str(tmp_path / "inputs.pt"), str(path), os.path.dirname(source)],
                       env=dict(os.environ, ATEN_CPU_CAPABILITY=capability), check=True)
        results = torch.load(path)
        assert len(results) == len(native) > 0
        for actual, expected in zip(results, native):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
