"""How many GPU kernels a step launches, modelled on any device (issue 16).

The model: every ATen operator counts as one kernel, but views and allocations (which launch
none); a step operator of ``torchlars_triton`` counts the Triton kernels it launched and the
tables it uploaded; and a
``torch._foreach_*`` operator counts one kernel per tensor when its tensor lists do not pair up
in dtype, shape and strides, which is when ATen's ``ForeachUtils.h`` sends it down the
per-tensor route (a list of 0-d ratios against gradients does), otherwise one.

``bench/step_cuda_checks.py`` sets this count beside ``torch.profiler``'s real one on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that launch no kernel: allocations (and views, found by their schema).
_ALLOCATIONS = {
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::lift_fresh",
    "aten::detach",
    "aten::split_with_sizes",
    "aten::split",
    "aten::unbind",
}
# The step operators of torchlars._triton (one per bucket) launch their Triton kernels without
# the dispatcher: the model runs them and counts what torchlars._triton counted, kernels launched
# and address tables uploaded (a copy, which the profiler shows as a kernel too).
_TRITON_STEPS = "torchlars_triton::"


def _triton_work() -> int:
    module = sys.modules.get("torchlars._triton")
    return 0 if module is None else module.kernel_launches + module.address_uploads + module.chunk_tables_built


@dataclass
class KernelCount:
    kernels: int = 0
    per_tensor_foreach: list[str] = field(default_factory=list)  # foreach ops that took the per-tensor route
    ops: list[str] = field(default_factory=list)


def _tensor_lists(args) -> list[list[torch.Tensor]]:
    return [
        list(arg) for arg in args if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor)
    ]


def _pairs_up(lists: list[list[torch.Tensor]]) -> bool:
    first = lists[0]
    return all(
        len(other) == len(first)
        and all(
            (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()) for a, b in zip(first, other)
        )
        for other in lists[1:]
    )


class _Counting(TorchDispatchMode):
    def __init__(self, count: KernelCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith(_TRITON_STEPS):
            before = _triton_work()
            result = func(*args, **kwargs)
            self.count.kernels += _triton_work() - before
            self.count.ops.append(name)
            return result
        elif not (func.is_view or name in _ALLOCATIONS or name.startswith("profiler::")):  # profiler: host-only
            kernels = 1
            if name.startswith("aten::_foreach_"):
                lists = _tensor_lists([*args, *kwargs.values()])
                if len(lists) > 1 and not _pairs_up(lists):
                    kernels = len(lists[0])
                    self.count.per_tensor_foreach.append(name)
            self.count.kernels += kernels
            self.count.ops.append(name)
        return func(*args, **kwargs)


def count_kernels(step: Callable[[], object]) -> KernelCount:
    """The kernels ``step()`` would launch on a GPU, by the model above."""
    count = KernelCount()
    with _Counting(count):
        step()
    return count
