"""Which implementation steps what: the one place where torchlars chooses a kernel.

Every step is cut into buckets of one device and dtype, and :func:`implementation` picks, per
bucket, the Triton kernels (:mod:`torchlars._triton`: CUDA and ROCm tensors, or CPU tensors
through Triton's interpreter for tests), liblars's fused CPU operator (:mod:`torchlars.ops`),
``torch._foreach_*`` ops or one tensor at a time (:mod:`torchlars._functional`). The entry
points below are the functional API of the optimizers, like ``torch.optim.sgd.sgd``; the
implementations they call know nothing of each other. Nothing here depends on whether the
step is compiled: ``torch.compile`` takes the path an eager step takes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
import warnings

import torch
from torch import Tensor

from torchlars._foreach import grouped_by_device_and_dtype, undone_where_found_inf
from torchlars._functional import (
    LARSSettings,
    MomentumSGD,
    multi_tensor_lars_scale_gradients_,
    multi_tensor_lars_sgd,
    multi_tensor_lars_update_,
    single_tensor_lars_sgd,
)

__all__ = [
    "FUSED_DTYPES",
    "fused_kernels",
    "fused_kernels_step",
    "implementation",
    "lars_scale_gradients_",
    "lars_sgd",
    "lars_update_",
    "skips_on_host",
    "triton_runs_on_cpu",
    "why_no_fused_kernel",
]

#: The dtypes of liblars's fused operator (``lars::fused_dtype`` in C++).
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# What the fused kernels step: plain tensors. A DTensor's norm is not its local shard's (see
# _distributed), and other subclasses may dispatch elsewhere.
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def triton_runs_on_cpu() -> bool:
    """Whether CPU tensors take the Triton kernels, through Triton's interpreter (for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("TORCHLARS_TRITON_ON_CPU") == "1"


def _load(name: str, installed: bool) -> ModuleType | None:
    return importlib.import_module(name) if installed else None


# Both are imported at import, so that a compiled step takes the path an eager one takes
# (torch.compile cannot import). liblars loads fast; triton takes a second, so it is imported
# only where a GPU (or the interpreter) can run its kernels.
_ops = _load("torchlars.ops", importlib.util.find_spec("torchlars._C") is not None)
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_triton = _load("torchlars._triton", _TRITON_INSTALLED and (torch.cuda.is_available() or triton_runs_on_cpu()))
_warned_no_triton = False


def _triton_kernels(device: torch.device) -> ModuleType | None:
    """torchlars._triton if it steps tensors on ``device``, else None (with a warning, once, for
    CUDA tensors without triton)."""
    global _triton, _warned_no_triton
    if _triton is None and _TRITON_INSTALLED and (device.type == "cuda" or triton_runs_on_cpu()):
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "torchlars: the Triton kernels were not imported before torch.compile traced this step "
                "(CUDA was not available when torchlars was imported); `import torchlars._triton` first"
            )
        _triton = importlib.import_module("torchlars._triton")
    if _triton is None and device.type == "cuda" and not _warned_no_triton:
        _warned_no_triton = True
        warnings.warn(
            "torchlars: triton is not installed, so LARS steps CUDA tensors with torch._foreach_* ops, "
            "one kernel per parameter for some of them; `pip install triton` for its multi-tensor kernels",
            stacklevel=5,
        )
    return _triton


def _fused_kernel(device: torch.device, dtype: torch.dtype, tensors: list[Tensor]) -> str | None:
    """"triton" or "fused" (liblars) if one of the fused kernels steps this bucket, else None."""
    if not all(type(tensor) in _PLAIN_TENSORS for tensor in tensors):
        return None
    if device.type == "cuda" or (device.type == "cpu" and triton_runs_on_cpu()):
        triton = _triton_kernels(device)
        return "triton" if triton is not None and triton.steps(tensors) else None
    if device.type == "cpu" and dtype in FUSED_DTYPES and _ops is not None:
        return "fused"
    return None


def implementation(
    device: torch.device, dtype: torch.dtype, tensors: list[Tensor], *, foreach: bool | None, fused: bool | None,
    owner: str = "lars_sgd",
) -> str:
    """The implementation for a bucket of one device and dtype: ``"triton"``, ``"fused"``,
    ``"foreach"`` or ``"single"``, by ``torch.optim``'s rules for ``foreach`` and ``fused``:
    ``fused=True`` takes a fused kernel or refuses the bucket, both None take one where it
    runs, ``foreach=False`` steps one tensor at a time."""
    if fused or (fused is None and foreach is None):
        kernel = _fused_kernel(device, dtype, tensors)
        if kernel is not None:
            return kernel
        if fused:
            problem = next(
                (problem for problem in map(why_no_fused_kernel, tensors) if problem),
                "the fused kernels step the tensors of a parameter (its gradient, its state) when they share its "
                "device, dtype and layout, and these do not. Use fused=None or foreach=True.",
            )
            raise RuntimeError(f"{owner}: `fused=True`: {problem}")
    return "single" if foreach is False else "foreach"


def fused_kernels(kind: str) -> ModuleType:
    """Where the fused implementations of a kind :func:`implementation` chose live: the Triton
    kernels (``"triton"``) or liblars's operators (``"fused"``), each with ``lars_sgd_``,
    ``lamb_`` and the others, taking the arguments of the plain implementations."""
    return _triton if kind == "triton" else _ops


def fused_kernels_step(params: list[Tensor]) -> bool:
    """Whether a fused kernel steps every parameter of ``params`` (then GradScaler's
    ``grad_scale`` and ``found_inf`` go to the step instead of a host-side check)."""
    return all(
        _fused_kernel(device, dtype, bucket) is not None
        for (device, dtype), ((bucket,), _) in grouped_by_device_and_dtype([params]).items()
    )


def why_no_fused_kernel(param: Tensor) -> str | None:
    """Why no fused kernel steps ``param``, saying what to use instead; None if one does."""
    if _fused_kernel(param.device, param.dtype, [param]) is not None:
        return None
    instead = "Use fused=None or foreach=True, which step it with torch._foreach_* ops."
    if type(param) not in _PLAIN_TENSORS:
        return (
            f"the fused kernels step plain tensors, not a {type(param).__name__} (e.g. an FSDP2 shard, whose "
            f"norm is not its local tensor's). {instead}"
        )
    if param.device.type == "cuda":
        if _triton_kernels(param.device) is None:
            return f"CUDA tensors take the Triton kernels, and triton is not installed. {instead}"
        return f"the Triton kernels step contiguous tensors of fp32, bf16 or fp16, not this {param.dtype} one. {instead}"
    if param.device.type != "cpu":
        return f"the fused kernels step CPU and CUDA tensors, not tensors on {param.device}. {instead}"
    if param.dtype not in FUSED_DTYPES:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in FUSED_DTYPES)
        return f"liblars's fused operator steps parameters of {names}, not {param.dtype}. {instead}"
    return (
        "CPU tensors take liblars's fused operator, which is not installed (torchlars._C is missing: "
        f"install torchlars with its C++ extension). {instead}"
    )


def skips_on_host(found_inf: Tensor | None) -> bool:
    """Whether GradScaler found an inf and the whole step is skipped here, on the host.

    Only where reading the flag is free: a CPU flag in an eager step that no Triton kernel
    takes. Then the step returns before anything (hooks, first-step buffers) happens, as
    GradScaler skips an optimizer that does not take ``found_inf``; everywhere else the
    kernels read the flag on the device and change nothing.
    """
    return (
        found_inf is not None
        and found_inf.device.type == "cpu"
        and not triton_runs_on_cpu()
        and not torch.compiler.is_compiling()
        and bool(found_inf.item())
    )


# ---------------------------------------------------------------------------------------
# The entry points


def lars_scale_gradients_(
    params: list[Tensor], grads: list[Tensor], settings: LARSSettings, *, weight_decay: float | Tensor,
    lr: float | Tensor
) -> list[tuple[list[Tensor], Tensor]]:
    """Replace every gradient by its LARS-scaled version, in place (``"paper"`` and ``"decayed"``).

    ``params[i]`` and ``grads[i]`` belong together. Returns, per bucket, the parameters and the
    ratios the scaling used.
    """
    if not params:
        return []
    ratios = []
    for (device, dtype), ((bucket_params, bucket_grads), _) in grouped_by_device_and_dtype([params, grads]).items():
        if implementation(device, dtype, [*bucket_params, *bucket_grads], foreach=None, fused=None) == "triton":
            bucket_ratios = _triton.scale_gradients_(bucket_params, bucket_grads, settings, weight_decay=weight_decay,
                                                     lr=lr)
        else:
            bucket_ratios = multi_tensor_lars_scale_gradients_(
                bucket_params, bucket_grads, settings, weight_decay=weight_decay, lr=lr
            )
        ratios.append((bucket_params, bucket_ratios))
    return ratios


def lars_update_(
    params: list[Tensor], params_before: list[Tensor], settings: LARSSettings, *, lr: float | Tensor
) -> list[tuple[list[Tensor], Tensor]]:
    """Scale the step a base optimizer just took (``"update"``), from copies of the weights taken
    before it (which may be overwritten). Returns, per bucket, the parameters and the ratios used."""
    if not params:
        return []
    ratios = []
    for (device, dtype), ((bucket_params, bucket_before), _) in grouped_by_device_and_dtype(
        [params, params_before]
    ).items():
        if implementation(device, dtype, [*bucket_params, *bucket_before], foreach=None, fused=None) == "triton":
            bucket_ratios = _triton.scale_update_(bucket_params, bucket_before, settings, lr=lr)
        else:
            bucket_ratios = multi_tensor_lars_update_(bucket_params, bucket_before, settings, lr=lr)
        ratios.append((bucket_params, bucket_ratios))
    return ratios


def lars_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    settings: LARSSettings,
    sgd: MomentumSGD,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> list[tuple[list[Tensor], Tensor]]:
    """One LARS step of momentum SGD for the parameters of one param group (the algorithm of
    :class:`torchlars.LARSSGD`), with LARS's settings and the group's SGD options.

    ``momentum_buffer_list[i]`` is ``params[i]``'s buffer, or None before its first step: then it
    is made here and set in the list. ``grads`` are left as they are. ``grad_scale`` and
    ``found_inf`` are GradScaler's: the gradients are divided by ``grad_scale``, and nothing
    changes where ``found_inf`` is non-zero. Returns the parameters and ratios of each call.
    """
    if not params:
        return []
    grouped = grouped_by_device_and_dtype([params, grads, momentum_buffer_list], with_indices=True)
    chosen = {  # every bucket is refused before any is stepped
        key: implementation(*key, bucket, foreach=foreach, fused=fused) for key, ((bucket, _, _), _) in grouped.items()
    }
    ratios = []
    for key, ((bucket_params, bucket_grads, bucket_buffers), indices) in grouped.items():
        for first_step, positions in _calls_by_buffer_kind(bucket_buffers, sgd.momentum):
            call_params = [bucket_params[i] for i in positions]
            call_grads = [bucket_grads[i] for i in positions]
            if sgd.momentum == 0:
                buffers = []
            elif first_step:
                # A first step GradScaler skips leaves its buffers as they are made: zeros, which
                # the next step's update turns into that step's d (exactly so without dampening).
                new_buffer = torch.empty_like if found_inf is None else torch.zeros_like
                buffers = [new_buffer(param) for param in call_params]
                for i, buffer in zip(positions, buffers):
                    momentum_buffer_list[indices[i]] = buffer
            else:
                buffers = [bucket_buffers[i] for i in positions]
            kind = chosen[key]
            if kind in ("triton", "fused"):
                ratios += fused_kernels(kind).lars_sgd_(call_params, call_grads, buffers, settings, sgd,
                                                         first_step=first_step, grad_scale=grad_scale,
                                                         found_inf=found_inf)
            else:
                step = multi_tensor_lars_sgd if kind == "foreach" else single_tensor_lars_sgd
                ratios += undone_where_found_inf(
                    found_inf, [*call_params, *buffers],
                    lambda: step(call_params, call_grads, buffers, settings, sgd, first_step=first_step,
                                 grad_scale=grad_scale),
                )
    return ratios


def _calls_by_buffer_kind(buffers: list[Tensor | None], momentum: float) -> list[tuple[bool, list[int]]]:
    """The positions of a bucket per kind of momentum buffer: ``(False, those to update)`` and
    ``(True, those a first step makes)``; normally there is one kind (a parameter that gets its
    first gradient late makes two)."""
    if momentum == 0:
        return [(False, list(range(len(buffers))))]
    calls = [
        (first_step, [i for i, buffer in enumerate(buffers) if (buffer is None) == first_step])
        for first_step in (False, True)
    ]
    return [(first_step, positions) for first_step, positions in calls if positions]
