"""The LARS maths: the trust ratio, and the plain implementations of each LARS step.

The formula is stated once, in :class:`torchlars.LARS`'s docstring; :func:`trust_ratio` computes
it. Two entry points pick an implementation per bucket of tensors (one device and dtype), each
in one dispatching function, the way ``torch.optim.sgd.sgd`` picks between its own:

- :func:`lars_scale_gradients_` scales the gradients for any base optimizer: the Triton kernels
  for GPU tensors (where triton is installed), the C++ operator of ``torchlars.ops`` when asked
  (``backend="cpp"``), else ``torch._foreach_*`` ops (``_multi_tensor_lars_scale_gradients_``);
- :func:`lars_sgd` is a whole LARS + momentum-SGD step: the Triton kernels for GPU tensors,
  liblars's fused CPU operator, else ``_multi_tensor_lars_sgd``, one parameter at a time with
  ``foreach=False``.

:func:`lars_update_` (the "update" ratio, LAMB) and :func:`lars_scaled_gradients` (for
``differentiable=True``) have one implementation each. Where each kernel runs is decided in
:mod:`torchlars._kernels`; the foreach building blocks, tuned per device and for
``torch.compile``, are in :mod:`torchlars._foreach`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchlars import _kernels
from torchlars._foreach import decay_, decay_and_scale_, grouped_by_device_and_dtype, norm_dtype, norms

__all__ = ["TRUST_RATIOS", "lars_scale_gradients_", "lars_scaled_gradients", "lars_sgd", "lars_update_", "trust_ratio"]

TRUST_RATIOS = ("paper", "decayed", "update")


def trust_ratio(
    param_norms: Tensor,
    grad_norms: Tensor,
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str = "paper",
) -> Tensor:
    r"""Layer-wise trust ratios, one per parameter: the formula of :class:`torchlars.LARS`.

    ``grad_norms`` holds, per ``variant``, :math:`\|g\|` (``"paper"``), :math:`\|g + \lambda w\|`
    (``"decayed"``) or the norm of the base's step per unit of learning rate (``"update"``);
    only ``"paper"`` adds :math:`\lambda \|w\|` to the denominator. Pure tensor ops, so
    nothing waits on the device: the zero-norm test is a ``torch.where``.
    """
    denominator = grad_norms + weight_decay * param_norms if variant == "paper" else grad_norms
    ratio = trust_coef * param_norms / (denominator + eps)
    ratio = torch.where((param_norms > 0) & (grad_norms > 0), ratio, torch.ones_like(ratio))
    if clip:
        ratio = torch.clamp(ratio / lr, max=1.0)
    return ratio


def lars_scale_gradients_(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str = "paper",
    backend: str = "foreach",
) -> list[tuple[list[Tensor], Tensor]]:
    r"""Replace every gradient by its LARS-scaled version, in place.

    .. math:: g \leftarrow (g + \lambda w) \cdot r

    with :math:`r` from :func:`trust_ratio` (``variant`` "paper" or "decayed"). ``params[i]`` and
    ``grads[i]`` belong together. Returns, per bucket (device and dtype), the parameters and the
    fp32 ratios the scaling used. ``backend`` picks the implementation for plain tensors, both
    giving the same numbers: ``"foreach"`` (``torch._foreach_*`` ops, or the Triton kernels for
    GPU tensors) or ``"cpp"`` (liblars's ``torch.ops.torchlars.lars_scale_gradients_``).
    """
    if backend not in ("foreach", "cpp"):
        raise ValueError(f"lars_scale_gradients_: `backend` must be 'foreach' or 'cpp', got {backend!r}")
    if not params:
        return []
    settings = dict(weight_decay=weight_decay, lr=lr, eps=eps, trust_coef=trust_coef, clip=clip)
    ratios = []
    for (device, _), ((bucket_params, bucket_grads), _) in grouped_by_device_and_dtype([params, grads]).items():
        if backend == "cpp":
            from torchlars import ops  # the pure-Python package works without the C++ extension

            bucket_ratios = ops.lars_scale_gradients_(bucket_params, bucket_grads, trust_ratio=variant, **settings)
        elif _kernels.triton_steps(device, bucket_params, bucket_grads):
            bucket_ratios = _kernels.triton().scale_gradients_(bucket_params, bucket_grads, variant=variant, **settings)
        else:
            bucket_ratios = _multi_tensor_lars_scale_gradients_(bucket_params, bucket_grads, variant=variant, **settings)
        ratios.append((bucket_params, bucket_ratios))
    return ratios


def lars_scaled_gradients(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    maximize: bool,
    variant: str = "paper",
) -> list[Tensor]:
    r"""The LARS-scaled gradients :math:`(\pm g + \lambda w) \cdot r`, as new tensors.

    For base optimizers with ``differentiable=True``: out of place, so autograd differentiates
    through the scaling (the norms and the ratio included) as through the base's own step, and
    one tensor at a time, as torch's differentiable steps are. ``maximize`` negates ``g`` first.
    """
    scaled = []
    for param, grad in zip(params, grads):
        param = param.clone()  # what autograd saves must outlive the base's in-place update of param
        if maximize:
            grad = -grad
        decayed = grad + weight_decay * param
        ratio = trust_ratio(
            torch.linalg.vector_norm(param, dtype=norm_dtype(param.dtype)),
            torch.linalg.vector_norm(decayed if variant == "decayed" else grad, dtype=norm_dtype(param.dtype)),
            weight_decay=weight_decay,
            lr=lr,
            eps=eps,
            trust_coef=trust_coef,
            clip=clip,
            variant=variant,
        )
        scaled.append((decayed * ratio).to(grad.dtype))
    return scaled


def _multi_tensor_lars_scale_gradients_(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str,
) -> Tensor:
    """``lars_scale_gradients_`` for tensors of one device and dtype; returns their ratios."""
    if variant == "decayed":
        # The ratio is taken from the decayed gradient itself: decay first, then scale.
        decay_(params, grads, weight_decay)
    return scale_by_trust_ratio_(
        params,
        grads,
        norms(params, params[0].dtype),
        norms(grads, grads[0].dtype),
        weight_decay=0.0 if variant == "decayed" else weight_decay,
        lr=lr,
        eps=eps,
        trust_coef=trust_coef,
        clip=clip,
        variant=variant,
    )


def scale_by_trust_ratio_(
    params: list[Tensor],
    grads: list[Tensor],
    param_norms: Tensor,
    grad_norms: Tensor,
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str = "paper",
) -> Tensor:
    r""":math:`g \leftarrow (g + \lambda w) \cdot r` for tensors of one device and dtype, given the
    norms; returns the ratios :math:`r`.

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
        variant=variant,
    )
    decay_and_scale_(params, grads, ratios, weight_decay)
    return ratios


def lars_update_(
    params: list[Tensor],
    params_before: list[Tensor],
    *,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
) -> list[tuple[list[Tensor], Tensor]]:
    r"""Scale the step a base optimizer just took, in place: ``trust_ratio="update"`` (LAMB).

    .. math:: u = w - w_{before} \qquad w \leftarrow w_{before} + r \, u

    with :math:`r` from :func:`trust_ratio` on :math:`\|w_{before}\|` and :math:`\|u\| / \gamma`.
    ``params_before`` is overwritten. Five operations beyond the base's step, about 12 passes over
    the weights: the copy ``params_before`` (made by the caller: a read and a write), :math:`-u`
    in place (two reads, a write), two norms (a read each) and the scaled step (a read and a
    write, then two reads and a write); ``python bench/bench_lamb.py`` measures it. Returns, per
    (device, dtype), the parameters and the fp32 ratios used.
    """
    if not params:
        return []
    ratios = []
    for (_, dtype), ((bucket_params, bucket_before), _) in grouped_by_device_and_dtype([params, params_before]).items():
        param_norms = norms(bucket_before, dtype)
        steps = bucket_before
        torch._foreach_sub_(steps, bucket_params)  # w_before - w: minus the base's step
        ratios.append((bucket_params, scale_update_(bucket_params, steps, param_norms, norms(steps, dtype), lr=lr,
                                                    eps=eps, trust_coef=trust_coef, clip=clip)))
    return ratios


def scale_update_(
    params: list[Tensor],
    minus_steps: list[Tensor],
    param_norms: Tensor,
    step_norms: Tensor,
    *,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
) -> Tensor:
    r""":math:`w \leftarrow w_{before} + r \, u` for tensors of one device and dtype, given
    ``minus_steps`` :math:`= -u` (overwritten) and the norms of :math:`w_{before}` and :math:`u`;
    returns the ratios :math:`r`. The norms are the whole tensors' for DTensor shards."""
    ratios = trust_ratio(
        param_norms,
        step_norms / lr,
        weight_decay=0.0,
        lr=lr,
        eps=eps,
        trust_coef=trust_coef,
        clip=clip,
        variant="update",
    )
    # w + (1 - r) (w_before - w) = w_before + r u; exactly the base's step when r = 1.
    torch._foreach_mul_(minus_steps, (1 - ratios).unbind(0))
    torch._foreach_add_(params, minus_steps)
    return ratios


# ---------------------------------------------------------------------------------------
# A whole LARS + momentum-SGD step


def lars_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str = "paper",
) -> list[tuple[list[Tensor], Tensor]]:
    r"""One LARS step of momentum SGD for the parameters of one param group: the numbers of
    ``LARS(torch.optim.SGD(...))``, with the formula of :class:`torchlars.LARSSGD`.

    ``momentum_buffer_list[i]`` is ``params[i]``'s buffer, or None before its first step (then
    set here, as ``torch.optim.sgd.sgd`` does). ``grads`` are left as they are. ``grad_scale``
    and ``found_inf`` are ``torch.amp.GradScaler``'s: the gradients are divided by
    ``grad_scale``, and nothing changes if ``found_inf`` is non-zero. ``variant`` is "paper" or
    "decayed" (see :func:`trust_ratio`).

    Per bucket (device and dtype): ``fused=True`` takes the Triton kernels (GPU tensors) or
    liblars's fused operator (CPU tensors), and refuses a bucket neither steps; ``fused=None``
    and ``foreach=None`` take them where they run and ``torch._foreach_*`` ops elsewhere;
    ``foreach=True`` takes the foreach ops, and ``foreach=False`` steps one parameter at a
    time. Returns, per kernel call, the parameters and the fp32 ratios the step used.
    """
    if not params:
        return []
    settings = dict(
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        eps=eps,
        trust_coef=trust_coef,
        clip=clip,
        variant=variant,
    )
    grouped = grouped_by_device_and_dtype([params, grads, momentum_buffer_list], with_indices=True)
    chosen = {
        key: _lars_sgd_implementation(key, bucket, bucket_grads, foreach=foreach, fused=fused)
        for key, ((bucket, bucket_grads, _), _) in grouped.items()
    }
    if "fused" in chosen.values() and _kernels.skipped_by_grad_scaler(found_inf):
        return []  # the fused operator would skip it too, and no first step leaves buffers behind
    amp = dict(grad_scale=grad_scale, found_inf=found_inf)
    ratios = []
    for key, ((bucket_params, bucket_grads, bucket_buffers), indices) in grouped.items():
        implementation = chosen[key]
        if implementation == "triton":
            ratios += _kernels.triton().lars_sgd_(bucket_params, bucket_grads, bucket_buffers, **amp, **settings)
        elif implementation == "fused":
            ratios += _kernels.fused_lars_sgd(bucket_params, bucket_grads, bucket_buffers, **amp, **settings)
        elif implementation == "foreach":
            ratios.append(_multi_tensor_lars_sgd(bucket_params, bucket_grads, bucket_buffers, **amp, **settings))
        else:
            ratios += _single_tensor_lars_sgd(bucket_params, bucket_grads, bucket_buffers, **amp, **settings)
        for index, buffer in zip(indices, bucket_buffers):
            momentum_buffer_list[index] = buffer
    return ratios


def _lars_sgd_implementation(
    key: tuple[torch.device, torch.dtype], params: list[Tensor], grads: list[Tensor], *, foreach: bool | None,
    fused: bool | None
) -> str:
    """"triton", "fused", "foreach" or "single" for a bucket of ``lars_sgd``."""
    device, dtype = key
    if fused or (fused is None and foreach is None):
        if _kernels.triton_steps(device, params, grads):
            return "triton"
        if _kernels.fused_bucket(device, dtype, params):
            return "fused"
        if fused:
            raise RuntimeError(
                f"lars_sgd: fused=True steps plain CPU tensors of {_kernels.FUSED_DTYPES} (and CUDA tensors with "
                f"triton), got {type(params[0]).__name__} tensors of {dtype} on {device}"
            )
    return "single" if foreach is False else "foreach"


def _single_tensor_lars_sgd(
    params: list[Tensor], grads: list[Tensor], momentum_buffer_list: list[Tensor | None], **settings: Any
) -> list[tuple[list[Tensor], Tensor]]:
    """``_multi_tensor_lars_sgd`` one parameter at a time (``foreach=False``)."""
    ratios = []
    for index in range(len(params)):
        buffers = momentum_buffer_list[index : index + 1]
        ratios.append(_multi_tensor_lars_sgd(params[index : index + 1], grads[index : index + 1], buffers, **settings))
        momentum_buffer_list[index : index + 1] = buffers
    return ratios


def _multi_tensor_lars_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str,
) -> tuple[list[Tensor], Tensor]:
    """``lars_sgd`` in ``torch._foreach_*`` ops, for tensors of one device and dtype: returns the
    parameters and their ratios. A buffer that is None is created (a first step)."""
    device_params, device_grads, device_buffers = params, grads, momentum_buffer_list
    dtype = params[0].dtype
    # New tensors from here on: the caller's gradients stay as they are.
    if grad_scale is not None:
        device_grads = torch._foreach_div(device_grads, grad_scale)
    if maximize:
        device_grads = torch._foreach_neg(device_grads)
    if variant == "decayed":
        device_grads = torch._foreach_add(device_grads, device_params, alpha=weight_decay)
    group_ratios = trust_ratio(
        norms(device_params, dtype),
        norms(device_grads, dtype),
        weight_decay=weight_decay,
        lr=lr,
        eps=eps,
        trust_coef=trust_coef,
        clip=clip,
        variant=variant,
    )
    ratios = group_ratios.unbind(0)
    if weight_decay != 0 and variant == "paper":
        updates = torch._foreach_add(device_grads, device_params, alpha=weight_decay)
        torch._foreach_mul_(updates, ratios)
    else:
        updates = torch._foreach_mul(device_grads, ratios)
    if found_inf is not None:
        # Kept to restore on an overflow: buffers before their update, parameters before theirs.
        old_params = [param.clone() for param in device_params]
        old_buffers = [None if buffer is None else buffer.clone() for buffer in device_buffers]
    if momentum != 0:
        existing = [i for i, buffer in enumerate(device_buffers) if buffer is not None]
        if existing:
            torch._foreach_mul_([device_buffers[i] for i in existing], momentum)
            torch._foreach_add_([device_buffers[i] for i in existing], [updates[i] for i in existing],
                                alpha=1 - dampening)
        for i, buffer in enumerate(device_buffers):
            if buffer is None:
                device_buffers[i] = updates[i].clone()
        buffers = list(device_buffers)
        if nesterov:
            torch._foreach_add_(updates, buffers, alpha=momentum)
        else:
            updates = buffers
    if isinstance(lr, Tensor):
        # alpha=<tensor> would wait on the device for its value (.item()).
        torch._foreach_add_(device_params, torch._foreach_mul(updates, -lr))
    else:
        torch._foreach_add_(device_params, updates, alpha=-lr)
    if found_inf is not None:
        skip = found_inf != 0
        for param, old in zip(device_params, old_params):
            param.copy_(torch.where(skip, old, param))
        for buffer, old in zip(device_buffers, old_buffers):
            # A first step's new buffer has nothing to go back to: zeros, which the next
            # step's update turns into that step's d (exactly so when dampening is 0).
            buffer.copy_(torch.where(skip, torch.zeros_like(buffer) if old is None else old, buffer))
    return params, group_ratios
