"""LARS around an adaptive base: what trust_ratio="update" (LAMB) costs, and why "paper" is a trap.

1. The cost: one step of ``LARS(AdamW(foreach=True), trust_ratio="update")`` against the same
   ``AdamW`` alone, on ResNet-50's parameters (``param_sets.resnet50_shapes``), interleaved
   rounds with fresh gradients, medians with the interquartile range of the per-round ratios.
2. The trap: an MLP regression (2048 points, batch 256, 200 steps), trained with
   ``LARS(Adam(lr=1e-3))`` at several trust coefficients: with ``"paper"`` the final loss hardly
   depends on the coefficient, because Adam divides each coordinate by its own running scale and
   so cancels a per-layer factor on the gradient; with ``"update"`` it does.

    python bench/bench_lamb.py            # what bench/results/lamb_cpu.md holds (about 2 min)
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import time
import warnings

import torch
from torch import nn

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from param_sets import resnet50_shapes  # noqa: E402

import torchlars  # noqa: E402
from torchlars import LARS  # noqa: E402


def step_cost(rounds: int, threads: int) -> tuple[float, float, list[float]]:
    """Median AdamW step, median LAMB step (ms), and the per-round ratios."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    shapes = resnet50_shapes()

    def params():
        return [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]

    adamw_params, lamb_params = params(), params()
    adamw = torch.optim.AdamW(adamw_params, lr=1e-3, weight_decay=0.01, foreach=True)
    lamb = LARS(torch.optim.AdamW(lamb_params, lr=1e-3, weight_decay=0.01, foreach=True), trust_coef=1.0, eps=0.0,
                trust_ratio="update")
    times: dict[str, list[float]] = {"adamw": [], "lamb": []}
    order = [("adamw", adamw, adamw_params), ("lamb", lamb, lamb_params)]
    for round_index in range(rounds + 2):  # the first two warm up
        for name, optimizer, group in order if round_index % 2 else order[::-1]:
            for param in group:
                param.grad = torch.randn(param.shape, generator=generator) * 0.01
            start = time.perf_counter()
            optimizer.step()
            if round_index >= 2:
                times[name].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times["adamw"], times["lamb"])]
    return statistics.median(times["adamw"]) * 1e3, statistics.median(times["lamb"]) * 1e3, ratios


def final_loss(trust_ratio: str, trust_coef: float | None, steps: int = 200) -> float:
    """The last training loss of an MLP regression with LARS(Adam) (plain Adam if trust_coef is None)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2048, 16, generator=generator)
    targets = torch.sin(inputs @ torch.randn(16, 1, generator=generator))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    base = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning about "paper" around Adam is the point here
        optimizer = base if trust_coef is None else LARS(base, trust_coef=trust_coef, trust_ratio=trust_ratio)
    loss = torch.tensor(0.0)
    for step in range(steps):
        batch = torch.randint(0, 2048, (256,), generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
        loss.backward()
        optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, default=BENCH_DIR / "results" / "lamb_cpu.md")
    args = parser.parse_args()
    adamw_ms, lamb_ms, ratios = step_cost(args.rounds, args.threads)
    quartiles = statistics.quantiles(ratios, n=4)
    lines = [
        "# LARS around an adaptive base (CPU)", "",
        f"`python {' '.join(sys.argv)}`", "",
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; torch {torch.__version__}, "
        f"torchlars {torchlars.__version__}, {args.threads} thread(s).", "",
        "## The cost of trust_ratio=\"update\" (LAMB) over the base, ResNet-50's 161 tensors, fp32", "",
        "| step | median |", "|---|---:|",
        f"| `AdamW(foreach=True)` | {adamw_ms:.1f} ms |",
        f"| `LARS(AdamW(foreach=True), trust_ratio=\"update\")` | {lamb_ms:.1f} ms |",
        f"| ratio, median of {args.rounds} interleaved rounds [IQR] | {statistics.median(ratios):.2f}x "
        f"[{quartiles[0]:.2f}–{quartiles[2]:.2f}] |", "",
        "## LARS(Adam): final training loss of an MLP regression (2048 points, batch 256, 200 steps, lr 1e-3)", "",
        "| optimizer | trust_coef 1e-3 | 1e-2 | 1.0 |", "|---|---:|---:|---:|",
    ]
    for trust_ratio in ("paper", "update"):
        losses = [final_loss(trust_ratio, coef) for coef in (1e-3, 1e-2, 1.0)]
        lines.append(f"| `LARS(Adam, trust_ratio=\"{trust_ratio}\")` | " + " | ".join(f"{x:.4f}" for x in losses) + " |")
    lines += [f"| `Adam` alone | {final_loss('paper', None):.4f} | | |", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
