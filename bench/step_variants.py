"""What ``bench_step.py`` times: the optimizer steps, each built over its own parameters.

Every variant uses lr=0.01, momentum=0.9, weight_decay=1e-4 and, for LARS, eps=1e-8,
trust_coef=1e-3, every parameter adapted. A variant whose dependency is missing reports
why through ``unavailable``.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import importlib.util
import inspect

import torch
from torch import Tensor

import torchlars
from torchlars import LARS

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4
EPS, TRUST_COEF = 1e-8, 1e-3


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    label: str
    mode: str  # "eager", "compiled" or "floor": which SGD baseline it is compared with
    build: Callable[[list[Tensor]], Callable[[], object]]  # parameters with grads -> step()
    unavailable: Callable[[], str | None] = lambda: None  # why it cannot run, or None
    baseline: bool = False  # an SGD: the fastest of its mode is the baseline


class PerParameterLARS:
    """torchlars 0.1.2's algorithm: a Python loop over parameters, norms compared on the host."""

    def __init__(self, optimizer: torch.optim.Optimizer, eps: float, trust_coef: float) -> None:
        self.optim, self.eps, self.trust_coef = optimizer, eps, trust_coef

    @torch.no_grad()
    def step(self) -> None:
        weight_decays = []
        for group in self.optim.param_groups:
            weight_decay = group.get("weight_decay", 0.0)
            weight_decays.append(weight_decay)
            for param in group["params"]:
                if param.grad is None:
                    continue
                param_norm, grad_norm = param.norm(), param.grad.norm()
                if param_norm > 0 and grad_norm > 0:  # two host syncs per parameter on a GPU
                    ratio = self.trust_coef * param_norm / (grad_norm + weight_decay * param_norm + self.eps)
                else:
                    ratio = 1.0
                param.grad.add_(param, alpha=weight_decay).mul_(ratio)
            group["weight_decay"] = 0.0
        try:
            self.optim.step()
        finally:
            for group, weight_decay in zip(self.optim.param_groups, weight_decays):
                group["weight_decay"] = weight_decay


def _sgd(params: list[Tensor], **impl: bool) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **impl)


def _lars(params: list[Tensor], **impl: bool) -> LARS:
    return LARS(_sgd(params, **impl), eps=EPS, trust_coef=TRUST_COEF)


def _larssgd(params: list[Tensor], **impl: bool) -> torch.optim.Optimizer:
    return torchlars.LARSSGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eps=EPS,
                             trust_coef=TRUST_COEF, **impl)


def _compiled(step: Callable[[], object]) -> Callable[[], object]:
    return torch.compile(lambda: step())


def _no_extension() -> str | None:
    if importlib.util.find_spec("torchlars._C") is None:
        return "torchlars._C not built: pip install --no-build-isolation . and run without PYTHONPATH"
    return None


def _no_fused_lars(device: str) -> Callable[[], str | None]:
    def unavailable() -> str | None:
        if not hasattr(torchlars, "LARSSGD"):
            return "this torchlars has no fused LARS step"
        if device != "cpu":
            return f"liblars's fused operator has no {device} kernel (the foreach path steps it)"
        return _no_extension()

    return unavailable


def _build_cpp_lars(params: list[Tensor]) -> Callable[[], object]:
    import torchlars.cpp

    optimizer = torchlars.cpp.LARS(
        params, base="sgd", eps=EPS, trust_coef=TRUST_COEF, clip=False,
        lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
    )
    return optimizer.step


def _no_timm() -> str | None:
    return None if importlib.util.find_spec("timm") else "timm not installed in this Python"


def _timm_lars(params: list[Tensor]) -> torch.optim.Optimizer:
    from timm.optim import Lars

    return Lars(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, trust_coeff=TRUST_COEF, eps=EPS)


def _fused_sgd_missing(device: str) -> Callable[[], str | None]:
    def unavailable() -> str | None:
        try:
            param = torch.zeros(2, device=device, requires_grad=True)
            param.grad = torch.zeros_like(param)
            torch.optim.SGD([param], lr=LR, momentum=MOMENTUM, fused=True).step()
        except (RuntimeError, ValueError) as error:
            return f"fused SGD: {error}"
        return None

    return unavailable


def _read_pass(params: list[Tensor]) -> Callable[[], object]:
    # The norms of the weights and of the gradients: the one read LARS adds to SGD.
    tensors = [*params, *(param.grad for param in params)]
    return lambda: torch._foreach_norm(tensors)


def variants(device: str) -> list[Variant]:
    fused_sgd_missing, fused_lars_missing = _fused_sgd_missing(device), _no_fused_lars(device)
    return [
        Variant("sgd_foreach", "SGD foreach", "eager", lambda p: _sgd(p, foreach=True).step, baseline=True),
        Variant("sgd_fused", "SGD fused", "eager", lambda p: _sgd(p, fused=True).step, fused_sgd_missing, baseline=True),
        Variant("lars_fused", "LARS(SGD fused): liblars fused step", "eager",
                lambda p: _lars(p, fused=True).step, fused_lars_missing),
        Variant("larssgd", "LARSSGD (fused=None)", "eager", lambda p: _larssgd(p).step,
                lambda: None if hasattr(torchlars, "LARSSGD") else "this torchlars has no LARSSGD"),
        Variant("lars_python", "LARS(SGD foreach)", "eager", lambda p: _lars(p, foreach=True).step),
        Variant("cpp_lars", "lars::LARS(SGD) via torchlars.cpp", "eager", _build_cpp_lars, _no_extension),
        Variant("loop_0_1_2", "per-parameter loop (torchlars 0.1.2)", "eager",
                lambda p: PerParameterLARS(_sgd(p, foreach=False), EPS, TRUST_COEF).step),
        Variant("timm_lars", "timm.optim.Lars", "eager", lambda p: _timm_lars(p).step, _no_timm),
        Variant("read_pass", "one read of the weights and gradients (torch._foreach_norm)", "floor", _read_pass),
        Variant("sgd_compiled", "SGD foreach, compiled", "compiled",
                lambda p: _compiled(_sgd(p, foreach=True).step), baseline=True),
        Variant("sgd_fused_compiled", "SGD fused, compiled", "compiled",
                lambda p: _compiled(_sgd(p, fused=True).step), fused_sgd_missing, baseline=True),
        Variant("lars_compiled", "LARS(SGD foreach), compiled", "compiled",
                lambda p: _compiled(_lars(p, foreach=True).step)),
        Variant("larssgd_compiled", "LARSSGD, compiled", "compiled", lambda p: _compiled(_larssgd(p).step),
                lambda: None if hasattr(torchlars, "LARSSGD") else "this torchlars has no LARSSGD"),
        Variant("timm_lars_compiled", "timm.optim.Lars, compiled", "compiled",
                lambda p: _compiled(_timm_lars(p).step), _no_timm),
    ]

