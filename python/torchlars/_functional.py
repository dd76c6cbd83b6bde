"""The LARS maths: its settings, the trust ratio, and the plain implementations of each step.

The formula is stated once, in :class:`torchlars.LARS`'s docstring; :func:`trust_ratio`
computes it and every implementation (these, the fused C++ operator's Python face, the Triton
kernels) refers to it. This module is a leaf: it imports torch and the foreach building
blocks of :mod:`torchlars._foreach` only. Which implementation steps a bucket of tensors is
decided in :mod:`torchlars._dispatch`, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchlars._foreach import decay_, decay_and_scale_, norm_dtype, norms

__all__ = [
    "TRUST_RATIOS",
    "LAMBSettings",
    "LARSSettings",
    "MomentumSGD",
    "multi_tensor_lars_scale_gradients_",
    "multi_tensor_lars_sgd",
    "lars_scaled_gradients",
    "lr_tensor",
    "multi_tensor_lars_update_",
    "ratio_dtype",
    "scale_by_trust_ratio_",
    "scale_update_",
    "single_tensor_lars_sgd",
    "trust_ratio",
]

#: The kinds of trust ratio (``trust_ratio=`` of :class:`torchlars.LARS`).
TRUST_RATIOS = ("paper", "decayed", "update")


@dataclass(frozen=True)
class LARSSettings:
    """LARS's own settings, one object handed to every implementation.

    ``kind`` is the optimizer's ``trust_ratio`` option: ``"paper"``, ``"decayed"`` or ``"update"``.
    Weight decay and learning rate are the param group's, so they are passed beside it.
    """

    eps: float = 1e-8
    trust_coef: float = 1e-3
    clip: bool = False
    kind: str = "paper"


@dataclass(frozen=True)
class MomentumSGD:
    """The options of one momentum-SGD param group, as ``torch.optim.SGD`` names them."""

    lr: float | Tensor
    weight_decay: float
    momentum: float
    dampening: float
    nesterov: bool
    maximize: bool

    @classmethod
    def of(cls, group: dict) -> MomentumSGD:
        return cls(group["lr"], group["weight_decay"], group["momentum"], group["dampening"], group["nesterov"],
                   group.get("maximize", False))


@dataclass(frozen=True)
class LAMBSettings:
    """The settings of one :class:`torchlars.LAMB` param group, one object for every implementation
    (the names of ``LAMB``'s arguments; ``adapt`` is whether the group's step is scaled by trust
    ratios, False for AdamW's step). The learning rate is passed beside it."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    trust_coef: float
    trust_eps: float
    trust_clip: bool
    adapt: bool
    bias_correction: bool
    maximize: bool

    @classmethod
    def of(cls, group: dict, *, adapt: bool) -> LAMBSettings:
        beta1, beta2 = group["betas"]
        return cls(beta1, beta2, group["eps"], group["weight_decay"], group["trust_coef"], group["trust_eps"],
                   group["trust_clip"], adapt, group["bias_correction"], group["maximize"])


def trust_ratio(
    param_norms: Tensor, grad_norms: Tensor, settings: LARSSettings, *, weight_decay: float | Tensor, lr: float | Tensor
) -> Tensor:
    r"""Layer-wise trust ratios, one per parameter: the formula of :class:`torchlars.LARS`.

    ``grad_norms`` holds, per ``settings.kind``, :math:`\|g\|` (``"paper"``), :math:`\|g + \lambda w\|`
    (``"decayed"``) or the norm of the base's step per unit of learning rate (``"update"``);
    only ``"paper"`` adds :math:`\lambda \|w\|` to the denominator. Pure tensor ops, so
    nothing waits on the device: the zero-norm test is a ``torch.where``.
    """
    denominator = grad_norms + weight_decay * param_norms if settings.kind == "paper" else grad_norms
    ratio = settings.trust_coef * param_norms / (denominator + settings.eps)
    ratio = torch.where((param_norms > 0) & (grad_norms > 0), ratio, torch.ones_like(ratio))
    if settings.clip:
        ratio = torch.clamp(ratio / lr, max=1.0)
    return ratio


def ratio_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the trust ratios of ``dtype`` parameters: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lr_tensor(lr: float | Tensor) -> Tensor:
    """``lr`` as the kernels take it: a tensor as it is (nothing waits on its value, and a
    changing one causes no recompilation), a number as a 0-d fp64 tensor."""
    return lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# Scaling the gradients, for any base optimizer ("paper" and "decayed")


def multi_tensor_lars_scale_gradients_(
    params: list[Tensor], grads: list[Tensor], settings: LARSSettings, *, weight_decay: float | Tensor,
    lr: float | Tensor
) -> Tensor:
    """Replace the gradients of one device and dtype by their LARS-scaled versions, in place,
    with ``torch._foreach_*`` ops; returns the ratios used."""
    if settings.kind == "decayed":
        # The ratio is taken from the decayed gradient itself: decay first, then scale.
        decay_(params, grads, weight_decay)
        weight_decay = 0.0
    return scale_by_trust_ratio_(
        params, grads, norms(params, params[0].dtype), norms(grads, grads[0].dtype), settings,
        weight_decay=weight_decay, lr=lr,
    )


def scale_by_trust_ratio_(
    params: list[Tensor],
    grads: list[Tensor],
    param_norms: Tensor,
    grad_norms: Tensor,
    settings: LARSSettings,
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
) -> Tensor:
    """The scaling of :func:`multi_tensor_lars_scale_gradients_` given the norms, which are those
    of the whole parameters and gradients when ``params`` and ``grads`` are the local shards of
    DTensors (``_distributed``); returns the ratios."""
    ratios = trust_ratio(param_norms, grad_norms, settings, weight_decay=weight_decay, lr=lr)
    decay_and_scale_(params, grads, ratios, weight_decay)
    return ratios


def lars_scaled_gradients(
    params: list[Tensor],
    grads: list[Tensor],
    settings: LARSSettings,
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    maximize: bool,
) -> list[Tensor]:
    """The LARS-scaled gradients as new tensors, for base optimizers with ``differentiable=True``.

    Out of place, so autograd differentiates through the scaling (the norms and the ratio
    included) as through the base's own step, and one tensor at a time, as torch's
    differentiable steps are. ``maximize`` negates the gradient first.
    """
    scaled = []
    for param, grad in zip(params, grads):
        param = param.clone()  # what autograd saves must outlive the base's in-place update of param
        if maximize:
            grad = -grad
        decayed = grad + weight_decay * param
        ratio = trust_ratio(
            torch.linalg.vector_norm(param, dtype=norm_dtype(param.dtype)),
            torch.linalg.vector_norm(decayed if settings.kind == "decayed" else grad, dtype=norm_dtype(param.dtype)),
            settings,
            weight_decay=weight_decay,
            lr=lr,
        )
        scaled.append((decayed * ratio).to(grad.dtype))
    return scaled


# ---------------------------------------------------------------------------------------
# Scaling the base's step ("update", LAMB through LARS)


def multi_tensor_lars_update_(
    params: list[Tensor], params_before: list[Tensor], settings: LARSSettings, *, lr: float | Tensor
) -> Tensor:
    r"""Scale the step a base optimizer just took, for tensors of one device and dtype, in place:
    :math:`w \leftarrow w_{before} + r (w - w_{before})`. ``params_before`` is overwritten; returns
    the ratios.

    Five operations beyond the base's step, about 12 passes over the weights (``python
    bench/bench_lamb.py`` measures them; :class:`torchlars.LAMB` computes its step directly).
    """
    dtype = params[0].dtype
    param_norms = norms(params_before, dtype)
    minus_steps = params_before
    torch._foreach_sub_(minus_steps, params)  # w_before - w: minus the base's step
    return scale_update_(params, minus_steps, param_norms, norms(minus_steps, dtype), settings, lr=lr)


def scale_update_(
    params: list[Tensor],
    minus_steps: list[Tensor],
    param_norms: Tensor,
    step_norms: Tensor,
    settings: LARSSettings,
    *,
    lr: float | Tensor,
) -> Tensor:
    """The scaling of :func:`multi_tensor_lars_update_` given ``minus_steps`` (overwritten) and the
    norms, which are the whole tensors' for DTensor shards; returns the ratios."""
    ratios = trust_ratio(param_norms, step_norms / lr, settings, weight_decay=0.0, lr=lr)
    # w + (1 - r) (w_before - w) = w_before + r u; exactly the base's step when r = 1.
    torch._foreach_mul_(minus_steps, (1 - ratios).unbind(0))
    torch._foreach_add_(params, minus_steps)
    return ratios


# ---------------------------------------------------------------------------------------
# A whole LARS + momentum-SGD step (the algorithm of :class:`torchlars.LARSSGD`)


def single_tensor_lars_sgd(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], settings: LARSSettings,
    sgd: MomentumSGD, **step: Any
) -> list[tuple[list[Tensor], Tensor]]:
    """:func:`multi_tensor_lars_sgd` one parameter at a time (``foreach=False``)."""
    return [
        call
        for i in range(len(params))
        for call in multi_tensor_lars_sgd(
            params[i : i + 1], grads[i : i + 1], momentum_buffers[i : i + 1], settings, sgd, **step
        )
    ]


def multi_tensor_lars_sgd(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], settings: LARSSettings,
    sgd: MomentumSGD, *, first_step: bool, grad_scale: Tensor | None
) -> list[tuple[list[Tensor], Tensor]]:
    """One LARS-momentum step of tensors of one device and dtype in ``torch._foreach_*`` ops;
    returns the parameters and their ratios. ``momentum_buffers`` are empty without momentum;
    on a ``first_step`` they are set to the first update. The caller's gradients are left as
    they are. GradScaler's ``grad_scale`` divides the gradients (its ``found_inf`` is the
    caller's: :func:`torchlars._foreach.undone_where_found_inf`)."""
    dtype = params[0].dtype
    lr, weight_decay, momentum = sgd.lr, sgd.weight_decay, sgd.momentum
    # New tensors from here on: the caller's gradients stay as they are.
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale)
    if sgd.maximize:
        grads = torch._foreach_neg(grads)
    if settings.kind == "decayed":
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    ratios = trust_ratio(norms(params, dtype), norms(grads, dtype), settings, weight_decay=weight_decay, lr=lr)
    if weight_decay != 0 and settings.kind == "paper":
        updates = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_mul_(updates, ratios.unbind(0))
    else:
        updates = torch._foreach_mul(grads, ratios.unbind(0))
    if momentum != 0:
        if first_step:
            torch._foreach_copy_(momentum_buffers, updates)
        else:
            torch._foreach_mul_(momentum_buffers, momentum)
            torch._foreach_add_(momentum_buffers, updates, alpha=1 - sgd.dampening)
        if sgd.nesterov:
            torch._foreach_add_(updates, momentum_buffers, alpha=momentum)
        else:
            updates = momentum_buffers
    if isinstance(lr, Tensor):
        # alpha=<tensor> would wait on the device for its value (.item()).
        torch._foreach_add_(params, torch._foreach_mul(updates, -lr))
    else:
        torch._foreach_add_(params, updates, alpha=-lr)
    return [(params, ratios)]
