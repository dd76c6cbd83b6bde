"""``torch.ops.torchlars``: the LARS steps of liblars as PyTorch custom operators.

Importing this module loads the C++ extension (``torchlars._C``, which registers the
operators) and registers the operators' fake implementations, with which ``torch.compile``
and meta tensors trace through them. The fused paths of ``LARSSGD``, ``LARS(SGD(fused=True))``
and ``LAMB`` step with :func:`lars_sgd_` and :func:`lamb_` (liblars's fused LARS + momentum-SGD
and LAMB kernels, ``cpp/include/lars/fused.h``). Python reaches liblars's operators only this
way; ``torchlars.cpp`` is the face of the C++ optimizer classes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchlars._extension import _C  # noqa: F401  (loads liblars, which defines torch.ops.torchlars)
from torchlars._functional import LAMBSettings, LARSSettings, MomentumSGD, lr_tensor, ratio_dtype

__all__ = ["lamb_", "lars_scale_gradients_", "lars_sgd_"]


def lars_scale_gradients_(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    trust_ratio: str = "paper",
) -> Tensor:
    r"""``torchlars._dispatch.lars_scale_gradients_``, computed by liblars in C++.

    .. math:: g \leftarrow (g + \lambda w) \cdot r

    Same arguments, same numbers; ``trust_ratio`` is ``"paper"`` or ``"decayed"``. Returns the
    ratios used, a 1-D fp32 tensor (fp64 for fp64 params) on the params' device (``ratios[i]`` is ``params[i]``'s), so
    ``params`` must all be on one device. A tensor ``lr`` is passed to the operator as it is, so
    nothing waits on the device and a changing ``lr`` causes no recompilation.
    """
    lr = lr_tensor(lr)
    devices = {param.device for param in params}
    if len(devices) > 1:
        raise ValueError(
            f"lars_scale_gradients_: `params` are on several devices ({sorted(map(str, devices))}); call it once per device"
        )
    ratios = torch.empty(len(params), dtype=ratio_dtype(params[0].dtype) if params else torch.float32,
                         device=params[0].device if params else "cpu")
    torch.ops.torchlars.lars_scale_gradients_(
        params, grads, weight_decay=weight_decay, lr=lr, eps=eps, trust_coef=trust_coef, clip=clip,
        trust_ratio=trust_ratio, trust_ratios=ratios,
    )
    return ratios


def lars_sgd_(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], settings: LARSSettings,
    sgd: MomentumSGD, *, first_step: bool, grad_scale: Tensor | None, found_inf: Tensor | None
) -> list[tuple[list[Tensor], Tensor]]:
    """One LARS-momentum step of CPU tensors of one dtype with liblars's fused operator
    ``torch.ops.torchlars.lars_sgd_``, eager or compiled: the implementation "fused" of
    :func:`torchlars._dispatch.lars_sgd`, with its arguments. Returns the parameters and ratios."""
    # NaN where a step GradScaler skips (only compiled steps get here then) leaves no ratio.
    ratios = torch.full((len(params),), float("nan") if found_inf is not None else 0.0,
                        dtype=ratio_dtype(params[0].dtype))
    torch.ops.torchlars.lars_sgd_(
        params,
        grads,
        momentum_buffers,
        lr=lr_tensor(sgd.lr),
        weight_decay=sgd.weight_decay,
        momentum=sgd.momentum,
        dampening=sgd.dampening,
        nesterov=sgd.nesterov,
        maximize=sgd.maximize,
        is_first_step=first_step,
        eps=settings.eps,
        trust_coef=settings.trust_coef,
        clip=settings.clip,
        grad_scale=grad_scale,
        found_inf=found_inf,
        trust_ratio=settings.kind,
        trust_ratios=ratios,
    )
    return [(params, ratios)]


def lamb_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], settings: LAMBSettings, *, lr: float | Tensor, grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None
) -> Tensor:
    r"""One LAMB step of CPU tensors of one dtype, by liblars's fused operator (``lars::lamb_``).

    The step of :class:`torchlars.LAMB` (its docstring states the algorithm): ``exp_avgs`` and
    ``exp_avg_sqs`` are updated and ``params`` written in place; in fp32 and fp64 an adapted
    step leaves each update u in ``grads`` (its scratch between the passes; not where a gradient
    shares memory with another tensor of the call).
    ``state_steps`` are the step numbers, already counted (one-element CPU tensors, as torch's
    fused AdamW takes them). ``adapt=False`` steps as AdamW (ratio 1); ``grad_scale`` divides
    the gradients first (GradScaler's, or a ``max_grad_norm`` clip); a non-zero ``found_inf``
    skips the step. Returns the ratios, one per param: fp64 for fp64 params, else fp32 (NaN
    where ``found_inf`` skipped). A tensor ``lr`` is passed as it is, so a changing ``lr``
    causes no recompilation.
    """
    return torch.ops.torchlars.lamb_(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr_tensor(lr), beta1=settings.beta1,
        beta2=settings.beta2, eps=settings.eps, weight_decay=settings.weight_decay, trust_coef=settings.trust_coef,
        trust_eps=settings.trust_eps, trust_clip=settings.trust_clip, adapt=settings.adapt,
        bias_correction=settings.bias_correction, maximize=settings.maximize, grad_scale=grad_scale,
        found_inf=found_inf,
    )


def _check_trust_ratio(op: str, trust_ratio: str, allowed: tuple[str, ...]) -> None:
    torch._check(
        trust_ratio in allowed,
        lambda: f"{op}: trust_ratio must be one of {allowed}, got {trust_ratio!r}",
    )


def _check_trust_ratios(op: str, trust_ratios: Tensor | None, params: list[Tensor]) -> None:
    # fp32, or fp64 for fp64 params (the ratios the step used, unrounded).
    if trust_ratios is not None:
        fp64 = bool(params) and params[0].dtype == torch.float64
        torch._check(
            (trust_ratios.dtype == torch.float32 or (fp64 and trust_ratios.dtype == torch.float64))
            and trust_ratios.shape == (len(params),),
            lambda: f"{op}: trust_ratios must be a 1-D fp32 tensor (fp64 for fp64 params) of {len(params)} ratios",
        )


@torch.library.register_fake("torchlars::lars_scale_gradients_")
def _lars_scale_gradients_fake(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float,
    lr: Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    trust_ratio: str = "paper",
    trust_ratios: Tensor | None = None,
) -> None:
    # Only mutates grads (and trust_ratios) in place: nothing to allocate, only the C++ kernel's checks.
    torch._check(
        len(params) == len(grads),
        lambda: f"lars_scale_gradients_: got {len(params)} params but {len(grads)} grads",
    )
    _check_trust_ratio("lars_scale_gradients_", trust_ratio, ("paper", "decayed"))
    _check_trust_ratios("lars_scale_gradients_", trust_ratios, params)
    for i, (param, grad) in enumerate(zip(params, grads)):
        torch._check(
            param.shape == grad.shape and param.dtype == grad.dtype and param.device == grad.device,
            lambda: f"lars_scale_gradients_: grads[{i}] does not match params[{i}]",
        )


@torch.library.register_fake("torchlars::lars_sgd_")
def _lars_sgd_fake(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    eps: float,
    trust_coef: float,
    clip: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    trust_ratio: str = "paper",
    trust_ratios: Tensor | None = None,
) -> None:
    # Only mutates params, momentum_buffers and trust_ratios in place: the shape checks of the kernel.
    _check_trust_ratio("lars_sgd_", trust_ratio, ("paper", "decayed"))
    _check_trust_ratios("lars_sgd_", trust_ratios, params)
    torch._check(
        len(grads) == len(params), lambda: f"lars_sgd_: got {len(params)} params but {len(grads)} grads"
    )
    torch._check(
        len(momentum_buffers) == len(params) or (momentum == 0 and not momentum_buffers),
        lambda: f"lars_sgd_: got {len(params)} params but {len(momentum_buffers)} momentum_buffers",
    )
    for i, (param, grad) in enumerate(zip(params, grads)):
        torch._check(
            param.shape == grad.shape and param.dtype == grad.dtype,
            lambda: f"lars_sgd_: grads[{i}] does not match params[{i}]",
        )


@torch.library.register_fake("torchlars::lamb_")
def _lamb_fake(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    trust_coef: float,
    trust_eps: float,
    trust_clip: bool,
    adapt: bool,
    bias_correction: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor:
    # Mutates params, exp_avgs and exp_avg_sqs in place; allocates the ratios.
    count = len(params)
    for name, tensors in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        torch._check(len(tensors) == count, lambda: f"lamb_: got {count} params but {len(tensors)} {name}")
        for i, (param, tensor) in enumerate(zip(params, tensors)):
            torch._check(
                param.shape == tensor.shape and param.dtype == tensor.dtype,
                lambda: f"lamb_: {name}[{i}] does not match params[{i}]",
            )
    torch._check(len(state_steps) == count, lambda: f"lamb_: got {count} params but {len(state_steps)} state_steps")
    fp64 = bool(params) and params[0].dtype == torch.float64
    device = params[0].device if params else torch.device("cpu")
    return torch.empty(count, dtype=torch.float64 if fp64 else torch.float32, device=device)
