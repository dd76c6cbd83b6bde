"""Optimizer step time of LARS against the fastest SGD and the alternatives, on CPU or CUDA.

The variants (``step_variants.py``) are timed interleaved with fresh gradients before every
step (``step_timing.py``); each is compared round by round with the fastest SGD of its mode
(eager or compiled), and the report (``step_report.py``) gives medians with their spread and
the floor measured on the machine (SGD plus one read of the weights and gradients). On CUDA it
also checks host syncs, CUDA graph replay and kernel launches (``step_cuda_checks.py``).

    python bench/bench_step.py --device cpu --quick     # a first look: too few samples to conclude
    python bench/bench_step.py --device cpu --threads 1 --clock thread --compile-sets resnet50 --rounds 25
                                                        # what bench/results/step_cpu.* holds
    python bench/bench_step.py --device cuda            # the full GPU run

Writes ``<out>.md``, ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import pathlib
import sys
import time

import torch

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
if importlib.util.find_spec("torchlars") is None:
    # Not installed: use the source tree (the pure-Python pieces; the C++ ones need the build).
    sys.path.insert(0, str(REPO_DIR / "python"))

from param_sets import PARAM_SETS, numel  # noqa: E402
from step_report import chart, evaluate_targets, machine_info, markdown  # noqa: E402
from step_timing import CLOCKS, Stepper, interleaved, make_params, paired_ratios, spread, synchronize  # noqa: E402
from step_variants import Variant, variants  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_case(set_name: str, dtype_name: str, device: str, chosen: list[Variant], args) -> list[dict]:
    shapes = PARAM_SETS[set_name]()
    dtype = DTYPES[dtype_name]
    rows, steppers = {}, {}
    for variant in chosen:
        row = {"set": set_name, "dtype": dtype_name, "variant": variant.name, "label": variant.label,
               "mode": variant.mode, "tensors": len(shapes), "bytes": numel(shapes) * dtype.itemsize}
        reason = variant.unavailable()
        if reason is None and variant.mode == "compiled" and (args.no_compile or set_name not in args.compile_sets):
            reason = "--no-compile" if args.no_compile else f"--compile-sets {' '.join(args.compile_sets)}"
        if reason is None and variant.mode == "compiled" and args.quick and len(shapes) > 200:
            reason = f"--quick: compiling a step over {len(shapes)} tensors takes minutes"
        if reason is None:
            try:
                params, grads = make_params(shapes, dtype, device)
                stepper = Stepper(variant.build(params), params, grads, device)
                start = time.perf_counter()
                for _ in range(args.warmup):
                    stepper.refresh_grads()
                    stepper.step()
                synchronize(device)
                row["warmup_s"] = time.perf_counter() - start
                steppers[variant.name] = stepper
            except Exception as error:  # a variant that fails is reported, not fatal
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        if reason is not None:
            row["status"] = f"n/a ({reason})"
        rows[variant.name] = row
        print(f"  {set_name} {dtype_name} {variant.name}: {row.get('status', 'ready')}", flush=True)

    values = interleaved(steppers, args.rounds, args.steps, CLOCKS[args.clock])
    for name, round_values in values.items():
        stats = spread(round_values)
        rows[name].update({"status": "ok", "samples": len(round_values) * args.steps, "round_values_s": round_values,
                           **{f"{key}_s": value for key, value in stats.items()}})
    baselines = {}
    for variant in chosen:
        if variant.baseline and variant.name in values:
            best = baselines.get(variant.mode)
            if best is None or rows[variant.name]["median_s"] < rows[best]["median_s"]:
                baselines[variant.mode] = variant.name
    for variant in chosen:
        row = rows[variant.name]
        if variant.name not in values:
            continue
        if variant.mode in baselines:
            baseline = baselines[variant.mode]
            ratios = spread(paired_ratios(values[variant.name], values[baseline]))
            row.update(ratio=ratios["median"], ratio_q1=ratios["q1"], ratio_q3=ratios["q3"], baseline=baseline,
                       is_baseline=variant.name == baseline)
        elif variant.mode == "floor" and "eager" in baselines:
            # The fastest eager SGD plus one read of the gradients, over that SGD, round by round.
            sgd = values[baselines["eager"]]
            floors = spread([(s + r) / s for s, r in zip(sgd, values[variant.name])])
            row.update(floor_ratio=floors["median"], floor_q1=floors["q1"], floor_q3=floors["q3"])
    del steppers
    torch._dynamo.reset()
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--sets", nargs="+", choices=tuple(PARAM_SETS), default=list(PARAM_SETS))
    parser.add_argument("--variants", nargs="+", help="only these variants (names as in the JSON)")
    parser.add_argument("--quick", action="store_true", help="few rounds, for a first look (no conclusions)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 5 quick, 25 full; x3 on CUDA)")
    parser.add_argument("--steps", type=int, help="timed steps per round (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation included)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--compile-sets", nargs="+", choices=tuple(PARAM_SETS), default=list(PARAM_SETS),
                        help="the sets with compiled variants (compiling a step over 996 tensors takes minutes)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall time, or CPU time of the stepping thread (CPU, --threads 1: a busy machine)")
    parser.add_argument("--out", type=pathlib.Path, help="output prefix (default: bench/results/step_<device>)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.clock == "thread" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock thread measures only the calling thread: use it with --device cpu --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (5 if args.quick else 25) * (3 if args.device == "cuda" else 1)
    args.steps = args.steps or (20 if args.device == "cuda" else 3)
    out = args.out or BENCH_DIR / "results" / f"step_{args.device}"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    chosen = [v for v in variants(args.device) if not args.variants or v.name in args.variants]
    for mode in ("eager", "compiled"):
        if any(v.mode == mode for v in chosen) and not any(v.mode == mode and v.baseline for v in chosen):
            parser.error(f"--variants: the {mode} variants need an SGD of their mode as baseline")

    results = []
    for set_name in args.sets:
        for dtype_name in args.dtype:
            print(f"{set_name}, {dtype_name}:", flush=True)
            results += bench_case(set_name, dtype_name, args.device, chosen, args)

    if args.device == "cuda":
        from step_cuda_checks import cuda_checks

        print("CUDA checks:", flush=True)
        checks = cuda_checks(chosen)
    else:
        checks = ("Skipped: host syncs, CUDA graph replay and kernel launches are CUDA-only checks; "
                  "run with `--device cuda` on a GPU machine.")

    report = {
        "device": args.device,
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.device, REPO_DIR),
        "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "clock": args.clock,
        "results": results,
        "targets": evaluate_targets(results),
        "cuda_checks": checks,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    chart(report, out.with_suffix(".png"))
    print(markdown(report))
    print(f"wrote {out}.md, .json, .png")


if __name__ == "__main__":
    main()
