"""The LARS maths, in one place.

``lars_scale_gradients_`` is the functional entry point: it picks an implementation
(``_multi_tensor_lars_scale_gradients_`` here, the C++ operators of ``torchlars.ops``
when asked) the way ``torch.optim.sgd.sgd`` picks between its own.
"""

from __future__ import annotations

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
) -> None:
    r"""Replace every gradient by its LARS-scaled version, in place.

    .. math:: g \leftarrow (g + \lambda w) \cdot r

    with :math:`r` from :func:`trust_ratio`. ``params[i]`` and ``grads[i]`` belong together.
    """
    if not params:
        return
    _multi_tensor_lars_scale_gradients_(
        params, grads, weight_decay=weight_decay, lr=lr, eps=eps, trust_coef=trust_coef, clip=clip
    )


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
    if weight_decay != 0:
        torch._foreach_add_(grads, params, alpha=weight_decay)
    torch._foreach_mul_(grads, ratios.to(grads[0].dtype).unbind(0))


def _param_and_grad_norms(params: list[Tensor], grads: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The L2 norms of ``params`` and of ``grads`` (all of ``dtype``), each stacked into one tensor."""
    # Half-precision norms are accumulated (and returned) in fp32.
    norm_dtype = torch.float32 if dtype in _HALF_TYPES else None
    param_norms = torch.stack(torch._foreach_norm(params, 2, dtype=norm_dtype))
    grad_norms = torch.stack(torch._foreach_norm(grads, 2, dtype=norm_dtype))
    return param_norms, grad_norms
