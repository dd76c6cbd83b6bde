"""The GPU run of ``scripts/gpu_run.sh``: LARS step times against SGD, and the CUDA checks.

For ResNet-50's 161 tensors and 996 small tensors (``param_sets.py``), fp32 and bf16, it times
``LARSSGD`` (Triton), ``LARS(SGD(foreach=True))`` and ``LARS(SGD(fused=True))`` against
``SGD(fused=True)`` (eager) and against ``torch.compile``'d ``SGD(foreach=True)``, interleaved
(``step_timing.py``). For each LARS variant it counts the CUDA kernels per step with
``torch.profiler``, runs a step under ``torch.cuda.set_sync_debug_mode("error")``, and compares
a CUDA-graph replay of ``LARSSGD`` with eager steps. Results are rewritten after every case, so
a run cut short by its ``timeout`` keeps what it measured.

    python bench/gpu_checks.py                        # on a CUDA machine
    TRITON_INTERPRET=1 TORCHLARS_TRITON_ON_CPU=1 python bench/gpu_checks.py --dry-run
        # the same code paths on CPU tensors over a tiny set, 1 round, no CUDA-only checks
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import torch

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from param_sets import PARAM_SETS, numel  # noqa: E402
from step_cuda_checks import count_kernels, graph_replay_matches  # noqa: E402
from step_timing import Stepper, interleaved, make_params, paired_ratios, spread, synchronize  # noqa: E402
from step_variants import Variant, _compiled, _lars, _larssgd, _sgd  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Baselines first: each LARS variant is compared with the SGD of its mode.
VARIANTS = (
    Variant("sgd_fused", "SGD(fused=True)", "eager", lambda p: _sgd(p, fused=True).step, baseline=True),
    Variant("sgd_compiled", "SGD(foreach=True), compiled", "compiled",
            lambda p: _compiled(_sgd(p, foreach=True).step), baseline=True),
    Variant("larssgd", "LARSSGD (Triton)", "eager", lambda p: _larssgd(p).step),
    Variant("larssgd_compiled", "LARSSGD (Triton), compiled", "compiled", lambda p: _compiled(_larssgd(p).step)),
    Variant("lars_foreach", "LARS(SGD(foreach=True))", "eager", lambda p: _lars(p, foreach=True).step),
    Variant("lars_fused", "LARS(SGD(fused=True))", "eager", lambda p: _lars(p, fused=True).step),
)
KERNEL_STEPS = 5  # profiled steps; kernels per step is their count over this


def tiny_shapes() -> list[tuple[int, ...]]:
    return [(8, 4, 3, 3), (8,), (8,), (16, 8), (16,)]


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def kernels_per_step(step) -> float:
    def steps() -> None:
        for _ in range(KERNEL_STEPS):
            step()

    return count_kernels(steps) / KERNEL_STEPS


def sync_free(step) -> str:
    """"ok" when a step makes no synchronising CUDA call; "error" mode raises at the first one."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as error:
        return f"SYNC ({first_line(error)})"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()  # after the reset: "error" mode would raise on this sync too
    return "ok"


def graph_check(shapes, dtype: torch.dtype) -> dict | str:
    result = graph_replay_matches(VARIANTS[2], shapes, dtype)
    result["within_1e-6"] = result["max_abs_diff"] <= 1e-6
    return result


def bench_case(set_name: str, shapes, dtype_name: str, device: str, args) -> list[dict]:
    dtype = DTYPES[dtype_name]
    rows, steppers = {}, {}
    for variant in VARIANTS:
        row = {"set": set_name, "dtype": dtype_name, "variant": variant.name, "label": variant.label,
               "mode": variant.mode, "tensors": len(shapes), "bytes": numel(shapes) * dtype.itemsize}
        rows[variant.name] = row
        if variant.mode == "compiled" and args.no_compile:
            row["status"] = "n/a (--no-compile)"
            continue
        try:
            params, grads = make_params(shapes, dtype, device)
            stepper = Stepper(variant.build(params), params, grads, device)
            start = time.perf_counter()
            for _ in range(args.warmup):
                stepper.refresh_grads()
                stepper.step()
            synchronize(device)
            row["warmup_s"] = time.perf_counter() - start
            if device == "cuda" and not variant.baseline:
                row["kernels_per_step"] = kernels_per_step(stepper.step)
                row["sync_debug_error"] = sync_free(stepper.step)
            steppers[variant.name] = stepper
        except Exception as error:  # a variant that fails is reported; the others still run
            row["status"] = f"FAILED ({first_line(error)})"
        print(f"  {set_name} {dtype_name} {variant.name}: {row.get('status', 'ready')} "
              f"kernels={row.get('kernels_per_step', '-')} sync={row.get('sync_debug_error', '-')}", flush=True)

    values = interleaved(steppers, args.rounds, args.steps, time.perf_counter)
    baselines = {v.mode: v.name for v in VARIANTS if v.baseline and v.name in values}
    for name, round_values in values.items():
        row = rows[name]
        row.update(status="ok", round_values_s=round_values, **{f"{k}_s": x for k, x in spread(round_values).items()})
        for base in baselines.values():
            row[f"ratio_vs_{base}"] = spread(paired_ratios(round_values, values[base]))["median"]
    if device == "cuda":
        try:
            rows["larssgd"]["cuda_graph"] = graph_check(shapes, dtype)
        except Exception as error:
            rows["larssgd"]["cuda_graph"] = f"FAILED ({first_line(error)})"
    del steppers
    torch._dynamo.reset()
    return list(rows.values())


def fmt_us(row: dict) -> str:
    if row.get("status") != "ok":
        return row.get("status", "?")
    return f"{row['median_s'] * 1e6:.1f} [{row['q1_s'] * 1e6:.1f}, {row['q3_s'] * 1e6:.1f}]"


def markdown(report: dict) -> str:
    lines = [f"# Optimizer step on {report['device']}", "",
             f"{report['date']}; torch {report['torch']}, triton {report['triton']}; "
             f"{report['rounds']} rounds x {report['steps']} steps; {report['elapsed_s']:.0f} s.", "",
             "Median step time in us [quartiles of the round medians]; ratio = median of per-round ratios "
             "to `SGD(fused=True)` / to compiled `SGD(foreach=True)`; kernels per step from torch.profiler "
             "(CUDA kernel, memcpy and memset events); sync = a step under set_sync_debug_mode('error').", "",
             "| set | dtype | variant | step us | vs SGD fused | vs SGD compiled | kernels/step | sync | CUDA graph |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        graph = row.get("cuda_graph", "")
        if isinstance(graph, dict):
            graph = f"{'bit-exact' if graph['matches'] else 'DIFFERS'} (max {graph['max_abs_diff']:.2e})"
        ratios = [f"{row[key]:.2f}" if key in row else "" for key in ("ratio_vs_sgd_fused", "ratio_vs_sgd_compiled")]
        lines.append(f"| {row['set']} ({row['tensors']}) | {row['dtype']} | {row['label']} | {fmt_us(row)} | "
                     f"{ratios[0]} | {ratios[1]} | {row.get('kernels_per_step', '')} | "
                     f"{row.get('sync_debug_error', '')} | {graph} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU tensors, a tiny set, 1 round, no CUDA-only checks (with TRITON_INTERPRET=1 "
                             "TORCHLARS_TRITON_ON_CPU=1 the Triton kernels run in the interpreter)")
    parser.add_argument("--sets", nargs="+", choices=tuple(PARAM_SETS), default=list(PARAM_SETS))
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled SGD baseline")
    parser.add_argument("--out", type=pathlib.Path, default=BENCH_DIR / "results" / "step_cuda")
    args = parser.parse_args()
    if args.dry_run:
        device, cases = "cpu", [("tiny", tiny_shapes())]
        args.rounds, args.steps, args.warmup = 1, 1, 1
        if args.out == parser.get_default("out"):  # keep the GPU results out of a dry run's way
            args.out = pathlib.Path("/tmp/step_cuda_dryrun")
    elif not torch.cuda.is_available():
        print("bench/gpu_checks.py: torch sees no CUDA device (use --dry-run on a CPU)")
        return
    else:
        device, cases = "cuda", [(name, PARAM_SETS[name]()) for name in args.sets]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    import triton

    start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "triton": triton.__version__, "rounds": args.rounds,
              "steps": args.steps, "results": []}
    for set_name, shapes in cases:
        for dtype_name in args.dtype:
            report["results"] += bench_case(set_name, shapes, dtype_name, device, args)
            report["elapsed_s"] = time.perf_counter() - start
            args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out}.md and .json in {report['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
