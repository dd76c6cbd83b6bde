"""``LARSSGD``: LARS with momentum SGD, built from params like every ``torch.optim`` optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd

from torchlars._functional import (
    FUSED_DTYPES,
    fused_lars_sgd_supports,
    lars_sgd,
    skipped_by_grad_scaler,
    triton_lars_sgd_supports,
)
from torchlars._param_norms import CarriedParamNorms

__all__ = [
    "LARSSGD",
    "forget_carried_norms",
    "prepare_step_witnesses",
    "record_trust_ratios",
    "step_lars_of_fused_sgd",
    "trust_ratios_of",
    "wraps_fused_sgd",
]


class LARSSGD(Optimizer):
    r"""LARS (You, Gitman & Ginsburg, 2017) with momentum SGD, in one optimizer built from params.

    Implements `Large Batch Training of Convolutional Networks <https://arxiv.org/abs/1708.03888>`_
    with the numbers of ``torchlars.LARS(torch.optim.SGD(...))``. For every parameter
    :math:`w` with gradient :math:`g`, learning rate :math:`\gamma`, weight decay
    :math:`\lambda`, momentum :math:`\mu` and dampening :math:`\tau`:

    .. math::
        r &= \begin{cases}
            \eta \, \|w\|_2 / (\|g\|_2 + \lambda \|w\|_2 + \epsilon)
                & \text{if } \|w\|_2 > 0 \text{ and } \|g\|_2 > 0 \\
            1 & \text{otherwise}
        \end{cases}
        \qquad r \leftarrow \min(r / \gamma, 1) \text{ only if clip (LARC)} \\
        d &= (g + \lambda w) \, r \qquad
        b \leftarrow \mu b + (1 - \tau) d \;(b = d \text{ on the first step}) \qquad
        w \leftarrow w - \gamma \, (d + \mu b \text{ if nesterov, else } b)

    where :math:`\eta` is ``trust_coef`` and :math:`g` is negated first if ``maximize``.
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
            :math:`\eta \|w\| / (\|g + \lambda w\| + \epsilon)` (see :class:`torchlars.LARS`).
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
        if not eps >= 0.0:
            raise ValueError(f"LARSSGD: `eps` must be non-negative, got {eps}")
        if not trust_coef >= 0.0:
            raise ValueError(f"LARSSGD: `trust_coef` must be non-negative, got {trust_coef}")
        if trust_ratio not in ("paper", "decayed"):
            raise ValueError(
                f"LARSSGD: `trust_ratio` must be 'paper' or 'decayed', got {trust_ratio!r}; the "
                "'update' ratio (LAMB) scales a base optimizer's step: use "
                "torchlars.LARS(base, trust_ratio='update')"
            )
        if not isinstance(clip, bool):
            raise TypeError(f"LARSSGD: `clip` must be a bool, got {torch.typename(clip)}")
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        prepare_step_witnesses(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A plain torch.optim.SGD state dict has none of LARS's settings: take the defaults.
        for group in self.param_groups:
            for name in ("nesterov", "maximize", "foreach", "fused", "eps", "trust_coef", "clip", "trust_ratio"):
                group.setdefault(name, self.defaults[name])
        # load_state_dict calls this too: a loaded state dict usually comes with loaded parameters.
        forget_carried_norms(self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop(_CARRIED_NORMS, None)
        state.pop(_STEP_WITNESSES, None)
        state.pop(_TRUST_RATIOS, None)
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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group's gradients are checked before any parameter changes.
        gathered = [
            params_with_dense_grads(group, group_index, "LARSSGD")
            for group_index, group in enumerate(self.param_groups)
        ]
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if skipped_by_grad_scaler(found_inf):
            return loss
        ratios = []
        with torch.no_grad():
            for group_index, (group, (params, grads)) in enumerate(zip(self.param_groups, gathered)):
                ratios += step_group(
                    group,
                    params,
                    grads,
                    self.state,
                    carried_norms=carried_norms_of(self, group_index),
                    step_witness=step_witness_of(self, group_index),
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
    indices = [next(i for i, g in enumerate(param_groups) if g is group) for group in adapted_groups]
    # Every group's gradients are checked before any parameter changes.
    # wraps_fused_sgd, which chose this path, has checked every adapted parameter.
    gathered = [
        params_with_dense_grads(group, index, "LARS", fused_checked=True) for group, index in zip(adapted_groups, indices)
    ]
    grad_scale, found_inf = getattr(lars, "grad_scale", None), getattr(lars, "found_inf", None)
    if skipped_by_grad_scaler(found_inf):
        return
    ratios = []
    with torch.no_grad():
        for group, index, (params, grads) in zip(adapted_groups, indices, gathered):
            ratios += step_group(
                group,
                params,
                grads,
                base.state,
                carried_norms=carried_norms_of(lars, index),
                step_witness=step_witness_of(lars, index),
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


_CARRIED_NORMS = "_carried_param_norms"


def carried_norms_of(optimizer: Optimizer, group_index: int) -> CarriedParamNorms | None:
    """The parameter norms carried for a param group of ``optimizer`` (None under torch.compile).

    Kept on the optimizer, outside its state: never saved, and recomputed when missing.
    """
    if torch.compiler.is_compiling():
        return None  # the compiled step recomputes them (see _functional._fused_lars_sgd_step_)
    carried = optimizer.__dict__.setdefault(_CARRIED_NORMS, [])
    while len(carried) <= group_index:
        carried.append(CarriedParamNorms())
    return carried[group_index]


def forget_carried_norms(optimizer: Optimizer) -> None:
    """Have the next step recompute every norm, eager or compiled: new step witnesses too."""
    optimizer.__dict__.pop(_CARRIED_NORMS, None)
    optimizer.__dict__.pop(_STEP_WITNESSES, None)
    prepare_step_witnesses(optimizer)


_STEP_WITNESSES = "_lars_step_witnesses"


def prepare_step_witnesses(optimizer: Optimizer) -> None:
    """Give each param group of ``optimizer`` its step witness, a private tensor that the compiled
    fused step carries its norms with (``torchlars._param_norms.WitnessedNorms``).

    Made eagerly (at construction, ``add_param_group`` and unpickling): a tensor made inside a
    compiled step would not outlive it. Kept outside the optimizer's state: never saved.
    """
    witnesses = optimizer.__dict__.setdefault(_STEP_WITNESSES, [])
    while len(witnesses) < len(optimizer.param_groups):
        witnesses.append(torch.zeros((), dtype=torch.int64))


def step_witness_of(optimizer: Optimizer, group_index: int) -> Tensor | None:
    witnesses = getattr(optimizer, _STEP_WITNESSES, None)
    return witnesses[group_index] if witnesses is not None and group_index < len(witnesses) else None


def step_group(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    state: dict,
    *,
    carried_norms: CarriedParamNorms | None,
    step_witness: Tensor | None,
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
            carried_norms=carried_norms,
            step_witness=step_witness,
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


_TRUST_RATIOS = "_lars_trust_ratios"


def record_trust_ratios(optimizer: Optimizer, ratios: list[tuple[list[Tensor], Tensor]]) -> None:
    """Keep the (parameters, ratios) of a step for ``trust_ratios()``: references, no copy, no sync."""
    optimizer.__dict__[_TRUST_RATIOS] = ratios


def trust_ratios_of(optimizer: Optimizer) -> dict[Tensor, Tensor]:
    return {
        param: ratio
        for params, ratios in optimizer.__dict__.get(_TRUST_RATIOS, [])
        for param, ratio in zip(params, ratios.unbind(0))
    }


def params_with_dense_grads(
    group: dict[str, Any], group_index: int, owner: str, *, fused_checked: bool = False
) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of ``group`` that have a gradient, and their gradients; refuses sparse ones,
    and, with ``fused=True``, what the fused operator cannot step (unless the caller has just
    checked every parameter: ``fused_checked``)."""
    params = [param for param in group["params"] if param.grad is not None]
    grads = [param.grad for param in params]
    adapted = not group.get("lars_exclude", False)
    if (
        adapted
        and group.get("fused")
        and not fused_checked
        and not (fused_lars_sgd_supports(params) or triton_lars_sgd_supports(params))
    ):
        # The check above runs per bucket; find the parameter to name.
        for param_index, param in enumerate(group["params"]):
            if param.grad is not None:
                check_fused_param(param, f"parameter {param_index} of param group {group_index}", owner)
    if adapted and any(grad.is_sparse for grad in grads):
        param_index = next(i for i, param in enumerate(group["params"]) if param.grad is not None and param.grad.is_sparse)
        fused = "`fused=True` and " if group.get("fused") else ""
        raise RuntimeError(
            f"{owner}: {fused}LARS do not support sparse gradients, but parameter {param_index} of param "
            f"group {group_index} has one. Put it in a group with \"lars_exclude\": True, or use a "
            "dense gradient (e.g. nn.Embedding(sparse=False))."
        )
    return params, grads


def check_fused_param(param: Tensor, position: str, owner: str) -> None:
    """Refuse, naming the option, a parameter that liblars's fused operator cannot step."""
    if type(param) not in (Tensor, torch.nn.Parameter):
        raise RuntimeError(
            f"{owner}: `fused=True` steps plain tensors, but {position} is a {type(param).__name__} "
            "(e.g. an FSDP2 shard, whose norm is not its local tensor's). Use fused=None or foreach=True."
        )
    if triton_lars_sgd_supports([param]):
        return  # the Triton kernels step it (torchlars._triton)
    if param.device.type != "cpu":
        raise RuntimeError(
            f"{owner}: `fused=True` steps CPU tensors only (liblars's fused operator has no "
            f"{param.device.type} kernel yet), but {position} is on {param.device}. "
            "Use fused=None or foreach=True, which step it with torch._foreach_* ops."
        )
    if param.dtype not in FUSED_DTYPES:
        raise RuntimeError(
            f"{owner}: `fused=True` steps floating-point parameters of "
            f"{', '.join(str(dtype).removeprefix('torch.') for dtype in FUSED_DTYPES)}, "
            f"but {position} is {param.dtype}."
        )
