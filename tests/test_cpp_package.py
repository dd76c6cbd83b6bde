"""The installed liblars as a C++ user gets it: torchlars.cmake_prefix_path, then, in a
separate CMake project, find_package(lars) and lars::lars (which bring libtorch along)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import torchlars
from torchlars import LARS
from torchlars_extension import import_extension

import_extension("torchlars._C")  # the C++ pieces are installed with it
cpp = import_extension("torchlars.cpp")

CONSUMER = Path(__file__).resolve().parents[1] / "cpp" / "tests" / "find_package_consumer"


def run(command):
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_cmake_prefix_path_holds_the_package():
    prefix = Path(torchlars.cmake_prefix_path)
    assert (prefix / "lib" / "cmake" / "lars" / "larsConfig.cmake").is_file()
    assert (prefix / "include" / "lars" / "lars.h").is_file()


def test_find_package_builds_and_runs_a_separate_project(tmp_path):
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    # Only the lars prefix: its package config must find Torch by itself.
    run(["cmake", "-S", str(CONSUMER), "-B", str(tmp_path), *generator, "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={torchlars.cmake_prefix_path}"])
    run(["cmake", "--build", str(tmp_path)])
    printed = run([str(tmp_path / "lars_consumer")])

    # The same step through the Python LARS (main.cpp: w = [3, 4], g = [0, 10]).
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.0, 10.0])
    LARS(torch.optim.SGD([w], lr=1.0), trust_coef=0.1, eps=0.0).step()
    lars_line, lamb_line = printed.splitlines()
    assert [float(value) for value in lars_line.split()] == w.tolist()

    # And LAMB (v = [3, 4], g = [0, 10]) through torchlars.cpp.LAMB, the same library.
    v = torch.tensor([3.0, 4.0])
    v.grad = torch.tensor([0.0, 10.0])
    cpp.LAMB([v], lr=0.1, weight_decay=0.01).step()
    assert [float(value) for value in lamb_line.split()] == pytest.approx(v.tolist(), rel=1e-5)
