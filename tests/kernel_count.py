"""How many GPU kernels a step launches, modelled on any device (issue 16).

The model: every ATen operator counts as one kernel, but views and allocations (which launch
none); a Triton operator of ``torchlars_triton`` counts one per kernel it launches, and the
opaque step operator around them is looked into; and a
``torch._foreach_*`` operator counts one kernel per tensor when its tensor lists do not pair up
in dtype, shape and strides, which is when ATen's ``ForeachUtils.h`` sends it down the
per-tensor route (a list of 0-d ratios against gradients does), otherwise one.

``bench/step_cuda_checks.py`` sets this count beside ``torch.profiler``'s real one on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
# Kernels per call of each Triton operator (see torchlars._triton): the ratio operators launch the
# per-chunk sums and the per-tensor ratio program, the others one element-wise kernel.
TRITON_KERNELS = {
    "torchlars_triton::lars_trust_ratios": 2,
    "torchlars_triton::scale_gradients_": 1,
    "torchlars_triton::lars_sgd_": 1,
    "torchlars_triton::lamb_moments_": 2,
    "torchlars_triton::lamb_update_": 1,
    "torchlars_triton::update_trust_ratios": 2,
    "torchlars_triton::scale_update_": 1,
}
# The opaque step operators of torchlars._triton (one per bucket), which launch nothing themselves:
# the model runs their implementation under the mode and counts what it calls.
_STEP_NAMESPACE = "torchlars_triton::"


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
        if name in TRITON_KERNELS:
            self.count.kernels += TRITON_KERNELS[name]
            self.count.ops.append(name)
        elif name.startswith(_STEP_NAMESPACE):
            self.count.ops.append(name)
            with self:
                return torch._library.custom_ops.OPDEFS[name]._init_fn(*args, **kwargs)
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
