"""``LARSSGD``: LARS with momentum SGD, built from params like every ``torch.optim`` optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd

from torchlars._functional import lars_sgd
from torchlars._kernels import (
    check_fused_param,
    fused_lars_sgd_supports,
    prepare_triton,
    skipped_by_grad_scaler,
    triton_lars_sgd_supports,
)
from torchlars._optimizer import (
    check_lars_settings,
    evaluate_closure,
    forget_trust_ratios,
    params_with_dense_grads,
    position,
    prepare_trust_ratio_record,
    record_trust_ratios,
    trust_ratios_of,
)

__all__ = ["LARSSGD", "step_lars_of_fused_sgd", "wraps_fused_sgd"]


class LARSSGD(Optimizer):
    r"""LARS (You, Gitman & Ginsburg, 2017) with momentum SGD, in one optimizer built from params.

    Implements `Large Batch Training of Convolutional Networks <https://arxiv.org/abs/1708.03888>`_
    with the numbers of ``torchlars.LARS(torch.optim.SGD(...))``. For every parameter
    :math:`w` with gradient :math:`g` (negated first if ``maximize``), learning rate
    :math:`\gamma`, weight decay :math:`\lambda`, momentum :math:`\mu` and dampening :math:`\tau`,
    with :math:`r` the trust ratio of :class:`torchlars.LARS` (``"paper"`` or ``"decayed"``):

    .. math::
        d = (g + \lambda w) \, r \qquad
        b \leftarrow \mu b + (1 - \tau) d \;(b = d \text{ on the first step}) \qquad
        w \leftarrow w - \gamma \, (d + \mu b \text{ if nesterov, else } b)

    Groups with ``"lars_exclude": True`` step as plain ``torch.optim.SGD`` (see
    :func:`torchlars.exclude_bias_and_norm`). The state is ``torch.optim.SGD``'s
    (``state[p]["momentum_buffer"]``), so the state dicts of the two load into each other.

    Being an ordinary ``Optimizer`` class, it can be built by tools that take an optimizer
    class and its options: ``ZeroRedundancyOptimizer(params, optimizer_class=LARSSGD, lr=...)``,
    horovod's ``DistributedOptimizer``, Lightning CLI, Hydra's ``_target_``.

    Args:
        params: parameters or param groups; a group may set any option below and ``"lars_exclude"``.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in ``torch.optim.SGD``.
        eps: added to the denominator of the trust ratio (default: 1e-8).
        trust_coef: the trust coefficient :math:`\eta` (default: 1e-3).
        clip: clip the trust ratio at the learning rate, as NVIDIA apex's LARC does (default: False).
        trust_ratio: ``"paper"`` (default) or ``"decayed"``, the self-supervised recipes' ratio
            (see :class:`torchlars.LARS`).
        foreach: ``torch._foreach_*`` ops (True), one parameter at a time (False), or
            chosen with ``fused`` (None).
        fused: liblars's fused LARS-momentum operator, one pass over each parameter, its
            gradient and its momentum buffer (CPU tensors of fp32, fp64, bf16 or fp16). None
            (the default) takes it wherever it runs and ``torch._foreach_*`` ops elsewhere.
            With it, ``torch.amp.GradScaler`` unscales inside the step and skips an overflowing
            step without waiting for the device.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        eps: float = 1e-8,
        trust_coef: float = 0.001,
        clip: bool = False,
        trust_ratio: str = "paper",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("LARSSGD: a tensor `lr` must have one element")
        if not lr >= 0.0:
            raise ValueError(f"LARSSGD: `lr` must be non-negative, got {lr}")
        if not momentum >= 0.0:
            raise ValueError(f"LARSSGD: `momentum` must be non-negative, got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"LARSSGD: `weight_decay` must be non-negative, got {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("LARSSGD: `nesterov=True` needs a positive `momentum` and `dampening=0`")
        check_lars_settings(
            "LARSSGD", eps=eps, trust_coef=trust_coef, clip=clip, trust_ratio=trust_ratio,
            trust_ratios=("paper", "decayed"),
        )
        if fused and foreach:
            raise ValueError("LARSSGD: `fused=True` and `foreach=True` cannot be set together")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "eps": eps,
            "trust_coef": trust_coef,
            "clip": clip,
            "trust_ratio": trust_ratio,
        }
        super().__init__(params, defaults)
        prepare_trust_ratio_record(self)
        prepare_triton([param for group in self.param_groups for param in group["params"]])
        if fused:
            for group_index, group in enumerate(self.param_groups):
                for param_index, param in enumerate(group["params"]):
                    check_fused_param(param, f"parameter {param_index} of param group {group_index}", "LARSSGD")
        # GradScaler hands grad_scale and found_inf to the step instead of unscaling and
        # checking for infs itself with a host sync. The fused path takes them; fused=None
        # takes it when every parameter is one the fused operator steps.
        all_params = [param for group in self.param_groups for param in group["params"]]
        self._step_supports_amp_scaling = bool(fused) or (
            fused is None
            and foreach is None
            and (fused_lars_sgd_supports(all_params) or triton_lars_sgd_supports(all_params))
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A plain torch.optim.SGD state dict has none of LARS's settings: take the defaults.
        for group in self.param_groups:
            for name in ("nesterov", "maximize", "foreach", "fused", "eps", "trust_coef", "clip", "trust_ratio"):
                group.setdefault(name, self.defaults[name])
        prepare_trust_ratio_record(self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        forget_trust_ratios(state)
        return state

    def trust_ratios(self) -> dict[Tensor, Tensor]:
        """The trust ratio of the last step of every adapted parameter that had a gradient then.

        0-d fp32 tensors on the parameters' devices (the parameter's own dtype for fp64), the
        values the step used; reading them is the caller's sync. Empty before the first step.
        """
        return trust_ratios_of(self)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LARS step of every param group.

        Args:
            closure: re-evaluates the model and returns the loss; it runs first (with grad
                enabled), so the gradients it produces are the ones stepped on.
        """
        loss = evaluate_closure(closure)
        # Every group's gradients are checked before any parameter changes.
        gathered = [_params_and_grads(group, self.param_groups, "LARSSGD") for group in self.param_groups]
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if skipped_by_grad_scaler(found_inf):
            return loss
        ratios = []
        with torch.no_grad():
            for group, (params, grads) in zip(self.param_groups, gathered):
                ratios += step_group(
                    group,
                    params,
                    grads,
                    self.state,
                    eps=group["eps"],
                    trust_coef=group["trust_coef"],
                    clip=group["clip"],
                    variant=group["trust_ratio"],
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                )
        record_trust_ratios(self, ratios)
        return loss


def step_lars_of_fused_sgd(lars: Optimizer, adapted_groups: list[dict[str, Any]]) -> None:
    """``LARS(torch.optim.SGD(..., fused=True)).step()`` without its closure: see :func:`wraps_fused_sgd`.

    The adapted groups step with :func:`step_group`, the others with the base's own step,
    which runs alone on them (with its step hooks, as ``LARS._step_base`` runs it).
    """
    base = lars.optim
    param_groups = base.param_groups
    # Every group's gradients are checked before any parameter changes (wraps_fused_sgd, which
    # chose this path, has checked that the fused kernels step every adapted parameter).
    gathered = [params_with_dense_grads(group, param_groups, "LARS") for group in adapted_groups]
    grad_scale, found_inf = getattr(lars, "grad_scale", None), getattr(lars, "found_inf", None)
    if skipped_by_grad_scaler(found_inf):
        return
    ratios = []
    with torch.no_grad():
        for group, (params, grads) in zip(adapted_groups, gathered):
            ratios += step_group(
                group,
                params,
                grads,
                base.state,
                eps=lars.eps,
                trust_coef=lars.trust_coef,
                clip=lars.clip,
                variant=lars.trust_ratio,
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
    record_trust_ratios(lars, ratios)
    amp = {name: value for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)) if value is not None}
    base.param_groups = [group for group in param_groups if all(group is not g for g in adapted_groups)]
    base.__dict__.update(amp)  # where torch's fused SGD looks for them, as GradScaler puts them
    try:
        lars._step_base()
    finally:
        base.param_groups = param_groups
        for name in amp:
            del base.__dict__[name]


def wraps_fused_sgd(base: Optimizer) -> bool:
    """Whether ``LARS(base)`` steps with liblars's fused LARS-momentum operator.

    It does when ``base`` is a ``torch.optim.SGD(..., fused=True)`` and the operator steps
    every parameter LARS adapts (CPU tensors of its dtypes, the C++ extension installed);
    otherwise LARS scales the gradients and the base steps on them (e.g. CUDA tensors).
    """
    if type(base) is not torch.optim.SGD or not all(group.get("fused") for group in base.param_groups):
        return False
    adapted = [param for group in base.param_groups if not group.get("lars_exclude", False) for param in group["params"]]
    return fused_lars_sgd_supports(adapted) or triton_lars_sgd_supports(adapted)


def step_group(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    state: dict,
    *,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> list[tuple[list[Tensor], Tensor]]:
    """Step one SGD param group with LARS, or as plain SGD if it is ``"lars_exclude"``; returns
    the parameters and ratios of the LARS step (none for an excluded group).

    The momentum buffers live in ``state[p]["momentum_buffer"]``, as ``torch.optim.SGD`` keeps them.
    """
    if not params:
        return []
    momentum = group["momentum"]
    buffers = [state[param].get("momentum_buffer") for param in params] if momentum != 0 else [None] * len(params)
    new_buffers = momentum != 0 and any(buffer is None for buffer in buffers)
    options = dict(
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        momentum=momentum,
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        maximize=group.get("maximize", False),
    )
    ratios = []
    if group.get("lars_exclude", False):
        # torch's SGD takes grad_scale and found_inf on its fused path only.
        amp = grad_scale is not None or found_inf is not None
        sgd(
            params,
            grads,
            buffers,
            foreach=group.get("foreach"),
            fused=True if amp else group.get("fused"),
            grad_scale=grad_scale,
            found_inf=found_inf,
            **options,
        )
    else:
        ratios = lars_sgd(
            params,
            grads,
            buffers,
            foreach=group.get("foreach"),
            fused=group.get("fused"),
            grad_scale=grad_scale,
            found_inf=found_inf,
            eps=eps,
            trust_coef=trust_coef,
            clip=clip,
            variant=variant,
            **options,
        )
    if new_buffers:  # the others are in the state already
        for param, buffer in zip(params, buffers):
            state[param]["momentum_buffer"] = buffer
    return ratios


def _params_and_grads(group: dict[str, Any], param_groups: list[dict[str, Any]], owner: str):
    """``params_with_dense_grads``, and with ``fused=True`` a refusal of what no fused kernel steps."""
    params, grads = params_with_dense_grads(group, param_groups, owner)
    if (
        group.get("fused")
        and not group.get("lars_exclude", False)
        and not (fused_lars_sgd_supports(params) or triton_lars_sgd_supports(params))
    ):
        # The check above runs per bucket; find the parameter to name.
        for param in params:
            check_fused_param(param, position(param, group, param_groups), owner)
    return params, grads
