"""The fused LAMB CPU operator (torchlars.ops.lamb_) against torch's AdamW, step for step.

LAMB's floor is 10 passes over memory (w, g, m, v read and m, v written, then m, v, w read and w
written) against AdamW's 7: 1.43x. This times one step of

- ``lamb_``: ``torchlars.ops.lamb_`` on the whole parameter list (plus the step counters'
  ``_foreach_add_``, which AdamW does inside its step too),
- ``cpp.LAMB``: ``torchlars.cpp.LAMB.step()`` (lars::LAMB, the same operator behind a C++ class),
- ``AdamW(fused=True)`` and ``AdamW(foreach=True)``,

on ResNet-50's parameters (``param_sets.resnet50_shapes``, 25.6M elements) and on the encoder
layers of a BERT-base-like model (hidden 768, FFN 3072, 12 heads' worth of projections; 4
layers, 28.3M elements, to fit a small machine), fp32 and bf16, at 1 and 2 threads. Rounds are
interleaved with fresh gradients; each figure is the median step time, and the ratio to the
fastest AdamW of the same setting.

    python bench/bench_lamb_fused.py                  # writes bench/results/lamb_fused_cpu.md
    python bench/bench_lamb_fused.py --rounds 3 --out -   # a quicker look, to stdout
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from param_sets import numel, resnet50_shapes  # noqa: E402

import torchlars.cpp  # noqa: E402
import torchlars.ops  # noqa: E402
from torchlars._functional import LAMBSettings  # noqa: E402

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-6, 0.01


def bert_encoder_shapes(layers: int = 4, hidden: int = 768, ffn: int = 3072) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for _ in range(layers):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # attention layer norm
        shapes += [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,)]  # intermediate, output
        shapes += [(hidden,), (hidden,)]  # output layer norm
    return shapes


PARAM_SETS = {"resnet50": resnet50_shapes, "bert_encoder": bert_encoder_shapes}


def make_steppers(shapes, dtype):
    """name -> (params, step function) for every contender, each with its own tensors."""
    generator = torch.Generator().manual_seed(0)
    init = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    steppers = {}

    lamb_params = [p.clone() for p in init]
    exp_avgs = [torch.zeros_like(p) for p in lamb_params]
    exp_avg_sqs = [torch.zeros_like(p) for p in lamb_params]
    steps = [torch.tensor(0.0) for _ in lamb_params]
    lr = torch.tensor(LR, dtype=torch.float64)
    settings = LAMBSettings(beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY, trust_coef=1.0,
                            trust_eps=0.0, trust_clip=False, adapt=True, bias_correction=True, maximize=False)

    def lamb_op_step():
        torch._foreach_add_(steps, 1)
        torchlars.ops.lamb_(lamb_params, [p.grad for p in lamb_params], exp_avgs, exp_avg_sqs, steps, settings, lr=lr)

    steppers["lamb_"] = (lamb_params, lamb_op_step)

    params = [p.clone() for p in init]
    steppers["cpp.LAMB"] = (params, torchlars.cpp.LAMB(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY).step)
    for flavour in ("fused", "foreach"):
        params = [p.clone().requires_grad_(True) for p in init]
        adamw = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **{flavour: True})
        steppers[f"AdamW({flavour}=True)"] = (params, adamw.step)
    return steppers


def measure(shapes, dtype, threads, rounds):
    """name -> (median, minimum) step time in ms."""
    torch.set_num_threads(threads)
    steppers = make_steppers(shapes, dtype)
    generator = torch.Generator().manual_seed(1)
    times = {name: [] for name in steppers}
    with torch.no_grad():
        for round_index in range(rounds + 1):  # round 0 warms up (first steps allocate state)
            grads = [(torch.randn(shape, generator=generator) * 0.1).to(dtype) for shape in shapes]
            for name, (params, step) in steppers.items():
                for param, grad in zip(params, grads):
                    param.grad = grad
                start = time.perf_counter()
                step()
                elapsed = time.perf_counter() - start
                if round_index > 0:
                    times[name].append(elapsed * 1e3)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "lamb_fused_cpu.md"), help="'-' for stdout")
    args = parser.parse_args()

    lines = [
        "# Fused LAMB (liblars, CPU) against torch's AdamW",
        "",
        f"`python bench/bench_lamb_fused.py --rounds {args.rounds} --threads {' '.join(map(str, args.threads))}`, "
        f"{datetime.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}.",
        "",
        "Median step time over interleaved rounds (ms), and its ratio to the fastest AdamW of the row's setting; "
        "the last column also gives the ratio of the fastest rounds (the least disturbed, on a shared machine). "
        "The floor of a two-pass LAMB is 10/7 = 1.43x AdamW's memory traffic.",
        f"Load average when the run started: {', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs.",
        "",
        "| parameters | dtype | threads | lamb_ | cpp.LAMB | AdamW(fused=True) | AdamW(foreach=True) | lamb_ / fastest AdamW: median (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for set_name, make_shapes in PARAM_SETS.items():
        shapes = make_shapes()
        for dtype in (torch.float32, torch.bfloat16):
            for threads in args.threads:
                both = measure(shapes, dtype, threads, args.rounds)
                ms = {name: median for name, (median, _) in both.items()}
                best = {name: minimum for name, (_, minimum) in both.items()}
                fastest = min(ms["AdamW(fused=True)"], ms["AdamW(foreach=True)"])
                fastest_best = min(best["AdamW(fused=True)"], best["AdamW(foreach=True)"])
                cells = " | ".join(
                    f"{ms[name]:.1f} ({ms[name] / fastest:.2f}x)"
                    for name in ("lamb_", "cpp.LAMB", "AdamW(fused=True)", "AdamW(foreach=True)")
                )
                label = f"{set_name} ({len(shapes)} tensors, {numel(shapes) / 1e6:.1f}M)"
                lines.append(f"| {label} | {str(dtype).removeprefix('torch.')} | {threads} | {cells} | "
                             f"**{ms['lamb_'] / fastest:.2f}x** ({best['lamb_'] / fastest_best:.2f}x) |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        pathlib.Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
