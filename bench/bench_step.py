"""Optimizer step time of LARS against plain SGD and the alternatives, on CPU or CUDA.

Every variant steps its own copy of the same parameters and gradients (lr=0.01,
momentum=0.9, weight_decay=1e-4; LARS eps=1e-8, trust_coef=1e-3, every parameter adapted).
The variants are timed interleaved, round after round, and the median step time of each is
compared with the SGD baseline of the same mode (eager against ``SGD foreach``, compiled
against compiled ``SGD foreach``). A variant whose dependency is missing is reported as
``n/a (reason)``. On CUDA the script also checks that the LARS step never synchronises with
the host, replays it in a CUDA graph, and counts its kernel launches.

    python bench/bench_step.py --device cpu --quick
    python bench/bench_step.py --device cuda            # the full GPU run

Writes ``<out>.md``, ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import contextlib
import dataclasses
import datetime
import importlib.util
import inspect
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import Tensor

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
if importlib.util.find_spec("torchlars") is None:
    # Not installed: use the source tree (the pure-Python pieces; the C++ ones need the build).
    sys.path.insert(0, str(REPO_DIR / "python"))

import torchlars  # noqa: E402
from torchlars import LARS  # noqa: E402

from param_sets import PARAM_SETS, numel  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4
EPS, TRUST_COEF = 1e-8, 1e-3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------
# The baseline users have today: torchlars 0.1.2's algorithm, one parameter at a time.


class PerParameterLARS:
    """torchlars 0.1.2's algorithm: a Python loop over parameters, norms compared on the host."""

    def __init__(self, optimizer: torch.optim.Optimizer, eps: float, trust_coef: float) -> None:
        self.optim, self.eps, self.trust_coef = optimizer, eps, trust_coef

    @torch.no_grad()
    def step(self) -> None:
        weight_decays = []
        for group in self.optim.param_groups:
            weight_decay = group.get("weight_decay", 0.0)
            weight_decays.append(weight_decay)
            for param in group["params"]:
                if param.grad is None:
                    continue
                param_norm, grad_norm = param.norm(), param.grad.norm()
                if param_norm > 0 and grad_norm > 0:  # two host syncs per parameter on a GPU
                    ratio = self.trust_coef * param_norm / (grad_norm + weight_decay * param_norm + self.eps)
                else:
                    ratio = 1.0
                param.grad.add_(param, alpha=weight_decay).mul_(ratio)
            group["weight_decay"] = 0.0
        try:
            self.optim.step()
        finally:
            for group, weight_decay in zip(self.optim.param_groups, weight_decays):
                group["weight_decay"] = weight_decay


# ---------------------------------------------------------------------------------------
# Variants


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    label: str
    mode: str  # "eager" or "compiled": which SGD baseline it is compared with
    passes: int  # passes over the parameter set that the least memory traffic needs
    build: Callable[[list[Tensor]], Callable[[], object]]  # parameters with grads -> step()
    unavailable: Callable[[], str | None] = lambda: None  # why it cannot run, or None


def _sgd(params: list[Tensor], **impl: bool) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **impl)


def _lars(params: list[Tensor], *, backend: str | None = None, **impl: bool) -> LARS:
    options = {} if backend is None else {"backend": backend}
    return LARS(_sgd(params, **impl), eps=EPS, trust_coef=TRUST_COEF, **options)


def _compiled(step: Callable[[], object]) -> Callable[[], object]:
    return torch.compile(lambda: step())


def _no_cpp_ops(device: str) -> Callable[[], str | None]:
    def unavailable() -> str | None:
        if "backend" not in inspect.signature(LARS).parameters:
            return "this torchlars has no backend option"
        try:
            param = torch.ones(2, device=device, requires_grad=True)
            param.grad = torch.ones_like(param)
            _lars([param], backend="cpp").step()
        except (ImportError, RuntimeError, ValueError, AttributeError) as error:
            return f"backend='cpp': {str(error).splitlines()[0][:120]}"
        return None

    return unavailable


def _no_cpp_lars() -> str | None:
    try:
        import torchlars.cpp  # noqa: F401
    except ImportError as error:
        return f"torchlars.cpp: {error}; pip install --no-build-isolation . and run without PYTHONPATH"
    return None


def _build_cpp_lars(params: list[Tensor]) -> Callable[[], object]:
    import torchlars.cpp

    optimizer = torchlars.cpp.LARS(
        params, base="sgd", eps=EPS, trust_coef=TRUST_COEF, clip=False,
        lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
    )
    return optimizer.step


def _no_timm() -> str | None:
    return None if importlib.util.find_spec("timm") else "timm not installed"


def _build_timm_lars(params: list[Tensor]) -> Callable[[], object]:
    from timm.optim import Lars

    return Lars(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, trust_coeff=TRUST_COEF, eps=EPS).step


def _fused_sgd_missing(device: str) -> Callable[[], str | None]:
    def unavailable() -> str | None:
        try:
            param = torch.zeros(2, device=device, requires_grad=True)
            param.grad = torch.zeros_like(param)
            torch.optim.SGD([param], lr=LR, momentum=MOMENTUM, fused=True).step()
        except (RuntimeError, ValueError) as error:
            return f"fused SGD: {error}"
        return None

    return unavailable


def variants(device: str) -> list[Variant]:
    fused_missing = _fused_sgd_missing(device)
    return [
        Variant("sgd_foreach", "SGD foreach", "eager", 5, lambda p: _sgd(p, foreach=True).step),
        Variant("sgd_fused", "SGD fused", "eager", 5, lambda p: _sgd(p, fused=True).step, fused_missing),
        Variant("lars_python", "LARS(SGD foreach), Python", "eager", 7, lambda p: _lars(p, foreach=True).step),
        Variant("lars_python_fused", "LARS(SGD fused), Python", "eager", 7,
                lambda p: _lars(p, fused=True).step, fused_missing),
        Variant("lars_cpp_ops", "LARS(SGD foreach), C++ operators", "eager", 7,
                lambda p: _lars(p, backend="cpp", foreach=True).step, _no_cpp_ops(device)),
        Variant("cpp_lars", "lars::LARS(SGD) via torchlars.cpp", "eager", 7, _build_cpp_lars, _no_cpp_lars),
        Variant("loop_0_1_2", "per-parameter loop (torchlars 0.1.2)", "eager", 7,
                lambda p: PerParameterLARS(_sgd(p, foreach=False), EPS, TRUST_COEF).step),
        Variant("timm_lars", "timm.optim.Lars", "eager", 7, _build_timm_lars, _no_timm),
        Variant("sgd_compiled", "SGD foreach, compiled", "compiled", 5,
                lambda p: _compiled(_sgd(p, foreach=True).step)),
        Variant("lars_compiled", "LARS(SGD foreach), compiled", "compiled", 7,
                lambda p: _compiled(_lars(p, foreach=True).step)),
    ]


BASELINES = {"eager": "sgd_foreach", "compiled": "sgd_compiled"}
# "thread": CPU time of the calling thread, which on a shared machine leaves out the time
# other processes take; meaningful with --threads 1 on the CPU only.
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


# ---------------------------------------------------------------------------------------
# Timing


def make_params(shapes, dtype: torch.dtype, device: str, seed: int = 0) -> list[Tensor]:
    """Parameters with gradients, identical for every call with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        param = (torch.randn(shape, generator=generator) / math.sqrt(fan_in)).to(device, dtype)
        param.requires_grad_(True)
        param.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device, dtype)
        params.append(param)
    return params


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], object], steps: int, device: str, clock: Callable[[], float]) -> float:
    """Seconds per step, averaged over ``steps`` back-to-back steps."""
    synchronize(device)
    start = clock()
    for _ in range(steps):
        step()
    synchronize(device)
    return (clock() - start) / steps


def copy_bandwidth(nbytes: int, device: str, repeats: int, clock: Callable[[], float]) -> float:
    """Bytes per second of ``dst.copy_(src)`` (one read and one write) on ``nbytes`` buffers."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        dst.copy_(src)
        synchronize(device)
        times.append(clock() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def bench_case(set_name: str, dtype_name: str, device: str, chosen: list[Variant], args) -> list[dict]:
    shapes = PARAM_SETS[set_name]()
    dtype = DTYPES[dtype_name]
    set_bytes = numel(shapes) * dtype.itemsize
    rows, steps = {}, {}
    for variant in chosen:
        row = {"set": set_name, "dtype": dtype_name, "variant": variant.name, "label": variant.label,
               "mode": variant.mode, "passes": variant.passes, "tensors": len(shapes), "bytes": set_bytes}
        reason = variant.unavailable()
        if reason is None and variant.mode == "compiled" and args.no_compile:
            reason = "--no-compile"
        if reason is None and variant.mode == "compiled" and args.quick and len(shapes) > 200:
            reason = f"--quick: compiling a step over {len(shapes)} tensors takes minutes"
        if reason is None:
            try:
                step = variant.build(make_params(shapes, dtype, device))
                start = time.perf_counter()
                for _ in range(args.warmup):
                    step()
                synchronize(device)
                row["warmup_s"] = time.perf_counter() - start
                steps[variant.name] = step
            except Exception as error:  # a variant that fails is reported, not fatal
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        if reason is not None:
            row["status"] = f"n/a ({reason})"
        rows[variant.name] = row
        print(f"  {set_name} {dtype_name} {variant.name}: {row.get('status', 'ready')}", flush=True)

    samples = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(args.rounds):
        # Rotate the order so that no variant always runs right after the same neighbour.
        offset = round_index % len(names)
        for name in names[offset:] + names[:offset]:
            samples[name].append(time_steps(steps[name], args.steps, device, CLOCKS[args.clock]))

    for name, times in samples.items():
        row = rows[name]
        row["status"] = "ok"
        row["median_s"] = statistics.median(times)
        row["min_s"] = min(times)
        row["samples"] = len(times)
        row["effective_bandwidth"] = row["passes"] * set_bytes / row["median_s"]
    for row in rows.values():
        baseline = rows.get(BASELINES[row["mode"]], {})
        if "median_s" in row and "median_s" in baseline:
            row["ratio"] = row["median_s"] / baseline["median_s"]
    del steps
    torch._dynamo.reset()
    return list(rows.values())


# ---------------------------------------------------------------------------------------
# CUDA-only checks: host syncs, CUDA graph replay, kernel launches


CHECKED = ("sgd_foreach", "lars_python", "lars_cpp_ops", "cpp_lars", "loop_0_1_2")


def count_syncs(step: Callable[[], object]) -> int | str:
    """Synchronising CUDA calls made by one step, as ``torch.cuda.set_sync_debug_mode`` sees them.

    Warnings raised in a C++ extension may not reach Python's ``warnings``, so a step that
    shows none is run once more in "error" mode, where a sync raises wherever it happens.
    """
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(warning.message) for warning in caught)
    if syncs == 0:
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError as error:
            if "synchroniz" not in str(error):
                raise
            syncs = ">=1 (error mode)"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return syncs


def count_kernels(step: Callable[[], object]) -> int:
    """GPU kernels (memcpy and memset included) launched by one step, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(event.device_type == torch.autograd.DeviceType.CUDA for event in prof.events())


def graph_replay_matches(variant: Variant, shapes, dtype: torch.dtype, steps: int = 6, warmup: int = 3) -> dict:
    """Step one copy eagerly and one by replaying a captured CUDA graph; compare parameters."""
    eager_params = make_params(shapes, dtype, "cuda")
    eager_step = variant.build(eager_params)
    for _ in range(steps):
        eager_step()

    graph_params = make_params(shapes, dtype, "cuda")
    graph_step = variant.build(graph_params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture requires
        for _ in range(warmup):
            graph_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_step()
    for _ in range(steps - warmup):
        graph.replay()
    torch.cuda.synchronize()
    max_diff = max((a - b).abs().max().item() for a, b in zip(eager_params, graph_params))
    return {"matches": max_diff == 0.0, "max_abs_diff": max_diff}


def cuda_checks(chosen: list[Variant]) -> dict:
    checks = {"syncs_per_step": {}, "cuda_graph": {}, "kernels_per_step": {}}
    for variant in chosen:
        if variant.name not in CHECKED:
            continue
        reason = variant.unavailable()
        for set_name in ("resnet50", "small"):
            shapes = PARAM_SETS[set_name]()
            key = f"{variant.name}/{set_name}"
            if reason is not None:
                for table in checks.values():
                    table[key] = f"n/a ({reason})"
                continue
            step = variant.build(make_params(shapes, torch.float32, "cuda"))
            for _ in range(3):
                step()
            checks["syncs_per_step"][key] = count_syncs(step)
            checks["kernels_per_step"][key] = count_kernels(step)
            if variant.name == "loop_0_1_2":
                checks["cuda_graph"][key] = "n/a (synchronises, cannot be captured)"
                continue
            try:
                checks["cuda_graph"][key] = graph_replay_matches(variant, shapes, torch.float32)
            except Exception as error:
                checks["cuda_graph"][key] = f"FAILED ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
            print(f"  checks {key}: syncs={checks['syncs_per_step'][key]} "
                  f"kernels={checks['kernels_per_step'][key]} graph={checks['cuda_graph'][key]}", flush=True)
    return checks


# ---------------------------------------------------------------------------------------
# Targets and reporting


def evaluate_targets(results: list[dict], device: str, copy_bw: dict, checks: dict | str) -> list[dict]:
    """The issue's targets, for ResNet-50 fp32 with momentum SGD."""
    by_name = {row["variant"]: row for row in results if row["set"] == "resnet50" and row["dtype"] == "fp32"}

    def median(name):
        return by_name.get(name, {}).get("median_s")

    targets = []

    def target(what: str, value: float | None, limit: float, higher_is_better: bool = False) -> None:
        if value is None:
            verdict = "n/a"
        else:
            verdict = "met" if (value >= limit if higher_is_better else value <= limit) else "MISSED"
        targets.append({"target": what, "value": value, "limit": limit, "verdict": verdict})

    eager_limit, compiled_limit = 1.1, (1.45 if device == "cuda" else 1.6)
    for name in ("lars_python", "lars_python_fused", "lars_cpp_ops", "cpp_lars"):
        ratio = by_name.get(name, {}).get("ratio")
        target(f"{by_name.get(name, {}).get('label', name)} / SGD foreach eager", ratio, eager_limit)
    target("LARS compiled / SGD compiled", by_name.get("lars_compiled", {}).get("ratio"), compiled_limit)
    if device == "cuda":
        bandwidth = copy_bw.get(("resnet50", "fp32"))
        for name in ("lars_python", "lars_cpp_ops", "cpp_lars", "lars_compiled"):
            row = by_name.get(name, {})
            share = row["effective_bandwidth"] / bandwidth if "effective_bandwidth" in row and bandwidth else None
            target(f"{row.get('label', name)}: effective bandwidth / copy bandwidth", share, 0.8, True)
        for name in ("lars_python", "lars_cpp_ops", "cpp_lars"):
            loop, fast = median("loop_0_1_2"), median(name)
            target(f"per-parameter loop / {name}", loop / fast if loop and fast else None, 10.0, True)
            timm, fast = median("timm_lars"), median(name)
            target(f"timm Lars / {name}", timm / fast if timm and fast else None, 1.0, True)
    if isinstance(checks, dict):
        for key, syncs in checks["syncs_per_step"].items():
            if not key.startswith(("sgd", "loop")):
                if isinstance(syncs, str):  # ">=1 (error mode)", or "n/a (...)"
                    syncs = 1 if syncs.startswith(">=") else None
                target(f"{key}: host syncs per step", syncs, 0)
        kernels = checks["kernels_per_step"]
        for name in ("lars_python", "lars_cpp_ops", "cpp_lars"):
            for set_name in ("resnet50", "small"):
                ours, sgd = kernels.get(f"{name}/{set_name}"), kernels.get(f"sgd_foreach/{set_name}")
                extra = ours - sgd if isinstance(ours, int) and isinstance(sgd, int) else None
                # Multi-tensor kernels batch many tensors per launch; a kernel per tensor is a loop.
                tensors = len(PARAM_SETS[set_name]())
                target(f"{name}/{set_name}: kernels beyond SGD foreach, per tensor",
                       extra / tensors if extra is not None else None, 0.1)
    return targets


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torchlars": getattr(torchlars, "__version__", "?"), "torchlars_path": str(pathlib.Path(torchlars.__file__).parent),
            "cpu": platform.processor(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, check=True).stdout.strip()
    if importlib.util.find_spec("timm"):
        import timm

        info["timm"] = timm.__version__
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _format_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def markdown(report: dict) -> str:
    info = report["machine"]
    lines = [f"# LARS step benchmark ({report['device']})", "",
             f"- Command: `{report['command']}`",
             f"- Date: {report['date']}",
             f"- Machine: {info.get('gpu', info['cpu'])}; {info['cpu_count']} CPU cores ({info['cpu']}); "
             f"torch {info['torch']}, {info['torch_threads']} threads; Python {info['python']}; "
             f"torchlars {info['torchlars']} ({info.get('git_commit', '?')}); timm {info.get('timm', 'not installed')}",
             f"- lr={LR}, momentum={MOMENTUM}, weight_decay={WEIGHT_DECAY}; LARS eps={EPS}, trust_coef={TRUST_COEF}; "
             f"{report['rounds']} interleaved rounds of {report['steps']} steps; medians of "
             + ("wall time." if report["clock"] == "wall" else "the stepping thread's CPU time (`--clock thread`)."),
             "- *vs SGD*: median over the SGD foreach median of the same mode (eager or compiled). "
             "*Eff. BW*: the least traffic (5 passes over the parameter set for SGD, 7 for LARS) "
             "over the step time; *copy BW*: `dst.copy_(src)` on a buffer of the set's size, same run.",
             ""]
    for (set_name, dtype_name), rows in _cases(report["results"]).items():
        first = rows[0]
        bandwidth = report["copy_bandwidth"].get(f"{set_name}/{dtype_name}")
        lines += [f"## {set_name}, {dtype_name}: {first['tensors']} tensors, {first['bytes'] / 1e6:.1f} MB"
                  + (f"; copy BW {bandwidth / 1e9:.1f} GB/s" if bandwidth else ""), "",
                  "| variant | mode | step (median) | vs SGD | eff. BW | % of copy BW |",
                  "|---|---|---:|---:|---:|---:|"]
        for row in rows:
            if row["status"] != "ok":
                lines.append(f"| {row['label']} | {row['mode']} | {row['status']} | | | |")
                continue
            ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "–"
            share = f"{100 * row['effective_bandwidth'] / bandwidth:.0f}%" if bandwidth else "–"
            lines.append(f"| {row['label']} | {row['mode']} | {_format_time(row['median_s'])} | {ratio} | "
                         f"{row['effective_bandwidth'] / 1e9:.1f} GB/s | {share} |")
        lines.append("")
    lines += ["## Targets (ResNet-50, fp32, momentum SGD)", "", "| target | value | limit | verdict |", "|---|---:|---:|---|"]
    for target in report["targets"]:
        value = "–" if target["value"] is None else f"{target['value']:.2f}"
        lines.append(f"| {target['target']} | {value} | {target['limit']} | {target['verdict']} |")
    lines.append("")
    checks = report["cuda_checks"]
    lines += ["## Host syncs, CUDA graphs, kernel launches (fp32)", ""]
    if isinstance(checks, str):
        lines += [checks, ""]
    else:
        lines += ["| variant / set | syncs per step | CUDA graph replay | kernels per step |", "|---|---:|---|---:|"]
        for key, syncs in checks["syncs_per_step"].items():
            graph = checks["cuda_graph"].get(key, "–")
            if isinstance(graph, dict):
                graph = ("matches eager" if graph["matches"] else "DIFFERS") + f" (max diff {graph['max_abs_diff']:.1e})"
            lines.append(f"| {key} | {syncs} | {graph} | {checks['kernels_per_step'].get(key, '–')} |")
        lines.append("")
    return "\n".join(lines)


def _cases(results: list[dict]) -> dict:
    cases: dict = {}
    for row in results:
        cases.setdefault((row["set"], row["dtype"]), []).append(row)
    return cases


def chart(report: dict, path: pathlib.Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = _cases(report["results"])
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 5), squeeze=False)
    for ax, ((set_name, dtype_name), rows) in zip(axes[0], cases.items()):
        rows = [row for row in rows if "ratio" in row]
        labels = [row["label"] for row in rows]
        ratios = [row["ratio"] for row in rows]
        colors = ["tab:gray" if row["variant"].startswith("sgd") else
                  "tab:red" if row["variant"] in ("loop_0_1_2", "timm_lars") else "tab:blue" for row in rows]
        ax.barh(range(len(rows)), ratios, color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(1.4, color="tab:green", linestyle="--", linewidth=0.8, label="7/5 passes (floor)")
        for index, ratio in enumerate(ratios):
            ax.text(ratio, index, f" {ratio:.2f}x", va="center", fontsize=7)
        ax.set_title(f"{set_name}, {dtype_name}", fontsize=10)
        ax.set_xlabel("step time / SGD foreach (same mode)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"LARS step vs SGD on {report['machine'].get('gpu', report['machine']['cpu'])}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--sets", nargs="+", choices=tuple(PARAM_SETS), default=list(PARAM_SETS))
    parser.add_argument("--variants", nargs="+", help="only these variants (names as in the JSON)")
    parser.add_argument("--quick", action="store_true", help="few rounds, for a first look")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 5 quick, 15 full; x3 on CUDA)")
    parser.add_argument("--steps", type=int, help="steps per timing sample (default: 2 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation included)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
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
    args.rounds = args.rounds or (5 if args.quick else 15) * (3 if args.device == "cuda" else 1)
    args.steps = args.steps or (20 if args.device == "cuda" else 2)
    out = args.out or BENCH_DIR / "results" / f"step_{args.device}"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    chosen = [v for v in variants(args.device) if not args.variants or v.name in args.variants]
    for mode, baseline in BASELINES.items():
        if any(v.mode == mode for v in chosen) and baseline not in {v.name for v in chosen}:
            parser.error(f"--variants: the {mode} variants need their baseline {baseline}")

    results, copy_bw = [], {}
    for set_name in args.sets:
        for dtype_name in args.dtype:
            print(f"{set_name}, {dtype_name}:", flush=True)
            nbytes = numel(PARAM_SETS[set_name]()) * DTYPES[dtype_name].itemsize
            copy_bw[(set_name, dtype_name)] = copy_bandwidth(nbytes, args.device, 3 * args.rounds, CLOCKS[args.clock])
            results += bench_case(set_name, dtype_name, args.device, chosen, args)

    if args.device == "cuda":
        print("CUDA checks:", flush=True)
        checks = cuda_checks(chosen)
    else:
        checks = ("Skipped: host syncs, CUDA graph replay and kernel launches are CUDA-only checks; "
                  "run with `--device cuda` on a GPU machine.")
        print(checks)

    report = {
        "device": args.device,
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "clock": args.clock,
        "copy_bandwidth": {f"{s}/{d}": bw for (s, d), bw in copy_bw.items()},
        "results": results,
        "targets": evaluate_targets(results, args.device, copy_bw, checks),
        "cuda_checks": checks,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    chart(report, out.with_suffix(".png"))
    print(markdown(report))
    print(f"wrote {out}.md, .json, .png")


if __name__ == "__main__":
    main()
