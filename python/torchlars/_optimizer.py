"""What torchlars's optimizers share: the checks of their options (each rule and its message
written once, for ``LARS``, ``LARSSGD``, ``LAMB`` and the C++ optimizers' Python face), the
closure, the parameters a step takes, and the trust ratios it keeps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from torchlars._distributed import sharding_problem
from torchlars._functional import TRUST_RATIOS, LARSSettings

__all__ = [
    "LayerwiseOptimizer",
    "TrustRatios",
    "check_bool",
    "check_fused_or_foreach",
    "check_non_negative",
    "check_one_element_lr",
    "lars_settings",
    "evaluate_closure",
    "group_index",
    "params_with_dense_grads",
    "position",
    "prepare_trust_ratio_record",
    "record_trust_ratios",
    "trust_ratios_of",
]


def lars_settings(
    owner: str, *, eps: float, trust_coef: float, clip: bool, trust_ratio: str, trust_ratios: tuple[str, ...] = TRUST_RATIOS
) -> LARSSettings:
    """LARS's settings from an optimizer's options, refusing by name one out of range."""
    if trust_ratio not in trust_ratios:
        extra = ""
        if trust_ratio == "update":
            extra = (
                "; the 'update' ratio (LAMB) scales a base optimizer's step: use "
                "torchlars.LARS(base, trust_ratio='update')"
            )
        raise ValueError(
            f"{owner}: `trust_ratio` must be one of {', '.join(map(repr, trust_ratios))}, got {trust_ratio!r}{extra}"
        )
    check_non_negative(owner, eps=eps, trust_coef=trust_coef)
    check_bool(owner, clip=clip)
    return LARSSettings(eps=float(eps), trust_coef=float(trust_coef), clip=clip, kind=trust_ratio)


def check_non_negative(owner: str, **options: float | Tensor) -> None:
    """Refuse by name an option below 0 (or NaN)."""
    for name, value in options.items():
        if not value >= 0.0:
            raise ValueError(f"{owner}: `{name}` must be non-negative, got {value}")


def check_one_element_lr(owner: str, lr: float | Tensor) -> None:
    """A tensor learning rate is one number, as torch.optim's are."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{owner}: a tensor `lr` must have one element")


def check_bool(owner: str, **options: Any) -> None:
    """Refuse by name a flag that is not a bool (an int would pass C++'s conversion silently)."""
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"{owner}: `{name}` must be a bool, got {torch.typename(value)}")


def check_fused_or_foreach(owner: str, *, fused: bool | None, foreach: bool | None) -> None:
    """At most one implementation asked for."""
    if fused and foreach:
        raise ValueError(f"{owner}: `fused=True` and `foreach=True` cannot be set together")


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """The closure's loss, computed with grad enabled (``step`` may run under ``no_grad``)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def group_index(group: dict[str, Any], param_groups: list[dict[str, Any]]) -> int:
    """The index of ``group`` (the very dict) in ``param_groups``, for messages."""
    return next(i for i, g in enumerate(param_groups) if g is group)


def position(param: Tensor, group: dict[str, Any], param_groups: list[dict[str, Any]]) -> str:
    """"parameter i of param group k", for messages."""
    param_index = next(i for i, p in enumerate(group["params"]) if p is param)
    return f"parameter {param_index} of param group {group_index(group, param_groups)}"


def params_with_dense_grads(
    group: dict[str, Any],
    param_groups: list[dict[str, Any]],
    owner: str,
) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of ``group`` that have a gradient, and their gradients.

    For a group LARS adapts (not ``"lars_exclude"``), refuses by name a sparse gradient and a
    parameter whose norm LARS cannot take (FSDP1's flat shards, mismatched DTensors); nothing
    is modified.
    """
    params = [param for param in group["params"] if param.grad is not None]
    grads = [param.grad for param in params]
    if group.get("lars_exclude", False):
        return params, grads
    for param in params:
        if param.grad.is_sparse:
            raise RuntimeError(
                f"{owner} does not support sparse gradients: {position(param, group, param_groups)} has one. "
                "Put it in a group with \"lars_exclude\": True, or use a dense gradient "
                "(e.g. nn.Embedding(sparse=False))."
            )
        problem = sharding_problem(param)
        if problem is not None:
            raise RuntimeError(f"{owner} cannot scale {position(param, group, param_groups)}: {problem}")
    return params, grads


_TRUST_RATIOS = "_lars_trust_ratios"


def prepare_trust_ratio_record(optimizer: Optimizer) -> None:
    """Give ``optimizer`` the list its steps keep their trust ratios in: made eagerly (at
    construction and unpickling), because a compiled step does not replay an attribute
    written on an optimizer, but does replay the mutation of a list it holds."""
    optimizer.__dict__.setdefault(_TRUST_RATIOS, [])


def record_trust_ratios(optimizer: Optimizer, ratios: list[tuple[list[Tensor], Tensor]]) -> None:
    """Keep the (parameters, ratios) of a step for ``trust_ratios()``: references, no copy, no sync."""
    getattr(optimizer, _TRUST_RATIOS)[:] = ratios


def trust_ratios_of(optimizer: Optimizer) -> dict[Tensor, Tensor]:
    return {
        param: ratio
        for params, ratios in getattr(optimizer, _TRUST_RATIOS, [])
        for param, ratio in zip(params, ratios.unbind(0))
    }


def forget_trust_ratios(state: dict[str, Any]) -> None:
    """Drop the kept ratios from a pickled optimizer's ``__dict__``."""
    state.pop(_TRUST_RATIOS, None)


class TrustRatios:
    """``trust_ratios()`` for the optimizers whose steps record their ratios (LARS, LARSSGD, LAMB)."""

    def trust_ratios(self) -> dict[Tensor, Tensor]:
        """The trust ratio of the last step of every adapted parameter that had a gradient then.

        0-d fp32 tensors on the parameters' devices (fp64 for fp64 parameters), the values the
        step used, kept without a sync or an extra pass; reading them is the caller's sync.
        Empty before the first step.
        """
        return trust_ratios_of(self)


class LayerwiseOptimizer(TrustRatios, Optimizer):
    """What LARSSGD and LAMB share as optimizers built from params: the recorded trust ratios,
    which pickles leave out, and the settings a state dict of the plain torch optimizer (SGD,
    AdamW) lacks, taken from the defaults when it is loaded."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for name, value in self.defaults.items():
                group.setdefault(name, value)
        prepare_trust_ratio_record(self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        forget_trust_ratios(state)
        return state
