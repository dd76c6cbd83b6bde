"""Host time of a Triton step's launch logic when gradients move, on this CPU (issue 24).

A step of ``torchlars._triton.lars_sgd_`` on ResNet-50's 161 parameter shapes, CPU tensors taking
the Triton path (``TRITON_INTERPRET=1 TORCHLARS_TRITON_ON_CPU=1``, set here), with the kernel
launches replaced by nothing: the interpreter would take seconds per kernel, and what this measures
is the host's own work per step (the step's Python, the tables, the scalars), which a GPU step
pays whatever its kernels cost. Two cases, interleaved round by round:

- ``in place``: the gradients keep their storage (``zero_grad(set_to_none=False)``): nothing is
  built or uploaded;
- ``new addresses``: every step sees freshly allocated gradients (``zero_grad()``'s default, then a
  backward): the address table is refreshed (one int64 write, and on a GPU one upload).

It also times ``tables_for`` alone, both ways, and a first step (building the chunk table).

    python bench/bench_triton_host.py [--rounds 15 --steps 50] [--out bench/results/triton_host_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
os.environ["TORCHLARS_TRITON_ON_CPU"] = "1"

import torch  # noqa: E402

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from param_sets import PARAM_SETS  # noqa: E402
from torchlars import _triton  # noqa: E402
from torchlars._functional import LARSSettings, MomentumSGD  # noqa: E402

LARS = LARSSettings(eps=1e-8, trust_coef=1e-3)
SGD = MomentumSGD(lr=0.1, weight_decay=1e-4, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)


def timed(step, fresh_grads, grads, steps: int) -> float:
    """Median seconds of ``steps`` calls of ``step(grads)``; with ``fresh_grads`` every call gets new
    gradient tensors (allocated outside the timed region)."""
    times = []
    for _ in range(steps):
        if fresh_grads:
            grads = [torch.empty_like(g) for g in grads]
        start = time.perf_counter()
        step(grads)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = PARAM_SETS["resnet50"]()
    params = [torch.zeros(shape) for shape in shapes]
    grads = [torch.zeros(shape) for shape in shapes]
    buffers = [torch.zeros(shape) for shape in shapes]

    _triton._launch = lambda kernel, grid, *args, **constexprs: None  # the host's work only
    first = time.perf_counter()
    _triton.lars_sgd_(params, grads, buffers, LARS, SGD, first_step=True, grad_scale=None, found_inf=None)
    first = time.perf_counter() - first

    def step(step_grads):
        _triton.lars_sgd_(params, step_grads, buffers, LARS, SGD, first_step=False, grad_scale=None, found_inf=None)

    def tables(step_grads):
        _triton.tables_for(params, step_grads, buffers, job="lars_sgd")

    rows = {name: [] for name in ("step, in place", "step, new addresses", "tables_for, in place",
                                  "tables_for, new addresses")}
    uploads = _triton.address_uploads
    built = _triton.chunk_tables_built
    for _ in range(args.rounds):
        rows["step, in place"].append(timed(step, False, grads, args.steps))
        rows["step, new addresses"].append(timed(step, True, grads, args.steps))
        rows["tables_for, in place"].append(timed(tables, False, grads, args.steps))
        rows["tables_for, new addresses"].append(timed(tables, True, grads, args.steps))
    uploads = _triton.address_uploads - uploads
    built = _triton.chunk_tables_built - built

    medians = {name: statistics.median(values) for name, values in rows.items()}
    lines = [
        "# Host time of a Triton step's launch logic, ResNet-50's 161 tensors, this CPU",
        "",
        f"`python bench/bench_triton_host.py --rounds {args.rounds} --steps {args.steps}`; torch {torch.__version__}, "
        "one thread. CPU tensors on the Triton path with the kernel launches replaced by nothing: the host's work "
        "of `torchlars._triton.lars_sgd_` (the step's Python, tables, scalars), not the kernels. Median over rounds "
        "of each round's median step.",
        "",
        "| what | us | vs in place |",
        "|---|---|---|",
    ]
    for name, value in medians.items():
        base = medians["step, in place" if name.startswith("step") else "tables_for, in place"]
        lines.append(f"| {name} | {value * 1e6:.1f} | {value / base:.2f}x |")
    lines += [
        "",
        f"First step (chunk table of {len(shapes)} tensors built, addresses uploaded): {first * 1e3:.2f} ms. "
        f"Over the timed steps: {built} chunk tables built, {uploads} address refreshes "
        f"(one per step with new addresses).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
