"""The LARS maths, in one place.

``lars_scale_gradients_`` is the functional entry point: it picks an implementation
(``_multi_tensor_lars_scale_gradients_`` here, the C++ operators of ``torchlars.ops``
when asked) the way ``torch.optim.sgd.sgd`` picks between its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["lars_scale_gradients_", "trust_ratio"]

_HALF_TYPES = (torch.float16, torch.bfloat16)


def trust_ratio(
    param_norms: Tensor,
    grad_norms: Tensor,
    *,
    weight_decay: float,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
) -> Tensor:
    r"""Layer-wise trust ratios of LARS (You, Gitman & Ginsburg, 2017).

    .. math::
        r = \begin{cases}
            \eta \, \|w\| / (\|g\| + \lambda \|w\| + \epsilon) & \|w\| > 0 \text{ and } \|g\| > 0 \\
            1 & \text{otherwise}
        \end{cases}
        \qquad r \leftarrow \min(r / \text{lr}, 1) \text{ if clip (LARC)}

    Pure tensor ops, so nothing waits on the device: the zero-norm test is a ``torch.where``.
    """
    ratio = trust_coef * param_norms / (grad_norms + weight_decay * param_norms + eps)
    ratio = torch.where((param_norms > 0) & (grad_norms > 0), ratio, torch.ones_like(ratio))
    if clip:
        ratio = torch.clamp(ratio / lr, max=1.0)
    return ratio


def lars_scale_gradients_(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    backend: str = "foreach",
) -> None:
    r"""Replace every gradient by its LARS-scaled version, in place.

    .. math:: g \leftarrow (g + \lambda w) \cdot r

    with :math:`r` from :func:`trust_ratio`. ``params[i]`` and ``grads[i]`` belong together.
    ``backend`` picks the implementation, both giving the same numbers: ``"foreach"``
    (``torch._foreach_*`` ops, here) or ``"cpp"`` (the C++ operator of liblars,
    ``torch.ops.torchlars.lars_scale_gradients_``, in :mod:`torchlars.ops`).
    """
    if not params:
        return
    if backend == "foreach":
        func = _multi_tensor_lars_scale_gradients_
    elif backend == "cpp":
        # Imported here: the pure-Python package works without the C++ extension.
        from torchlars import ops

        func = ops.lars_scale_gradients_
    else:
        raise ValueError(f"lars_scale_gradients_: `backend` must be 'foreach' or 'cpp', got {backend!r}")
    func(params, grads, weight_decay=weight_decay, lr=lr, eps=eps, trust_coef=trust_coef, clip=clip)


def _multi_tensor_lars_scale_gradients_(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
) -> None:
    grouped = _group_tensors_by_device_and_dtype([params, grads])
    for (_, dtype), ((device_params, device_grads), _) in grouped.items():
        param_norms, grad_norms = _param_and_grad_norms(device_params, device_grads, dtype)
        _scale_by_trust_ratio_(
            device_params,
            device_grads,
            param_norms,
            grad_norms,
            weight_decay=weight_decay,
            lr=lr,
            eps=eps,
            trust_coef=trust_coef,
            clip=clip,
        )


def _scale_by_trust_ratio_(
    params: list[Tensor],
    grads: list[Tensor],
    param_norms: Tensor,
    grad_norms: Tensor,
    *,
    weight_decay: float,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
) -> None:
    r""":math:`g \leftarrow (g + \lambda w) \cdot r` for tensors of one device and dtype, given the norms.

    The norms are those of the whole parameters and gradients, which are not those of
    ``params`` and ``grads`` when these are the local shards of DTensors (``_distributed``).
    """
    ratios = trust_ratio(
        param_norms,
        grad_norms,
        weight_decay=weight_decay,
        lr=lr,
        eps=eps,
        trust_coef=trust_coef,
        clip=clip,
    )
    ratios = ratios.to(grads[0].dtype).unbind(0)
    if weight_decay == 0:
        torch._foreach_mul_(grads, ratios)
        return
    # On the CPU, adding the decay and multiplying one cache-sized block at a time reads and
    # writes each gradient from memory once instead of twice. (On a GPU, blocks would multiply
    # the kernel launches; under torch.compile the two ops fuse anyway.)
    if grads[0].device.type == "cpu" and not torch.compiler.is_compiling():
        blocks = _cpu_blocks(params, grads, ratios)
    else:
        blocks = [(params, grads, ratios)]
    for block_params, block_grads, block_ratios in blocks:
        torch._foreach_add_(block_grads, block_params, alpha=weight_decay)
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


def _param_and_grad_norms(params: list[Tensor], grads: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The L2 norms of ``params`` and of ``grads`` (all of ``dtype``), each stacked into one tensor."""
    # Half-precision norms are accumulated (and returned) in fp32.
    norm_dtype = torch.float32 if dtype in _HALF_TYPES else None
    if torch.compiler.is_compiling() and params[0].device.type == "cpu":
        param_norms = torch.stack([_row_blocked_sum_of_squares(p, norm_dtype) for p in params]).sqrt()
        grad_norms = torch.stack([_row_blocked_sum_of_squares(g, norm_dtype) for g in grads]).sqrt()
        return param_norms, grad_norms
    param_norms = torch.stack(torch._foreach_norm(params, 2, dtype=norm_dtype))
    grad_norms = torch.stack(torch._foreach_norm(grads, 2, dtype=norm_dtype))
    return param_norms, grad_norms


# Elements per row of _row_blocked_sum_of_squares.
_NORM_ROW = 4096


def _row_blocked_sum_of_squares(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """The sum of squares of ``tensor``, as a sum over rows of ``_NORM_ROW`` elements.

    For torch.compile on the CPU only (eager steps and liblars keep ``_foreach_norm``). There
    Inductor runs ``_foreach_norm`` as its ATen fallback and compiles a plain sum of squares
    into a cascade summation, both well under memory speed; rows summed one by one, then the
    row sums, compile into plain vectorised loops, which take ResNet-50's two norms from 21 to
    13 ms on this project's 2-core machine. Each row's float sum is short, so the result is
    also closer to the exact norm than ``_foreach_norm``'s single long accumulation.
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
