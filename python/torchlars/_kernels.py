"""Which kernels step what: liblars's fused CPU operator and the Triton kernels for GPU tensors.

:mod:`torchlars._functional` asks here whether a bucket of tensors (one device and dtype) can
take one of them, and calls them through here. Nothing is imported until it is used: the
pure-Python package works without the C++ extension, and without triton.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any
import warnings

import torch
from torch import Tensor

__all__ = [
    "FUSED_DTYPES",
    "check_fused_param",
    "fused_bucket",
    "fused_lars_sgd",
    "fused_lars_sgd_supports",
    "prepare_triton",
    "skipped_by_grad_scaler",
    "triton",
    "triton_lars_sgd_supports",
    "triton_on_cpu",
    "triton_steps",
]

# ---------------------------------------------------------------------------------------
# liblars's fused LARS + momentum-SGD operator, torch.ops.torchlars.lars_sgd_ (CPU)

#: The dtypes of the fused operator (``lars::fused_dtype`` in C++).
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# What the fused operator steps: plain tensors. A DTensor's norm is not its local shard's
# (see _distributed), and other subclasses may dispatch elsewhere.
_PLAIN_TENSORS = {Tensor, torch.nn.Parameter}

# Looked up once, at import: a constant to torch.compile, which cannot trace importlib.
_EXTENSION_INSTALLED = importlib.util.find_spec("torchlars._C") is not None


def fused_bucket(device: torch.device, dtype: torch.dtype, params: list[Tensor]) -> bool:
    """Whether the fused operator steps this bucket of one device and dtype (and is installed)."""
    return (
        _EXTENSION_INSTALLED
        and device.type == "cpu"
        and dtype in FUSED_DTYPES
        and set(map(type, params)) <= _PLAIN_TENSORS
    )


def fused_lars_sgd_supports(params: list[Tensor]) -> bool:
    """Whether liblars's fused operator can step every parameter of ``params``."""
    from torchlars._foreach import grouped_by_device_and_dtype

    return all(
        fused_bucket(device, dtype, bucket)
        for (device, dtype), ((bucket,), _) in grouped_by_device_and_dtype([params]).items()
    )


def check_fused_param(param: Tensor, position: str, owner: str) -> None:
    """Refuse, naming the option, a parameter that no fused kernel (liblars's, Triton's) steps."""
    if type(param) not in _PLAIN_TENSORS:
        raise RuntimeError(
            f"{owner}: `fused=True` steps plain tensors, but {position} is a {type(param).__name__} "
            "(e.g. an FSDP2 shard, whose norm is not its local tensor's). Use fused=None or foreach=True."
        )
    if triton_lars_sgd_supports([param]):
        return  # the Triton kernels step it (torchlars._triton)
    if param.device.type != "cpu":
        raise RuntimeError(
            f"{owner}: `fused=True` steps CPU tensors with liblars's fused operator, and CUDA tensors "
            f"with the Triton kernels when triton is installed, but {position} is on {param.device}. "
            "Use fused=None or foreach=True, which step it with torch._foreach_* ops."
        )
    if param.dtype not in FUSED_DTYPES:
        raise RuntimeError(
            f"{owner}: `fused=True` steps floating-point parameters of "
            f"{', '.join(str(dtype).removeprefix('torch.') for dtype in FUSED_DTYPES)}, "
            f"but {position} is {param.dtype}."
        )
    if not _EXTENSION_INSTALLED:
        raise RuntimeError(
            f"{owner}: `fused=True` steps CPU tensors with liblars's fused operator, which is not "
            "installed (torchlars._C is missing: install torchlars with its C++ extension). "
            "Use fused=None or foreach=True."
        )


def fused_lars_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    variant: str,
    found_inf: Tensor | None,
    **settings: Any,
) -> list[tuple[list[Tensor], Tensor]]:
    """``torch.ops.torchlars.lars_sgd_`` on a bucket of one device and dtype, eager or compiled.

    One call per kind of momentum buffer: those to update, and those to create here (a first
    step, which puts them into ``momentum_buffer_list``); normally a bucket's buffers are all of
    one kind. ``settings`` are :func:`torchlars._functional.lars_sgd`'s others. Returns the
    parameters and ratios of each call.
    """
    from torchlars import ops  # noqa: F401  (loads liblars, which defines torch.ops.torchlars)

    if momentum == 0:
        calls = [(False, list(range(len(params))))]
    else:
        updated = [i for i, buffer in enumerate(momentum_buffer_list) if buffer is not None]
        first = [i for i, buffer in enumerate(momentum_buffer_list) if buffer is None]
        # A first step GradScaler skips leaves these buffers as they are made: zeros then (only
        # a compiled step gets here with an overflow; eager ones return before), which the next
        # step's update turns into that step's d, exactly so without dampening.
        new_buffer = torch.empty_like if found_inf is None else torch.zeros_like
        for i in first:
            momentum_buffer_list[i] = new_buffer(params[i])
        calls = [(is_first_step, positions) for is_first_step, positions in ((False, updated), (True, first)) if positions]
    op_lr = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)
    ratios = []
    for is_first_step, positions in calls:
        call_params = [params[i] for i in positions]
        # NaN where a step GradScaler skips (only compiled ones get here then) leaves no ratio.
        call_ratios = torch.full((len(positions),), float("nan") if found_inf is not None else 0.0, dtype=torch.float32)
        torch.ops.torchlars.lars_sgd_(
            call_params,
            [grads[i] for i in positions],
            [momentum_buffer_list[i] for i in positions] if momentum != 0 else [],
            lr=op_lr,
            momentum=momentum,
            is_first_step=is_first_step,
            trust_ratio=variant,
            trust_ratios=call_ratios,
            found_inf=found_inf,
            **settings,
        )
        ratios.append((call_params, call_ratios))
    return ratios


def skipped_by_grad_scaler(found_inf: Tensor | None) -> bool:
    """Whether GradScaler found an inf in an eager CPU step: then the whole step is skipped, hooks too.

    As GradScaler skips the step of an optimizer that does not take ``found_inf``. Reading the
    flag is no device sync on the CPU; elsewhere (and under torch.compile) the kernels skip.
    Returning early also keeps a skipped first step from leaving momentum buffers behind, so
    that the next step is a first step, as with GradScaler and a plain SGD.
    """
    return (
        found_inf is not None
        and found_inf.device.type == "cpu"
        and not triton_on_cpu()
        and not torch.compiler.is_compiling()
        and bool(found_inf.item())
    )


# ---------------------------------------------------------------------------------------
# The Triton kernels for GPU tensors (torchlars._triton, imported only when used)

# Looked up once, at import: finding a module is cheap, importing triton is not.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_warned_no_triton = False


_triton_module: Any = None


def triton() -> Any:
    """torchlars._triton, imported on first use (importing triton takes a second)."""
    global _triton_module
    if _triton_module is None:
        _triton_module = importlib.import_module("torchlars._triton")
    return _triton_module


def prepare_triton(params: list[Tensor]) -> None:
    """Import torchlars._triton now if the Triton kernels may step ``params``: a compiled step
    cannot import it (the optimizers call this when they are built)."""
    if _TRITON_INSTALLED and (any(param.device.type == "cuda" for param in params) or triton_on_cpu()):
        triton()


def triton_on_cpu() -> bool:
    """Whether CPU tensors take the Triton kernels, through Triton's interpreter (for tests)."""
    return (
        _TRITON_INSTALLED
        and os.environ.get("TRITON_INTERPRET") == "1"
        and os.environ.get("TORCHLARS_TRITON_ON_CPU") == "1"
    )


def triton_steps(device: torch.device, *tensor_lists: list[Tensor]) -> bool:
    """Whether the Triton kernels step these lists of one device and dtype, eager or compiled."""
    global _warned_no_triton
    if device.type == "cuda" and not _TRITON_INSTALLED:
        if not _warned_no_triton:
            _warned_no_triton = True
            warnings.warn(
                "torchlars: triton is not installed, so LARS steps CUDA tensors with torch._foreach_* ops, "
                "one kernel per parameter for some of them; `pip install triton` for its multi-tensor kernels",
                stacklevel=4,
            )
        return False
    if device.type != "cuda" and not (device.type == "cpu" and triton_on_cpu()):
        return False
    if _triton_module is None and torch.compiler.is_compiling():
        return False  # not imported yet, which a compiled step cannot do: prepare_triton
    return triton().steps(*tensor_lists)


def triton_lars_sgd_supports(params: list[Tensor]) -> bool:
    """Whether the Triton kernels can step every parameter of ``params`` with ``lars_sgd``."""
    from torchlars._foreach import grouped_by_device_and_dtype

    return all(
        triton_steps(device, bucket) for (device, _), ((bucket,), _) in grouped_by_device_and_dtype([params]).items()
    )
