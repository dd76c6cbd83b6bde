"""The GPU run of ``scripts/gpu_run.sh``: LARS and LAMB step times against SGD and AdamW, and the CUDA checks.

For ResNet-50's 161 tensors and 996 small tensors (``param_sets.py``), fp32 and bf16, it times
``LARSSGD`` (Triton), ``LARS(SGD(foreach=True))`` and ``LARS(SGD(fused=True))`` against
``SGD(fused=True)`` (eager) and against ``torch.compile``'d ``SGD(foreach=True)``, and the Triton
LAMB step (``torchlars._triton.lamb_``, and ``torchlars.LAMB`` where it exists) against
``AdamW(fused=True)``, interleaved (``step_timing.py``). Per variant it also reports:

- kernels per step, counted by ``torch.profiler`` (CUDA kernels, memcpy and memset events);
- a step under ``torch.cuda.set_sync_debug_mode("error")``;
- the host time of a step (the ``step()`` call alone, after a synchronize), with the gradients
  kept in place and with the gradients reallocated before every step (``zero_grad()``'s default);
- the achieved bandwidth: the bytes a step must move (``PASSES`` over the parameters' bytes: the
  memory floor of each algorithm) over its median time, beside its baseline's;
- for ``LARSSGD`` and the Triton LAMB, a CUDA-graph replay compared with eager steps.

Results are rewritten after every case, so a run cut short by its ``timeout`` keeps what it measured.

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
from step_variants import LR, Variant, _compiled, _lars, _larssgd, _sgd  # noqa: E402

import torchlars  # noqa: E402
from torchlars._functional import LAMBSettings  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAMB_OPTIONS = LAMBSettings(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, trust_coef=1.0, trust_eps=0.0,
                            trust_clip=False, adapt=True, bias_correction=True, maximize=False)


def _adamw_fused(params):
    return torch.optim.AdamW(params, lr=LR, eps=LAMB_OPTIONS.eps, weight_decay=LAMB_OPTIONS.weight_decay,
                             fused=True).step


def _lamb_triton(params):
    """One LAMB step of ``torchlars._triton.lamb_`` with its state, as a LAMB optimizer keeps it."""
    from torchlars import _triton

    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]

    def step():
        torch._foreach_add_(steps, 1.0)
        with torch.no_grad():
            _triton.lamb_(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, steps, LAMB_OPTIONS, lr=LR)

    return step


def _lamb_class(params):
    return torchlars.LAMB(params, lr=LR, eps=LAMB_OPTIONS.eps, weight_decay=LAMB_OPTIONS.weight_decay).step


# Baselines first: each LARS variant is compared with the SGD of its mode.
VARIANTS = (
    Variant("sgd_fused", "SGD(fused=True)", "eager", lambda p: _sgd(p, fused=True).step, baseline=True),
    Variant("sgd_compiled", "SGD(foreach=True), compiled", "compiled",
            lambda p: _compiled(_sgd(p, foreach=True).step), baseline=True),
    Variant("larssgd", "LARSSGD (Triton)", "eager", lambda p: _larssgd(p).step),
    Variant("larssgd_compiled", "LARSSGD (Triton), compiled", "compiled", lambda p: _compiled(_larssgd(p).step)),
    Variant("lars_foreach", "LARS(SGD(foreach=True))", "eager", lambda p: _lars(p, foreach=True).step),
    Variant("lars_fused", "LARS(SGD(fused=True))", "eager", lambda p: _lars(p, fused=True).step),
    Variant("adamw_fused", "AdamW(fused=True)", "lamb", _adamw_fused, baseline=True),
    Variant("lamb_triton", "LAMB (torchlars._triton.lamb_)", "lamb", _lamb_triton),
    Variant("lamb", "torchlars.LAMB", "lamb", _lamb_class,
            unavailable=lambda: None if hasattr(torchlars, "LAMB") else "torchlars.LAMB not in this build"),
)
GRAPHED = ("larssgd", "lamb_triton")  # variants whose CUDA-graph replay is compared with eager steps
# Passes over the parameters' bytes a step must make (reads + writes), its memory floor: SGD with
# momentum reads w, g, b and writes w, b; LARSSGD first reads w and g for the norms; AdamW reads
# w, g, m, v and writes w, m, v; LAMB reads w, g, m, v and writes m, v, then reads w, m, v and writes w.
PASSES = {"sgd_fused": 5, "sgd_compiled": 5, "larssgd": 7, "larssgd_compiled": 7, "lars_fused": 7,
          "adamw_fused": 7, "lamb_triton": 10, "lamb": 10}
KERNEL_STEPS = 5  # profiled steps; kernels per step is their count over this
HOST_STEPS = 30  # steps timed for the host time, each way
WHAT_IS_MEASURED = """\
per set of shapes (ResNet-50's 161 tensors, 996 small tensors) and dtype (fp32, bf16), per variant:
  - step time, interleaved rounds, median and quartiles; ratio to SGD(fused=True), to compiled
    SGD(foreach=True) and (LAMB) to AdamW(fused=True)
  - kernels per step (torch.profiler: CUDA kernels, memcpy, memset)
  - a step under torch.cuda.set_sync_debug_mode("error")
  - host time of step() (after a synchronize): gradients kept, and reallocated before every step
  - achieved bandwidth: PASSES x parameter bytes / median step time
  - CUDA-graph replay against eager steps (LARSSGD, Triton LAMB)"""


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


def graph_check(variant: Variant, shapes, dtype: torch.dtype) -> dict | str:
    result = graph_replay_matches(variant, shapes, dtype)
    result["within_1e-6"] = result["max_abs_diff"] <= 1e-6
    return result


def host_times(stepper: Stepper, device: str, steps: int) -> dict[str, float]:
    """Median seconds of the ``step()`` call alone (the host's work: launches, tables, Python), its
    queue drained first; with the gradients kept, and with new gradient tensors before every step."""
    kept = [param.grad for param in stepper.params]
    result = {}
    for name, reallocate in (("host_kept_s", False), ("host_new_grads_s", True)):
        times = []
        for _ in range(steps):
            if reallocate:
                for param, grad in zip(stepper.params, stepper.grads):
                    param.grad = grad.clone()
            else:
                stepper.refresh_grads()
            synchronize(device)
            start = time.perf_counter()
            stepper.step()
            times.append(time.perf_counter() - start)
        result[name] = sorted(times)[len(times) // 2]
    for param, grad in zip(stepper.params, kept):
        param.grad = grad
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
        reason = variant.unavailable()
        if reason is not None:
            row["status"] = f"n/a ({reason})"
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
            if device == "cuda":
                row["kernels_per_step"] = kernels_per_step(stepper.step)
                if not variant.baseline:
                    row["sync_debug_error"] = sync_free(stepper.step)
            if variant.mode != "compiled":
                row.update(host_times(stepper, device, 2 if args.dry_run else HOST_STEPS))
            steppers[variant.name] = stepper
        except Exception as error:  # a variant that fails is reported; the others still run
            row["status"] = f"FAILED ({first_line(error)})"
        print(f"  {set_name} {dtype_name} {variant.name}: {row.get('status', 'ready')} "
              f"kernels={row.get('kernels_per_step', '-')} sync={row.get('sync_debug_error', '-')} "
              f"host_us={fmt_host(row)}", flush=True)

    values = interleaved(steppers, args.rounds, args.steps, time.perf_counter)
    baselines = {v.mode: v.name for v in VARIANTS if v.baseline and v.name in values}
    for name, round_values in values.items():
        row = rows[name]
        row.update(status="ok", round_values_s=round_values, **{f"{k}_s": x for k, x in spread(round_values).items()})
        for mode, base in baselines.items():
            if (mode == "lamb") != (row["mode"] == "lamb"):
                continue  # LAMB against AdamW, LARS against SGD
            row[f"ratio_vs_{base}"] = spread(paired_ratios(round_values, values[base]))["median"]
        if name in PASSES:
            row["bandwidth_GBps"] = PASSES[name] * row["bytes"] / row["median_s"] / 1e9
    if device == "cuda":
        for variant in VARIANTS:
            if variant.name in GRAPHED and variant.name in steppers:
                try:
                    rows[variant.name]["cuda_graph"] = graph_check(variant, shapes, dtype)
                except Exception as error:
                    rows[variant.name]["cuda_graph"] = f"FAILED ({first_line(error)})"
    del steppers
    torch._dynamo.reset()
    return list(rows.values())


def fmt_us(row: dict) -> str:
    if row.get("status") != "ok":
        return row.get("status", "?")
    return f"{row['median_s'] * 1e6:.1f} [{row['q1_s'] * 1e6:.1f}, {row['q3_s'] * 1e6:.1f}]"


def fmt_host(row: dict) -> str:
    if "host_kept_s" not in row:
        return ""
    return f"{row['host_kept_s'] * 1e6:.0f} / {row['host_new_grads_s'] * 1e6:.0f}"


def markdown(report: dict) -> str:
    lines = [f"# Optimizer step on {report['device']}", "",
             f"{report['date']}; torch {report['torch']}, triton {report['triton']}; "
             f"{report['rounds']} rounds x {report['steps']} steps; {report['elapsed_s']:.0f} s.", "",
             "Median step time in us [quartiles of the round medians]; ratio = median of per-round ratios "
             "to `SGD(fused=True)` / to compiled `SGD(foreach=True)`; kernels per step from torch.profiler "
             "(CUDA kernel, memcpy and memset events); sync = a step under set_sync_debug_mode('error'); host us = "
             "the step() call alone, gradients kept / reallocated before every step; GB/s = the algorithm's passes "
             "over the parameters' bytes (PASSES in bench/gpu_checks.py) per median step.", "",
             "| set | dtype | variant | step us | vs SGD fused | vs SGD compiled | vs AdamW fused | kernels/step | "
             "sync | host us | GB/s | CUDA graph |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        graph = row.get("cuda_graph", "")
        if isinstance(graph, dict):
            graph = f"{'bit-exact' if graph['matches'] else 'DIFFERS'} (max {graph['max_abs_diff']:.2e})"
        ratios = [f"{row[key]:.2f}" if key in row else ""
                  for key in ("ratio_vs_sgd_fused", "ratio_vs_sgd_compiled", "ratio_vs_adamw_fused")]
        bandwidth = f"{row['bandwidth_GBps']:.0f}" if "bandwidth_GBps" in row else ""
        lines.append(f"| {row['set']} ({row['tensors']}) | {row['dtype']} | {row['label']} | {fmt_us(row)} | "
                     f"{' | '.join(ratios)} | {row.get('kernels_per_step', '')} | "
                     f"{row.get('sync_debug_error', '')} | {fmt_host(row)} | {bandwidth} | {graph} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU tensors, a tiny set, 1 round, no CUDA-only checks (with TRITON_INTERPRET=1 "
                             "TORCHLARS_TRITON_ON_CPU=1 the Triton kernels run in the interpreter)")
    parser.add_argument("--sets", nargs="+", choices=tuple(PARAM_SETS), default=list(PARAM_SETS))
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled SGD baseline")
    parser.add_argument("--out", type=pathlib.Path, default=BENCH_DIR / "results" / "step_cuda")
    args = parser.parse_args()
    print("bench/gpu_checks.py measures, " + WHAT_IS_MEASURED, flush=True)
    if args.dry_run:
        print("dry run: CPU tensors, a tiny set, 1 round; no CUDA-only checks (kernels per step, sync, CUDA graph)",
              flush=True)
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
