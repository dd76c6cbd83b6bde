"""The ``torch._foreach_*`` building blocks of the LARS maths, each tuned per device and for
``torch.compile`` here, so that :mod:`torchlars._functional` states the maths only.

- :func:`norms`: the L2 norm of every tensor of a list, stacked.
- :func:`decay_` and :func:`decay_and_scale_`: :math:`g \\leftarrow (g + \\lambda w) \\cdot r`.
- :func:`grouped_by_device_and_dtype`: torch's own grouping of tensor lists.
- :func:`undone_where_found_inf`: a step taken back where GradScaler found an overflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import importlib
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "decay_",
    "decay_and_scale_",
    "grouped_by_device_and_dtype",
    "norm_dtype",
    "norms",
    "undone_where_found_inf",
]

_HALF_TYPES = (torch.float16, torch.bfloat16)


def norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype norms of ``dtype`` tensors are accumulated and returned in: fp32 for half types."""
    return torch.float32 if dtype in _HALF_TYPES else None


def _grouped_in_python(
    tensorlistlist: list[list[Tensor | None]], with_indices: bool = False
) -> dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor | None]], list[int]]]:
    """What ``torch.utils._foreach_utils._group_tensors_by_device_and_dtype`` does in C++; used
    only if a torch release renames that private function, so that ``import torchlars`` and
    the step keep working. (Indices are always returned, so ``with_indices`` is accepted only
    for the same signature.)"""
    grouped: dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor | None]], list[int]]] = {}
    for index, first in enumerate(tensorlistlist[0]):
        lists, indices = grouped.setdefault((first.device, first.dtype), ([[] for _ in tensorlistlist], []))
        for grouped_list, tensors in zip(lists, tensorlistlist):
            grouped_list.append(tensors[index])
        indices.append(index)
    return grouped


def _torch_grouping() -> Callable[..., Any] | None:
    try:
        foreach_utils = importlib.import_module("torch.utils._foreach_utils")
    except ImportError:
        return None
    return getattr(foreach_utils, "_group_tensors_by_device_and_dtype", None)


#: ``grouped_by_device_and_dtype(tensorlistlist, with_indices=False)``: the lists regrouped by
#: the device and dtype of the first list's tensors (order kept), each with its indices.
grouped_by_device_and_dtype = _torch_grouping() or _grouped_in_python


def norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The L2 norms of ``tensors`` (all of ``dtype``, on one device), stacked into one tensor."""
    if torch.compiler.is_compiling() and tensors[0].device.type == "cpu":
        return torch.stack([_row_blocked_sum_of_squares(tensor, norm_dtype(dtype)) for tensor in tensors]).sqrt()
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=norm_dtype(dtype)))


# Elements per row of _row_blocked_sum_of_squares.
_NORM_ROW = 4096


def _row_blocked_sum_of_squares(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """The sum of squares of ``tensor``, as a sum over rows of ``_NORM_ROW`` elements.

    For torch.compile on the CPU only. There Inductor runs ``_foreach_norm`` as its ATen
    fallback, and compiles a plain sum of squares into a cascade summation; both are well
    under memory speed. Rows summed one by one, then the row sums, compile into plain
    vectorised loops (``python bench/bench_step.py`` times the compiled steps). Each row's
    float sum is short, so the result is also closer to the exact norm than
    ``_foreach_norm``'s single long accumulation.
    """
    flat = tensor.reshape(-1)
    if dtype is not None:
        flat = flat.to(dtype)
    rows = flat.numel() // _NORM_ROW
    body, tail = flat[: rows * _NORM_ROW], flat[rows * _NORM_ROW :]
    total = tail.square().sum()
    if rows:
        total = body.view(rows, _NORM_ROW).square().sum(1).sum() + total
    return total


def decay_(params: list[Tensor], grads: list[Tensor], weight_decay: float | Tensor) -> None:
    r""":math:`g \leftarrow g + \lambda w`, in place (nothing for a float 0)."""
    if isinstance(weight_decay, Tensor):
        # Never compared with 0 nor passed as alpha: both would wait on the device.
        torch._foreach_add_(grads, torch._foreach_mul(params, weight_decay))
    elif weight_decay != 0:
        torch._foreach_add_(grads, params, alpha=weight_decay)


def decay_and_scale_(params: list[Tensor], grads: list[Tensor], ratios: Tensor, weight_decay: float | Tensor) -> None:
    r""":math:`g \leftarrow (g + \lambda w) \cdot r` for tensors of one device and dtype, ``ratios[i]``
    being ``grads[i]``'s.

    The ratios stay in their dtype (fp32 for fp16/bf16 gradients): the multiply then runs in fp32
    and rounds once, instead of every layer's step being off by the ratio's rounding (0.4% in bf16).
    """
    per_tensor = ratios.unbind(0)
    if not isinstance(weight_decay, Tensor) and weight_decay == 0:
        torch._foreach_mul_(grads, per_tensor)
        return
    # On the CPU, adding the decay and multiplying one cache-sized block at a time reads and
    # writes each gradient from memory once instead of twice. (On a GPU, blocks would multiply
    # the kernel launches; under torch.compile the two ops fuse anyway.)
    if grads[0].device.type == "cpu" and not torch.compiler.is_compiling():
        blocks = _cpu_blocks(params, grads, per_tensor)
    else:
        blocks = iter([(params, grads, list(per_tensor))])
    for block_params, block_grads, block_ratios in blocks:
        decay_(block_params, block_grads, weight_decay)
        torch._foreach_mul_(block_grads, block_ratios)


# Elements per block of _cpu_blocks: 1 MiB of fp32 gradient plus as much parameter stays in a
# last-level cache; smaller blocks cost more in per-call overhead than they save (bench/).
_CPU_BLOCK_NUMEL = 1 << 18


def _cpu_blocks(
    params: list[Tensor], grads: list[Tensor], ratios: tuple[Tensor, ...]
) -> Iterator[tuple[list[Tensor], list[Tensor], list[Tensor]]]:
    """``params``, ``grads`` and ``ratios`` regrouped into blocks of about ``_CPU_BLOCK_NUMEL`` elements.

    A larger contiguous tensor is cut into flat slices, views that write through to it; each
    slice keeps its tensor's ratio. Elementwise ops give the same numbers on the slices.
    """
    block_params: list[Tensor] = []
    block_grads: list[Tensor] = []
    block_ratios: list[Tensor] = []
    block_numel = 0
    for param, grad, ratio in zip(params, grads, ratios):
        if grad.numel() > _CPU_BLOCK_NUMEL and param.is_contiguous() and grad.is_contiguous():
            pieces = zip(param.view(-1).split(_CPU_BLOCK_NUMEL), grad.view(-1).split(_CPU_BLOCK_NUMEL))
        else:
            pieces = ((param, grad),)
        for param_piece, grad_piece in pieces:
            block_params.append(param_piece)
            block_grads.append(grad_piece)
            block_ratios.append(ratio)
            block_numel += grad_piece.numel()
            if block_numel >= _CPU_BLOCK_NUMEL:
                yield block_params, block_grads, block_ratios
                block_params, block_grads, block_ratios, block_numel = [], [], [], 0
    if block_params:
        yield block_params, block_grads, block_ratios


_Result = TypeVar("_Result")


def undone_where_found_inf(found_inf: Tensor | None, stepped: list[Tensor], step: Callable[[], _Result]) -> _Result:
    """``step()``, with the tensors it writes (``stepped``) put back as they were where GradScaler's
    ``found_inf`` is non-zero: the plain implementations' way to skip an overflowing step (the
    fused kernels read the flag themselves). Tensor ops: nothing waits on the device."""
    if found_inf is None:
        return step()
    before = [tensor.clone() for tensor in stepped]
    result = step()
    skip = found_inf != 0
    for tensor, old in zip(stepped, before):
        tensor.copy_(torch.where(skip, old, tensor))
    return result
