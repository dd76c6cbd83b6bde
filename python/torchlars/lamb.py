"""``LAMB``: layer-wise adaptive moments, built from params like every ``torch.optim`` optimizer.

Laid out as ``torch/optim/adamw.py``: the class validates its arguments and gathers the tensors,
:func:`lamb` picks an implementation per bucket of one device and dtype, and the implementations
sit side by side: liblars's fused CPU operator (``torchlars.ops.lamb_``) or the Triton kernels
(``torchlars._triton.lamb_``), ``torch._foreach_*`` ops (:func:`_multi_tensor_lamb`), one
parameter at a time (:func:`_single_tensor_lamb`). All take the same arguments, the group's
:class:`~torchlars._functional.LAMBSettings` among them, and return the trust ratios. Which one
steps a bucket is chosen where LARS's is, :func:`torchlars._dispatch.implementation`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from torchlars._dispatch import fused_kernels, fused_kernels_step, implementation, skips_on_host, why_no_fused_kernel
from torchlars._distributed import sharding_problem
from torchlars._foreach import grouped_by_device_and_dtype, norm_dtype, norms, undone_where_found_inf
from torchlars._functional import LAMBSettings
from torchlars._optimizer import (
    LayerwiseOptimizer,
    check_fused_or_foreach,
    check_non_negative,
    check_one_element_lr,
    evaluate_closure,
    position,
    prepare_trust_ratio_record,
    record_trust_ratios,
)

__all__ = ["LAMB", "lamb"]


class LAMB(LayerwiseOptimizer):
    r"""LAMB (You et al., 2019): Adam's step with decoupled weight decay, scaled per layer by a trust ratio.

    Implements `Large Batch Optimization for Deep Learning: Training BERT in 76 minutes
    <https://arxiv.org/abs/1904.00962>`_ as timm's ``Lamb`` and NVIDIA apex's ``FusedLAMB`` compute
    it. For every parameter :math:`w` with gradient :math:`g` at step :math:`t`, with learning rate
    :math:`\gamma`, betas :math:`\beta_1, \beta_2`, weight decay :math:`\lambda` and trust
    coefficient :math:`\eta`:

    .. math::
        g &\leftarrow g / \max(\|G\|_2 / c, 1) \qquad \text{only with max\_grad\_norm } c
            \text{ (}G\text{: all gradients of all groups)} \\
        g &\leftarrow -g \qquad \text{only with maximize} \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \hat m &= m / (1 - \beta_1^t) \qquad \hat v = v / (1 - \beta_2^t)
            \qquad (\hat m = m,\ \hat v = v \text{ without bias\_correction}) \\
        u &= \hat m / (\sqrt{\hat v} + \epsilon) + \lambda w \\
        r &= \begin{cases}
            \eta \, \|w\|_2 / (\|u\|_2 + \epsilon_r) & \text{if } \|w\|_2 > 0 \text{ and } \|u\|_2 > 0 \\
            1 & \text{otherwise}
        \end{cases} \\
        r &\leftarrow \min(r, 1) \qquad \text{only with trust\_clip} \\
        w &\leftarrow w - \gamma \, r \, u

    A group is adapted (:math:`r` as above) if its ``weight_decay`` is non-zero or ``always_adapt``
    is set, and it is not ``"lars_exclude": True``; any other group steps with :math:`r = 1`, which
    is ``torch.optim.AdamW``'s step. So the no-decay group a transformers ``Trainer`` builds
    (biases, LayerNorm) is plain AdamW, as with timm and apex. Norms are accumulated in fp32
    (fp64 for fp64 parameters); nothing in a step waits on the device.

    The state is ``torch.optim.AdamW``'s (``step``, ``exp_avg``, ``exp_avg_sq``), so the state dicts
    of the two load into each other. Being an ordinary ``Optimizer`` class, it can be built by tools
    that take a class and its options: transformers' ``Trainer(optimizer_cls_and_kwargs=(LAMB,
    {...}))``, Lightning CLI, Hydra's ``_target_``, ``ZeroRedundancyOptimizer(optimizer_class=LAMB)``.

    Args:
        params: parameters or param groups; a group may set any option below but ``max_grad_norm``,
            and ``"lars_exclude": True`` to step as AdamW.
        lr: :math:`\gamma`, a float or a one-element tensor (which LR schedulers change in place,
            so a compiled step is not recompiled) (default: 1e-3).
        betas: :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps: :math:`\epsilon`, added to :math:`\sqrt{\hat v}` as in timm, apex and torch's AdamW
            (default: 1e-6, timm's and apex's).
        weight_decay: :math:`\lambda`, decoupled: added to the Adam step, inside the trust ratio
            (default: 0.01).
        trust_coef: :math:`\eta` (default: 1.0, as in the paper, timm, apex and optax).
        trust_eps: :math:`\epsilon_r`, added to :math:`\|u\|_2` (default: 0.0, as timm and apex;
            optax.lamb's ``eps`` inside its ``scale_by_trust_ratio`` is 0 too).
        trust_clip: clip :math:`r` at 1, LAMBC (Fong et al., 2020), timm's ``trust_clip`` (default: False).
        always_adapt: adapt groups without weight decay too, timm's ``always_adapt`` and apex's
            ``use_nvlamb=True``; optax.lamb adapts every parameter (default: False).
        bias_correction: Adam's bias correction, as timm's and apex's ``bias_correction`` (default: True).
        max_grad_norm: divide every gradient by :math:`\max(\|G\|_2 / c, 1)` first, timm's
            ``max_grad_norm`` (whose default is 1.0) and apex's; one value for the whole optimizer,
            computed without a host sync (default: None, no clipping).
        maximize: maximise the objective instead (default: False).
        foreach: ``torch._foreach_*`` ops (True), one parameter at a time (False), or chosen with
            ``fused`` (None, the default).
        fused: liblars's fused operator ``torch.ops.torchlars.lamb_`` for CPU tensors and the Triton
            kernels for CUDA tensors, where they are installed (True refuses, by name, a parameter
            neither steps). None (the default) takes them wherever they run and ``torch._foreach_*``
            ops elsewhere. With them, ``torch.amp.GradScaler`` unscales inside the step and skips
            an overflowing step without waiting for the device.

    ``trust_ratios()`` returns the ratio of the last step of every adapted parameter.

    ``.grad`` after a step: the fused CPU operator keeps :math:`u` of an adapted fp32 or fp64
    parameter in its ``.grad`` between its two passes, as apex's ``FusedLAMB`` does, and leaves it
    there (which spares the second pass reading m and v again: on BERT's word embedding the step
    takes 1.47x ``AdamW(fused=True)``'s time instead of about 1.7x). Every other path, half types,
    groups that are not adapted and a gradient shared by two parameters keep the caller's
    gradient. Gradients are cleared before the next backward as usual (``zero_grad()``).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        trust_coef: float = 1.0,
        trust_eps: float = 0.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        bias_correction: bool = True,
        max_grad_norm: float | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_one_element_lr("LAMB", lr)
        # (The value of an lr on a device is not read: that would wait for it, or fail on meta.)
        if not isinstance(lr, Tensor) or lr.device.type == "cpu":
            check_non_negative("LAMB", lr=lr)
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"LAMB: `betas` must be two numbers in [0, 1), got {betas}")
        check_non_negative("LAMB", eps=eps, weight_decay=weight_decay, trust_coef=trust_coef, trust_eps=trust_eps)
        if max_grad_norm is not None and not max_grad_norm > 0.0:
            raise ValueError(f"LAMB: `max_grad_norm` must be positive or None, got {max_grad_norm}")
        check_fused_or_foreach("LAMB", fused=fused, foreach=foreach)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "trust_coef": trust_coef,
            "trust_eps": trust_eps,
            "trust_clip": trust_clip,
            "always_adapt": always_adapt,
            "bias_correction": bias_correction,
            "max_grad_norm": max_grad_norm,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)
        prepare_trust_ratio_record(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("max_grad_norm", self.defaults["max_grad_norm"]) != self.defaults["max_grad_norm"]:
            raise ValueError(
                "LAMB: `max_grad_norm` clips the global norm of all gradients, one value for the optimizer: "
                "set it in the constructor, not in a param group"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["fused"]:
            for param in group["params"]:
                problem = why_no_fused_kernel(param)
                if problem is not None:
                    where = position(param, group, self.param_groups)
                    self.param_groups.pop()
                    raise RuntimeError(f"LAMB: `fused=True`, but {where}: {problem}")
        # GradScaler hands grad_scale and found_inf to the step instead of unscaling and checking
        # for infs itself with a host sync, where the fused kernels step everything. (Every path
        # takes them; the others would only be slower than GradScaler's own unscaling.)
        all_params = [param for group in self.param_groups for param in group["params"]]
        self._step_supports_amp_scaling = bool(self.defaults["fused"]) or (
            self.defaults["fused"] is None and self.defaults["foreach"] is None and fused_kernels_step(all_params)
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ``LAMB`` or ``torch.optim.AdamW``. The settings an AdamW state dict
        lacks (``trust_coef``, ``"lars_exclude"``, ...) stay those of this optimizer's groups."""
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [
            {**{name: value for name, value in group.items() if name != "params"}, **saved}
            for group, saved in zip(self.param_groups, state_dict["param_groups"])
        ] + state_dict["param_groups"][len(self.param_groups):]  # a length mismatch is refused by torch
        super().load_state_dict(state_dict)

    def _gather_group(self, group: dict[str, Any]) -> tuple[list[Tensor], ...]:
        """The parameters of ``group`` that have a gradient, their gradients, moments and steps
        (made on a first step, as torch.optim.AdamW makes them). (Not named ``_init_group``:
        dynamo runs a method of that name as torch's own optimizers define it.)"""
        params = [param for param in group["params"] if param.grad is not None]
        exp_avgs, exp_avg_sqs, state_steps = [], [], []
        for param in params:
            state = self.state[param]
            if len(state) == 0:
                # On the parameter's device, as torch's fused AdamW keeps it: the bias correction
                # is then a device computation, with no host sync.
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            elif state["step"].device != param.device:
                # A step kept on the CPU by a non-fused torch.optim.AdamW whose state dict was loaded.
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
        return params, [param.grad for param in params], exp_avgs, exp_avg_sqs, state_steps

    def _check_grads(self, group: dict[str, Any]) -> None:
        """Refuse, naming the parameter, a gradient LAMB cannot step; nothing is modified yet."""
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(
                    f"LAMB does not support sparse gradients (its moments are dense): "
                    f"{position(param, group, self.param_groups)} has one. Use a dense gradient "
                    "(e.g. nn.Embedding(sparse=False)), or torch.optim.SparseAdam for that parameter."
                )
            problem = _adapted(group) and sharding_problem(param)
            if problem:
                raise RuntimeError(f"LAMB cannot step {position(param, group, self.param_groups)}: {problem}")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LAMB step of every param group.

        Args:
            closure: re-evaluates the model and returns the loss; it runs first (with grad
                enabled), so the gradients it produces are the ones stepped on.
        """
        loss = evaluate_closure(closure)
        for group in self.param_groups:  # every gradient is checked before anything changes
            self._check_grads(group)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if skips_on_host(found_inf):
            return loss
        ratios = []
        with torch.no_grad():
            gathered = [self._gather_group(group) for group in self.param_groups]
            # One value for all groups (add_param_group sees to it); a loaded state dict's, if any.
            max_grad_norm = self.param_groups[0]["max_grad_norm"]
            if max_grad_norm is not None:
                grad_scale = clipped_grad_scale(
                    [grad for _, grads, *_ in gathered for grad in grads], max_grad_norm, grad_scale
                )
            for group, (params, grads, exp_avgs, exp_avg_sqs, state_steps) in zip(self.param_groups, gathered):
                adapted = _adapted(group)
                group_ratios = lamb(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    state_steps,
                    LAMBSettings.of(group, adapt=adapted),
                    lr=group["lr"],
                    foreach=group["foreach"],
                    fused=group["fused"],
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                )
                if adapted:
                    ratios += group_ratios
        record_trust_ratios(self, ratios)
        return loss


def _adapted(group: dict[str, Any]) -> bool:
    """Whether LAMB scales the group's step by trust ratios (else it is AdamW's step)."""
    return not group.get("lars_exclude", False) and (group["weight_decay"] != 0 or group["always_adapt"])


def clipped_grad_scale(grads: list[Tensor], max_grad_norm: float, grad_scale: Tensor | None) -> Tensor | None:
    r"""What to divide every gradient by: ``grad_scale`` (GradScaler's, or 1) times timm's global
    clip :math:`\max(\|G\|_2 / c, 1)`, with :math:`\|G\|_2` the norm of all the unscaled gradients.

    A 0-d fp32 tensor (fp64 if some gradient is fp64) on the first gradient's device; the norms are
    summed per device and dtype, in fp32 or wider. Tensor ops only: nothing waits on the device.
    """
    if not grads:
        return grad_scale
    device = grads[0].device
    sums_of_squares = [
        norms(bucket, dtype).square().sum().to(device)
        for (_, dtype), ((bucket,), _) in grouped_by_device_and_dtype([grads]).items()
    ]
    dtype = torch.float64 if any(total.dtype == torch.float64 for total in sums_of_squares) else torch.float32
    global_norm = torch.stack([total.to(dtype) for total in sums_of_squares]).sum().sqrt()
    if grad_scale is not None:
        global_norm = global_norm / grad_scale.to(device)
    clip = torch.clamp(global_norm / max_grad_norm, min=1.0)
    return clip if grad_scale is None else clip * grad_scale.to(device)


def lamb_trust_ratio(param_norms: Tensor, update_norms: Tensor, settings: LAMBSettings) -> Tensor:
    r""":math:`r = \eta \|w\| / (\|u\| + \epsilon_r)`, 1 unless both norms are > 0, clipped at 1 with
    ``trust_clip``: the ratio of :class:`LAMB`, in tensor ops (no host sync)."""
    ratios = settings.trust_coef * param_norms / (update_norms + settings.trust_eps)
    ratios = torch.where((param_norms > 0) & (update_norms > 0), ratios, torch.ones_like(ratios))
    if settings.trust_clip:
        ratios = torch.clamp(ratios, max=1.0)
    return ratios


def lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    settings: LAMBSettings,
    *,
    lr: float | Tensor,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> list[tuple[list[Tensor], Tensor]]:
    r"""One LAMB step of the parameters of one param group, with the formula of :class:`LAMB`.

    ``state_steps`` are 0-d fp32 tensors on the parameters' devices, incremented here.
    ``grad_scale`` divides every gradient (GradScaler's scale, with ``max_grad_norm``'s clip
    folded in: :func:`clipped_grad_scale`); a non-zero ``found_inf`` leaves everything as it was.
    ``grads`` are left as they are. The implementation of each bucket of one device and dtype is
    chosen by :func:`torchlars._dispatch.implementation`, as for LARS. Returns, per bucket, the
    parameters and their ratios (fp32; fp64 for fp64 parameters).
    """
    if not params:
        return []
    grouped = grouped_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    chosen = {  # every bucket is refused before any steps
        key: implementation(*key, [t for tensors in lists[:4] for t in tensors], foreach=foreach, fused=fused,
                            owner="LAMB")
        for key, (lists, _) in grouped.items()
    }
    ratios = []
    for (device, dtype), (tensors, _) in grouped.items():
        amp = dict(
            grad_scale=None if grad_scale is None else grad_scale.to(device),
            found_inf=None if found_inf is None else found_inf.to(device),
        )
        steps = tensors[4]
        # As torch's fused AdamW: the steps count first, and a step GradScaler skips takes it back.
        torch._foreach_add_(steps, 1)
        kind = chosen[device, dtype]
        if kind in ("triton", "fused"):
            bucket_ratios = fused_kernels(kind).lamb_(*tensors, settings, lr=lr, **amp)
        else:
            step = _multi_tensor_lamb if kind == "foreach" else _single_tensor_lamb
            bucket_ratios = undone_where_found_inf(
                amp["found_inf"], [*tensors[0], *tensors[2], *tensors[3]],
                lambda: step(*tensors, settings, lr=lr, grad_scale=amp["grad_scale"]),
            )
        if amp["found_inf"] is not None:
            torch._foreach_sub_(steps, [amp["found_inf"]] * len(steps))
        ratios.append((tensors[0], bucket_ratios))
    return ratios


# ---------------------------------------------------------------------------------------
# torch._foreach_* ops, and one parameter at a time


def _bias_corrections(state_steps: list[Tensor], beta1: float, beta2: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r""":math:`1 - \beta_1^t` and :math:`\sqrt{1 - \beta_2^t}` per step, computed in fp64 (as torch's
    fused AdamW computes them; in fp32, :math:`1 - 0.999^t` loses 1e-5 of itself; MPS has no fp64)
    and given in ``dtype``."""
    steps = torch.stack(state_steps).to(torch.float32 if state_steps[0].device.type == "mps" else torch.float64)
    return (1 - beta1**steps).to(dtype), (1 - beta2**steps).sqrt().to(dtype)


def _multi_tensor_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], settings: LAMBSettings, *, lr: float | Tensor, grad_scale: Tensor | None
) -> Tensor:
    """:func:`lamb` in ``torch._foreach_*`` ops for tensors of one device and dtype, a fixed number
    of ops whatever their count; returns their ratios."""
    dtype = params[0].dtype
    ratio_dtype = norm_dtype(dtype) or dtype
    beta1, beta2, eps, weight_decay = settings.beta1, settings.beta2, settings.eps, settings.weight_decay
    # New tensors from here on: the caller's gradients stay as they are.
    if grad_scale is not None:
        grads = torch._foreach_div(grads, -grad_scale if settings.maximize else grad_scale)
    elif settings.maximize:
        grads = torch._foreach_neg(grads)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    if settings.bias_correction:
        bias_correction1, bias_correction2_sqrt = _bias_corrections(state_steps, beta1, beta2, ratio_dtype)
        torch._foreach_div_(denominators, bias_correction2_sqrt.unbind(0))
        torch._foreach_add_(denominators, eps)
        updates = torch._foreach_div(exp_avgs, bias_correction1.unbind(0))
        torch._foreach_div_(updates, denominators)
    else:
        torch._foreach_add_(denominators, eps)
        updates = torch._foreach_div(exp_avgs, denominators)
    if weight_decay != 0:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    if settings.adapt:
        ratios = lamb_trust_ratio(norms(params, dtype), norms(updates, dtype), settings)
        # lr and the ratio in one tensor per parameter (alpha=<tensor> would wait on the device).
        torch._foreach_mul_(updates, (ratios * -lr).unbind(0))
        torch._foreach_add_(params, updates)
        return ratios
    if isinstance(lr, Tensor):
        torch._foreach_mul_(updates, -lr)
        torch._foreach_add_(params, updates)
    else:
        torch._foreach_add_(params, updates, alpha=-lr)
    return torch.ones(len(params), dtype=ratio_dtype, device=params[0].device)


def _single_tensor_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], settings: LAMBSettings, **step: Any
) -> Tensor:
    """:func:`_multi_tensor_lamb` one parameter at a time (``foreach=False``); returns the ratios."""
    return torch.cat([
        _multi_tensor_lamb(*(tensors[i : i + 1] for tensors in (params, grads, exp_avgs, exp_avg_sqs, state_steps)),
                           settings, **step)
        for i in range(len(params))
    ])
