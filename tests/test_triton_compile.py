"""Every Triton kernel of torchlars._triton compiled ahead of time for real GPUs, with no GPU (issue 24).

The interpreter tests (tests/test_triton.py) run the kernels' logic on CPU tensors; this compiles
their specialisations for NVIDIA sm_80 and sm_90 (and AMD gfx942 where the installed triton can),
as a GPU would at its first launch, and reads what ptxas makes of them: no spills, and 16-byte
vector loads in the ALIGNED specialisation. The specialisations come from the kernels' own flag
table, ``_triton.KERNEL_FLAGS``: on sm_90 every flag is flipped alone from all-off and from all-on
(so each branch of each flag compiles, both lr kinds and both weight-decay kinds among them), in
fp32; the other dtypes and targets compile all-off and all-on.
"""

import importlib.util
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs `pip install triton`")

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Types of the kernels' runtime arguments, by name.
_ARGUMENT_TYPES = {
    **dict.fromkeys(("numels", "chunk_tensor", "chunk_index", "addresses", "first_chunk"), "*i64"),
    "num_tensors": "i32",
    **dict.fromkeys(("partials", "ratios", "grad_scale", "found_inf", "lr_tensor", "weight_decay_tensor"), "*fp32"),
    **dict.fromkeys(("weight_decay", "sign", "lr", "momentum", "dampening", "eps", "trust_coef", "beta1", "beta2",
                     "log_beta1", "log_beta2"), "fp32"),
}

_COMPILER = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchlars import _triton

jobs = json.load(sys.stdin)
kernels = {kernel.__name__: kernel for kernel in _triton.KERNEL_FLAGS}
try:  # the ptxas triton itself runs for this architecture (3.9 ships two)
    from triton.backends.nvidia.compiler import get_ptxas
except ImportError:
    get_ptxas = None
results = []
for job in jobs:
    kernel = kernels[job["kernel"]]
    names = kernel.arg_names
    signature = {name: job["signature"].get(name, "constexpr") for name in names}
    attrs = {(names.index("like"),): [["tt.divisibility", 16]]} if "like" in names else {}
    source = ASTSource(kernel, signature, job["constexprs"], attrs)
    if job["target"][0] == "cuda":
        target = GPUTarget("cuda", job["target"][1], 32)
    else:
        target = GPUTarget("hip", job["target"][1], 64)
    compiled = triton.compile(source, target=target, options={"num_warps": job["num_warps"]})
    result = {"job": job}
    if "ptx" in compiled.asm:
        ptx = compiled.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as file:
            file.write(ptx)
            file.flush()
            arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
            ptxas = get_ptxas(job["target"][1]).path if get_ptxas else os.path.join(
                os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
            done = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", file.name, "-o", os.devnull],
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr)
            report = done.stderr
        result["registers"] = int(re.search(r"Used (\d+) registers", report).group(1))
        result["spills"] = sum(int(n) for n in re.findall(r"(\d+) bytes spill", report))
        result["vector_loads"] = sorted(set(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.\w+", ptx)))
    else:
        result["binary"] = bool(compiled.asm.get("hsaco"))
    results.append(result)
json.dump(results, sys.stdout)
'''


_DESCRIBE = (
    "import json\nfrom torchlars import _triton\n"
    "print(json.dumps({'kernels': [[k.__name__, k.arg_names, list(f)] for k, f in _triton.KERNEL_FLAGS.items()],"
    " 'BLOCK': _triton.BLOCK, 'NUM_WARPS': _triton.NUM_WARPS, 'PARTIALS_BLOCK': _triton.PARTIALS_BLOCK,"
    " 'ALIGNMENT': _triton.ALIGNMENT}))\n"
)


def _run(code: str, stdin: str = "") -> str:
    """Run ``code`` in a fresh Python that imports the same torchlars as this one, with real (not
    interpreted) kernels."""
    interpreter = ("TRITON_INTERPRET", "TORCHLARS_TRITON_ON_CPU")
    env = {key: value for key, value in os.environ.items() if key not in interpreter}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set, so that triton 3.9 does not warn
    import torchlars

    package_root = str(pathlib.Path(torchlars.__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _flag_settings(flags: list[str], covering: bool) -> list[dict]:
    """All-off and all-on, and with ``covering`` each flag flipped alone from each."""
    settings = [dict.fromkeys(flags, False), dict.fromkeys(flags, True)]
    if covering:
        for flag, base in itertools.product(flags, (False, True)):
            setting = dict.fromkeys(flags, base)
            setting[flag] = not base
            settings.append(setting)
    unique = []
    for setting in settings:
        if setting not in unique:
            unique.append(setting)
    return unique


def _jobs(target: tuple) -> list[dict]:
    table = json.loads(_run(_DESCRIBE))
    dtypes = [torch.float32] if target[0] == "hip" else list(_DTYPE_NAMES)
    jobs = []
    for name, arg_names, flags in table["kernels"]:
        elementwise = "like" in arg_names
        for dtype in dtypes if elementwise else [torch.float32]:
            covering = target == ("cuda", 90) and dtype == torch.float32
            for setting in _flag_settings(flags, covering):
                constexprs = dict(setting)
                signature = {arg: _ARGUMENT_TYPES[arg] for arg in arg_names if arg in _ARGUMENT_TYPES}
                if elementwise:
                    constexprs.update(VEC=table["ALIGNMENT"] // dtype.itemsize, BLOCK=table["BLOCK"])
                    signature["like"] = "*" + _DTYPE_NAMES[dtype]
                else:
                    constexprs.update(PARTIALS_BLOCK=table["PARTIALS_BLOCK"])
                jobs.append({"kernel": name, "target": list(target), "signature": signature, "constexprs": constexprs,
                             "num_warps": table["NUM_WARPS"] if elementwise else 4, "dtype": _DTYPE_NAMES[dtype]})
    return jobs


def _hip_compiles() -> bool:
    import triton.backends

    return "amd" in triton.backends.backends


@pytest.mark.parametrize("target", [("cuda", 90), ("cuda", 80), ("hip", "gfx942")], ids=["sm_90", "sm_80", "gfx942"])
def test_every_kernel_compiles_without_spills(target):
    if target[0] == "hip" and not _hip_compiles():
        pytest.skip("this triton has no AMD backend")
    results = json.loads(_run(_COMPILER, json.dumps(_jobs(target))))
    assert results
    seen = {(r["job"]["kernel"], flag, r["job"]["constexprs"][flag]) for r in results for flag in r["job"]["constexprs"]
            if isinstance(r["job"]["constexprs"][flag], bool)}
    for flag in ("LR_IS_TENSOR", "WEIGHT_DECAY_IS_TENSOR"):
        for value in (False, True):
            assert ("_lars_sgd_kernel", flag, value) in seen and ("_trust_ratio_kernel", flag, value) in seen
    if target[0] == "hip":
        assert all(r["binary"] for r in results)
        return
    lines = []
    for result in results:
        job = result["job"]
        flags = ",".join(k for k, v in job["constexprs"].items() if v is True) or "-"
        lines.append(f"{job['kernel']} {job['dtype']} {flags}: {result['registers']} registers, "
                     f"{result['spills']} bytes spilled")
        assert result["spills"] == 0, lines[-1]
        if job["constexprs"].get("ALIGNED"):
            assert result["vector_loads"], f"no 16-byte loads in {lines[-1]}"
    print("\n".join(lines))
