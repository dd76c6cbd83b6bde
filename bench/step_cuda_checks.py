"""CUDA-only checks of ``bench_step.py``: host syncs, CUDA graph replay, kernel launches per step."""

from __future__ import annotations

from collections.abc import Callable
import warnings

import torch

from param_sets import PARAM_SETS
from step_timing import make_params
from step_variants import Variant

CHECKED = ("sgd_foreach", "lars_python", "larssgd", "cpp_lars", "loop_0_1_2")


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
    eager_params, _ = make_params(shapes, dtype, "cuda")
    eager_step = variant.build(eager_params)
    for _ in range(steps):
        eager_step()

    graph_params, _ = make_params(shapes, dtype, "cuda")
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
    checks: dict = {"syncs_per_step": {}, "cuda_graph": {}, "kernels_per_step": {}}
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
            params, _ = make_params(shapes, torch.float32, "cuda")
            step = variant.build(params)
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
