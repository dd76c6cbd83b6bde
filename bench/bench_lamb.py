"""LAMB against AdamW on the CPU, and why LARS(Adam) with the "paper" ratio is a trap.

1. The step: ``torchlars.LAMB`` (``foreach=True``; ``fused=True`` where liblars's
   ``torch.ops.torchlars.lamb_`` is installed) and ``LARS(AdamW(foreach=True), trust_ratio="update")``
   against ``torch.optim.AdamW(fused=True)`` and ``AdamW(foreach=True)``, on ResNet-50's parameters
   (``param_sets.resnet50_shapes``) and a BERT-style encoder's (:func:`bert_shapes`), fp32 and bf16, at
   1 and 2 threads. All step the same parameters and gradients (set once: the values do not change
   the work, and fused LAMB's update, which it leaves in the fp32 gradients, is of ordinary size),
   each with its own state; interleaved rounds, medians, and ratios to the fastest AdamW
   taken round by round, with their interquartile range.

   The memory floor: AdamW reads w, g, m, v and writes w, m, v (7 passes over the parameters'
   size). LAMB needs ||w|| and ||u|| before it writes w, so at best it reads w, g, m, v and writes
   m, v, then reads w, m, v and writes w (10 passes): 10/7 = 1.43x AdamW.
2. The trap: an MLP regression (2048 points, batch 256, 200 steps), trained with
   ``LARS(Adam(lr=1e-3))`` at several trust coefficients: with ``"paper"`` the final loss hardly
   depends on the coefficient, because Adam divides each coordinate by its own running scale and
   so cancels a per-layer factor on the gradient; with ``"update"`` it does.

    python bench/bench_lamb.py            # what bench/results/lamb_cpu.md and .json hold (about 4 min)
    python bench/bench_lamb.py --rounds 3 --sets resnet50 --threads 1 --no-trap   # a first look

Run it where torchlars is installed (not with PYTHONPATH=python), so that the fused operator is
found when it exists.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from param_sets import numel, resnet50_shapes  # noqa: E402

import torchlars  # noqa: E402
from torchlars import LAMB, LARS  # noqa: E402

ADAMW_PASSES, LAMB_PASSES = 7, 10


def bert_shapes(hidden: int = 768, layers: int = 6, vocab: int = 30522, positions: int = 512) -> list[tuple[int, ...]]:
    """The parameters of a BERT encoder (``BertModel``'s order), by default DistilBERT's size:
    hidden 768, 6 layers, 66M elements, a 23M-element word embedding among them."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4  # query, key, value, attention output
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(4 * hidden, hidden), (4 * hidden,), (hidden, 4 * hidden), (hidden,)]  # feed-forward
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


def embedding_shapes() -> list[tuple[int, ...]]:
    """BERT's word embedding alone: the largest single tensor of the BERT-style set."""
    return [(30522, 768)]


SETS = {"resnet50": resnet50_shapes, "bert": bert_shapes, "embedding": embedding_shapes}


def fused_lamb_installed() -> bool:
    return torchlars.LAMB([nn.Parameter(torch.zeros(1))])._step_supports_amp_scaling


def variants(params: list[nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    """The optimizers timed, each over ``params`` with its own state (lr 1e-3, weight decay 0.01)."""
    made = {
        "AdamW(foreach=True)": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True),
        "AdamW(fused=True)": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True),
        "LAMB(foreach=True)": LAMB(params, lr=1e-3, weight_decay=0.01, foreach=True),
        'LARS(AdamW(foreach=True), "update")': LARS(
            torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True, eps=1e-6), trust_coef=1.0, eps=0.0,
            trust_ratio="update",
        ),
    }
    if fused_lamb_installed():
        made["LAMB(fused=True)"] = LAMB(params, lr=1e-3, weight_decay=0.01, fused=True)
    return made


def time_steps(shapes: list[tuple[int, ...]], dtype: torch.dtype, thread_counts: list[int], rounds: int) -> dict:
    """{threads: {variant: {"ms": median, "ratio": median ratio, "iqr": [q1, q3]}}}."""
    generator = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]
    for param in params:
        param.grad = (torch.randn(param.shape, generator=generator) * 0.01).to(dtype)
    optimizers = variants(params)
    results = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in optimizers}
        order = list(optimizers.items())
        for round_index in range(rounds + 2):  # the first two warm up
            order = order[1:] + order[:1]  # rotated, so that no variant always follows the same one
            for name, optimizer in order:
                start = time.perf_counter()
                optimizer.step()
                if round_index >= 2:
                    times[name].append(time.perf_counter() - start)
        fastest_adamw = [min(a, b) for a, b in zip(times["AdamW(foreach=True)"], times["AdamW(fused=True)"])]
        results[threads] = {}
        for name, values in times.items():
            ratios = [value / base for value, base in zip(values, fastest_adamw)]
            quartiles = statistics.quantiles(ratios, n=4)
            results[threads][name] = {
                "ms": statistics.median(values) * 1e3,
                "ratio": statistics.median(ratios),
                "iqr": [quartiles[0], quartiles[2]],
            }
    return results


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


def step_tables(results: dict, thread_counts: list[int]) -> list[str]:
    lines = []
    for set_name, by_dtype in results.items():
        shapes = SETS[set_name]()
        for dtype_name, by_threads in by_dtype.items():
            lines += [
                f"### {set_name} ({len(shapes)} tensors, {numel(shapes):,} elements), {dtype_name}", "",
                "| step | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}: median, x fastest AdamW [IQR]"
                                          for t in thread_counts) + " |",
                "|---|" + "---:|" * len(thread_counts),
            ]
            for name in by_threads[str(thread_counts[0])]:
                cells = []
                for threads in thread_counts:
                    row = by_threads[str(threads)][name]
                    cells.append(f"{row['ms']:.1f} ms, {row['ratio']:.2f}x [{row['iqr'][0]:.2f}–{row['iqr'][1]:.2f}]")
                lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=["resnet50", "bert"])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--no-trap", action="store_true", help="skip the LARS(Adam) training runs")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "lamb_cpu.md"),
                        help="'-' for stdout only")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results = {
        set_name: {
            dtype_name: {str(t): row for t, row in time_steps(SETS[set_name](), dtypes[dtype_name], args.threads,
                                                              args.rounds).items()}
            for dtype_name in args.dtypes
        }
        for set_name in args.sets
    }
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
               f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after the step timings")
    lines = [
        "# LAMB against AdamW (CPU)", "",
        f"`python {' '.join(sys.argv)}`", "",
        f"{now}; torch {torch.__version__}, torchlars {torchlars.__version__}, {machine}; "
        f"fused LAMB operator {'installed' if fused_lamb_installed() else 'not installed (torch.ops.torchlars.lamb_)'}.",
        "",
        "## One optimizer step", "",
        f"Medians of {args.rounds} interleaved rounds; the ratio to the faster of `AdamW(foreach=True)` and "
        "`AdamW(fused=True)`, taken round by round, with its interquartile range. The memory floor: "
        f"AdamW {ADAMW_PASSES} passes over the parameters' size, LAMB {LAMB_PASSES}: "
        f"{LAMB_PASSES / ADAMW_PASSES:.2f}x (the target for a fused LAMB: at most 1.5x in fp32).", "",
        *step_tables(results, args.threads),
    ]
    trap = {}
    if not args.no_trap:
        torch.set_num_threads(1)
        lines += [
            "## LARS(Adam): final training loss of an MLP regression (2048 points, batch 256, 200 steps, lr 1e-3)",
            "", "| optimizer | trust_coef 1e-3 | 1e-2 | 1.0 |", "|---|---:|---:|---:|",
        ]
        for trust_ratio in ("paper", "update"):
            trap[trust_ratio] = [final_loss(trust_ratio, coef) for coef in (1e-3, 1e-2, 1.0)]
            lines.append(f"| `LARS(Adam, trust_ratio=\"{trust_ratio}\")` | "
                         + " | ".join(f"{x:.4f}" for x in trap[trust_ratio]) + " |")
        trap["adam"] = [final_loss("paper", None)]
        lines += [f"| `Adam` alone | {trap['adam'][0]:.4f} | | |", ""]
    print("\n".join(lines))
    if args.out == "-":
        return
    out = pathlib.Path(args.out)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(
        {"command": f"python {' '.join(sys.argv)}", "date": now, "torch": torch.__version__,
         "floor": {"adamw_passes": ADAMW_PASSES, "lamb_passes": LAMB_PASSES}, "step": results, "trap": trap},
        indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
