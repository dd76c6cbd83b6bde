"""``LARSSGD``: LARS with momentum SGD, built from params like every ``torch.optim`` optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd

from torchlars._dispatch import fused_kernels_step, lars_sgd, skips_on_host, why_no_fused_kernel
from torchlars._functional import LARSSettings, MomentumSGD
from torchlars._optimizer import (
    LayerwiseOptimizer,
    check_fused_or_foreach,
    check_non_negative,
    check_one_element_lr,
    evaluate_closure,
    lars_settings,
    params_with_dense_grads,
    position,
    prepare_trust_ratio_record,
    record_trust_ratios,
)

__all__ = ["LARSSGD", "params_and_grads", "step_group"]


class LARSSGD(LayerwiseOptimizer):
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
        check_one_element_lr("LARSSGD", lr)
        check_non_negative("LARSSGD", lr=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("LARSSGD: `nesterov=True` needs a positive `momentum` and `dampening=0`")
        lars_settings(
            "LARSSGD", eps=eps, trust_coef=trust_coef, clip=clip, trust_ratio=trust_ratio,
            trust_ratios=("paper", "decayed"),
        )
        check_fused_or_foreach("LARSSGD", fused=fused, foreach=foreach)
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
        all_params = [param for group in self.param_groups for param in group["params"]]
        if fused:
            for group in self.param_groups:
                for param in group["params"]:
                    _refuse_unfused(param, group, self.param_groups, "LARSSGD")
        # GradScaler hands grad_scale and found_inf to the step instead of unscaling and
        # checking for infs itself with a host sync. The fused kernels take them; fused=None
        # takes them when they step every parameter.
        self._step_supports_amp_scaling = bool(fused) or (
            fused is None and foreach is None and fused_kernels_step(all_params)
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LARS step of every param group.

        Args:
            closure: re-evaluates the model and returns the loss; it runs first (with grad
                enabled), so the gradients it produces are the ones stepped on.
        """
        loss = evaluate_closure(closure)
        # Every group's gradients are checked before any parameter changes.
        gathered = [params_and_grads(group, self.param_groups, "LARSSGD") for group in self.param_groups]
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if skips_on_host(found_inf):
            return loss
        ratios = []
        with torch.no_grad():
            for group, (params, grads) in zip(self.param_groups, gathered):
                settings = LARSSettings(group["eps"], group["trust_coef"], group["clip"], group["trust_ratio"])
                ratios += step_group(group, params, grads, self.state, settings, grad_scale=grad_scale,
                                     found_inf=found_inf)
        record_trust_ratios(self, ratios)
        return loss


def step_group(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    state: dict,
    settings: LARSSettings,
    *,
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
    options = MomentumSGD.of(group)
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
            **vars(options),
        )
    else:
        ratios = lars_sgd(
            params,
            grads,
            buffers,
            settings,
            options,
            foreach=group.get("foreach"),
            fused=group.get("fused"),
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
    if new_buffers:  # the others are in the state already
        for param, buffer in zip(params, buffers):
            state[param]["momentum_buffer"] = buffer
    return ratios


def params_and_grads(
    group: dict[str, Any], param_groups: list[dict[str, Any]], owner: str
) -> tuple[list[Tensor], list[Tensor]]:
    """``params_with_dense_grads``, refusing by name with ``fused=True`` what no fused kernel steps."""
    params, grads = params_with_dense_grads(group, param_groups, owner)
    if group.get("fused") and not group.get("lars_exclude", False) and not fused_kernels_step(params):
        for param in params:
            _refuse_unfused(param, group, param_groups, owner)
    return params, grads


def _refuse_unfused(param: Tensor, group: dict[str, Any], param_groups: list[dict[str, Any]], owner: str) -> None:
    problem = why_no_fused_kernel(param)
    if problem is not None:
        raise RuntimeError(f"{owner}: `fused=True`, but {position(param, group, param_groups)}: {problem}")
