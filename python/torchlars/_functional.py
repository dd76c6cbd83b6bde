"""The LARS maths, in one place.

Two functional entry points, each picking an implementation the way ``torch.optim.sgd.sgd``
picks between its own:

- ``lars_scale_gradients_`` scales the gradients for any base optimizer
  (``_multi_tensor_lars_scale_gradients_`` here, the C++ operators of ``torchlars.ops`` when
  asked);
- ``lars_sgd`` is a whole LARS + momentum-SGD step (``_fused_lars_sgd``, liblars's fused
  operator, or ``_multi_tensor_lars_sgd``, the same contract in ``torch._foreach_*`` ops).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import importlib
import importlib.util
import os
from typing import Any
import warnings

import torch
from torch import Tensor

from torchlars._param_norms import CarriedParamNorms, WitnessedNorms

__all__ = ["TRUST_RATIOS", "lars_scale_gradients_", "lars_scaled_gradients", "lars_sgd", "lars_update_", "trust_ratio"]

_HALF_TYPES = (torch.float16, torch.bfloat16)


def _grouped_by_device_and_dtype(
    tensorlistlist: list[list[Tensor | None]], with_indices: bool = False
) -> dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor | None]], list[int]]]:
    """The lists, regrouped by the device and dtype of the first list's tensors (order kept).

    What ``torch.utils._foreach_utils._group_tensors_by_device_and_dtype`` does in C++; used
    only if a torch release renames that private function, so that ``import torchlars`` and
    the step keep working.
    """
    grouped: dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor | None]], list[int]]] = {}
    for index, first in enumerate(tensorlistlist[0]):
        lists, indices = grouped.setdefault((first.device, first.dtype), ([[] for _ in tensorlistlist], []))
        for grouped_list, tensors in zip(lists, tensorlistlist):
            grouped_list.append(tensors[index])
        indices.append(index)
    return grouped


def _torch_grouping() -> Callable[..., Any] | None:
    try:
        foreach_utils = importlib.import_module("torch.utils._foreach_utils")
    except ImportError:
        return None
    return getattr(foreach_utils, "_group_tensors_by_device_and_dtype", None)


_group_tensors_by_device_and_dtype = _torch_grouping() or _grouped_by_device_and_dtype


TRUST_RATIOS = ("paper", "decayed", "update")


def trust_ratio(
    param_norms: Tensor,
    grad_norms: Tensor,
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str = "paper",
) -> Tensor:
    r"""Layer-wise trust ratios, one per parameter: the formula of :class:`torchlars.LARS`.

    ``grad_norms`` holds, per ``variant``, :math:`\|g\|` (``"paper"``), :math:`\|g + \lambda w\|`
    (``"decayed"``) or the norm of the base's step per unit of learning rate (``"update"``);
    only ``"paper"`` adds :math:`\lambda \|w\|` to the denominator. Pure tensor ops, so
    nothing waits on the device: the zero-norm test is a ``torch.where``.
    """
    denominator = grad_norms + weight_decay * param_norms if variant == "paper" else grad_norms
    ratio = trust_coef * param_norms / (denominator + eps)
    ratio = torch.where((param_norms > 0) & (grad_norms > 0), ratio, torch.ones_like(ratio))
    if clip:
        ratio = torch.clamp(ratio / lr, max=1.0)
    return ratio


def lars_scale_gradients_(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str = "paper",
    backend: str = "foreach",
) -> list[tuple[list[Tensor], Tensor]]:
    r"""Replace every gradient by its LARS-scaled version, in place.

    .. math:: g \leftarrow (g + \lambda w) \cdot r

    with :math:`r` from :func:`trust_ratio` (``variant`` "paper" or "decayed"). ``params[i]`` and
    ``grads[i]`` belong together. Returns, per (device, dtype), the parameters and the fp32 ratios
    the scaling used.
    ``backend`` picks the implementation, both giving the same numbers: ``"foreach"``
    (``torch._foreach_*`` ops, here) or ``"cpp"`` (the C++ operator of liblars,
    ``torch.ops.torchlars.lars_scale_gradients_``, in :mod:`torchlars.ops`).
    """
    if not params:
        return []
    settings = dict(weight_decay=weight_decay, lr=lr, eps=eps, trust_coef=trust_coef, clip=clip)
    if backend == "foreach":
        return _multi_tensor_lars_scale_gradients_(params, grads, variant=variant, **settings)
    if backend == "cpp":
        # Imported here: the pure-Python package works without the C++ extension.
        from torchlars import ops

        return [
            (device_params, ops.lars_scale_gradients_(device_params, device_grads, trust_ratio=variant, **settings))
            for (device_params, device_grads), _ in _group_tensors_by_device_and_dtype([params, grads]).values()
        ]
    raise ValueError(f"lars_scale_gradients_: `backend` must be 'foreach' or 'cpp', got {backend!r}")


def lars_scaled_gradients(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    maximize: bool,
    variant: str = "paper",
) -> list[Tensor]:
    r"""The LARS-scaled gradients :math:`(\pm g + \lambda w) \cdot r`, as new tensors.

    For base optimizers with ``differentiable=True``: out of place, so autograd differentiates
    through the scaling (the norms and the ratio included) as through the base's own step, and
    one tensor at a time, as torch's differentiable steps are. ``maximize`` negates ``g`` first.
    """
    scaled = []
    for param, grad in zip(params, grads):
        param = param.clone()  # what autograd saves must outlive the base's in-place update of param
        if maximize:
            grad = -grad
        norm_dtype = torch.float32 if param.dtype in _HALF_TYPES else None
        decayed = grad + weight_decay * param
        ratio = trust_ratio(
            torch.linalg.vector_norm(param, dtype=norm_dtype),
            torch.linalg.vector_norm(decayed if variant == "decayed" else grad, dtype=norm_dtype),
            weight_decay=weight_decay,
            lr=lr,
            eps=eps,
            trust_coef=trust_coef,
            clip=clip,
            variant=variant,
        )
        scaled.append((decayed * ratio).to(grad.dtype))
    return scaled


def _multi_tensor_lars_scale_gradients_(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str,
) -> list[tuple[list[Tensor], Tensor]]:
    ratios = []
    grouped = _group_tensors_by_device_and_dtype([params, grads])
    for (device, dtype), ((device_params, device_grads), _) in grouped.items():
        if triton_steps(device, device_params, device_grads):
            group_ratios = _triton().scale_gradients_(device_params, device_grads, weight_decay=weight_decay, lr=lr,
                                                      eps=eps, trust_coef=trust_coef, clip=clip, variant=variant)
            ratios.append((device_params, group_ratios))
            continue
        if variant == "decayed":
            # The ratio is taken from the decayed gradient itself: decay first, then scale.
            decay_(device_params, device_grads, weight_decay)
        param_norms, grad_norms = _param_and_grad_norms(device_params, device_grads, dtype)
        group_ratios = _scale_by_trust_ratio_(
            device_params,
            device_grads,
            param_norms,
            grad_norms,
            weight_decay=0.0 if variant == "decayed" else weight_decay,
            lr=lr,
            eps=eps,
            trust_coef=trust_coef,
            clip=clip,
            variant=variant,
        )
        ratios.append((device_params, group_ratios))
    return ratios


def decay_(params: list[Tensor], grads: list[Tensor], weight_decay: float | Tensor) -> None:
    r""":math:`g \leftarrow g + \lambda w`, in place (nothing for a float 0)."""
    if isinstance(weight_decay, Tensor):
        # Never compared with 0 nor passed as alpha: both would wait on the device.
        torch._foreach_add_(grads, torch._foreach_mul(params, weight_decay))
    elif weight_decay != 0:
        torch._foreach_add_(grads, params, alpha=weight_decay)


def _scale_by_trust_ratio_(
    params: list[Tensor],
    grads: list[Tensor],
    param_norms: Tensor,
    grad_norms: Tensor,
    *,
    weight_decay: float | Tensor,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str = "paper",
) -> Tensor:
    r""":math:`g \leftarrow (g + \lambda w) \cdot r` for tensors of one device and dtype, given the norms;
    returns the ratios :math:`r`.

    The norms are those of the whole parameters and gradients, which are not those of
    ``params`` and ``grads`` when these are the local shards of DTensors (``_distributed``).
    """
    ratios = trust_ratio(
        param_norms,
        grad_norms,
        weight_decay=weight_decay,
        lr=lr,
        eps=eps,
        trust_coef=trust_coef,
        clip=clip,
        variant=variant,
    )
    # Kept in the norms' dtype, fp32 for fp16/bf16 gradients: the multiply then runs in fp32 and
    # rounds once, instead of every layer's step being off by the ratio's rounding (0.4% in bf16).
    all_ratios, ratios = ratios, ratios.unbind(0)
    if not isinstance(weight_decay, Tensor) and weight_decay == 0:
        torch._foreach_mul_(grads, ratios)
        return all_ratios
    # On the CPU, adding the decay and multiplying one cache-sized block at a time reads and
    # writes each gradient from memory once instead of twice. (On a GPU, blocks would multiply
    # the kernel launches; under torch.compile the two ops fuse anyway.)
    if grads[0].device.type == "cpu" and not torch.compiler.is_compiling():
        blocks = _cpu_blocks(params, grads, ratios)
    else:
        blocks = [(params, grads, ratios)]
    for block_params, block_grads, block_ratios in blocks:
        decay_(block_params, block_grads, weight_decay)
        torch._foreach_mul_(block_grads, block_ratios)
    return all_ratios


# Elements per block of _cpu_blocks: 1 MiB of fp32 gradient plus as much parameter stays in a
# last-level cache; smaller blocks cost more in per-call overhead than they save (bench/).
_CPU_BLOCK_NUMEL = 1 << 18


def _cpu_blocks(
    params: list[Tensor], grads: list[Tensor], ratios: tuple[Tensor, ...]
) -> Iterator[tuple[list[Tensor], list[Tensor], list[Tensor]]]:
    """``params``, ``grads`` and ``ratios`` regrouped into blocks of about ``_CPU_BLOCK_NUMEL`` elements.

    A larger contiguous tensor is cut into flat slices, views that write through to it; each
    slice keeps its tensor's ratio. Elementwise ops give the same numbers on the slices.
    """
    block_params: list[Tensor] = []
    block_grads: list[Tensor] = []
    block_ratios: list[Tensor] = []
    block_numel = 0
    for param, grad, ratio in zip(params, grads, ratios):
        if grad.numel() > _CPU_BLOCK_NUMEL and param.is_contiguous() and grad.is_contiguous():
            pieces = zip(param.view(-1).split(_CPU_BLOCK_NUMEL), grad.view(-1).split(_CPU_BLOCK_NUMEL))
        else:
            pieces = ((param, grad),)
        for param_piece, grad_piece in pieces:
            block_params.append(param_piece)
            block_grads.append(grad_piece)
            block_ratios.append(ratio)
            block_numel += grad_piece.numel()
            if block_numel >= _CPU_BLOCK_NUMEL:
                yield block_params, block_grads, block_ratios
                block_params, block_grads, block_ratios, block_numel = [], [], [], 0
    if block_params:
        yield block_params, block_grads, block_ratios


def _param_and_grad_norms(params: list[Tensor], grads: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The L2 norms of ``params`` and of ``grads`` (all of ``dtype``), each stacked into one tensor."""
    norm_dtype = _norm_dtype(dtype)
    if torch.compiler.is_compiling() and params[0].device.type == "cpu":
        param_norms = torch.stack([_row_blocked_sum_of_squares(p, norm_dtype) for p in params]).sqrt()
        grad_norms = torch.stack([_row_blocked_sum_of_squares(g, norm_dtype) for g in grads]).sqrt()
        return param_norms, grad_norms
    param_norms = torch.stack(torch._foreach_norm(params, 2, dtype=norm_dtype))
    grad_norms = torch.stack(torch._foreach_norm(grads, 2, dtype=norm_dtype))
    return param_norms, grad_norms


# Elements per row of _row_blocked_sum_of_squares.
_NORM_ROW = 4096


def _row_blocked_sum_of_squares(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """The sum of squares of ``tensor``, as a sum over rows of ``_NORM_ROW`` elements.

    For torch.compile on the CPU only (eager steps and liblars keep ``_foreach_norm``). There
    Inductor runs ``_foreach_norm`` as its ATen fallback and compiles a plain sum of squares
    into a cascade summation, both well under memory speed; rows summed one by one, then the
    row sums, compile into plain vectorised loops, which take ResNet-50's two norms from 21 to
    13 ms on this project's 2-core machine. Each row's float sum is short, so the result is
    also closer to the exact norm than ``_foreach_norm``'s single long accumulation.
    """
    flat = tensor.reshape(-1)
    if dtype is not None:
        flat = flat.to(dtype)
    rows = flat.numel() // _NORM_ROW
    body, tail = flat[: rows * _NORM_ROW], flat[rows * _NORM_ROW :]
    total = tail.square().sum()
    if rows:
        total = body.view(rows, _NORM_ROW).square().sum(1).sum() + total
    return total


def lars_update_(
    params: list[Tensor],
    params_before: list[Tensor],
    *,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
) -> list[tuple[list[Tensor], Tensor]]:
    r"""Scale the step a base optimizer just took, in place: ``trust_ratio="update"`` (LAMB).

    .. math:: u = w - w_{before} \qquad w \leftarrow w_{before} + r \, u

    with :math:`r` from :func:`trust_ratio` on :math:`\|w_{before}\|` and :math:`\|u\| / \gamma`.
    ``params_before`` is overwritten. Five passes over memory beyond the base's step: the copy
    ``params_before`` (made by the caller), :math:`u`, two norms and the scaled step. Returns, per
    (device, dtype), the parameters and the fp32 ratios used.
    """
    ratios = []
    grouped = _group_tensors_by_device_and_dtype([params, params_before])
    for (_, dtype), ((device_params, device_before), _) in grouped.items():
        steps = device_before
        param_norms = torch.stack(torch._foreach_norm(device_before, 2, dtype=_norm_dtype(dtype)))
        torch._foreach_sub_(steps, device_params)  # w_before - w: minus the base's step
        step_norms = torch.stack(torch._foreach_norm(steps, 2, dtype=_norm_dtype(dtype)))
        group_ratios = trust_ratio(
            param_norms,
            step_norms / lr,
            weight_decay=0.0,
            lr=lr,
            eps=eps,
            trust_coef=trust_coef,
            clip=clip,
            variant="update",
        )
        # w + (1 - r) (w_before - w) = w_before + r u; exactly the base's step when r = 1.
        torch._foreach_mul_(steps, (1 - group_ratios).unbind(0))
        torch._foreach_add_(device_params, steps)
        ratios.append((device_params, group_ratios))
    return ratios


def _norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    # Half-precision norms are accumulated (and returned) in fp32.
    return torch.float32 if dtype in _HALF_TYPES else None


# ---------------------------------------------------------------------------------------
# A whole LARS + momentum-SGD step


def lars_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    carried_norms: CarriedParamNorms | None = None,
    step_witness: Tensor | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str = "paper",
) -> list[tuple[list[Tensor], Tensor]]:
    r"""One LARS step of momentum SGD for the parameters of one param group.

    .. math::
        g &\leftarrow -g \text{ if maximize} \qquad
        r = \text{trust\_ratio}(\|w\|, \|g\|) \qquad d = (g + \lambda w) \, r \\
        b &\leftarrow d \text{ on the first step, else } \mu b + (1 - \tau) d \qquad
        d \leftarrow d + \mu b \text{ if nesterov, else } b \\
        w &\leftarrow w - \gamma d

    with :math:`r` from :func:`trust_ratio`: the numbers of ``LARS(torch.optim.SGD(...))``.
    ``momentum_buffer_list[i]`` is ``params[i]``'s buffer, or None before its first step
    (then set here, as ``torch.optim.sgd.sgd`` does). ``grads`` are left as they are.
    ``grad_scale`` and ``found_inf`` are ``torch.amp.GradScaler``'s: the gradients are
    divided by ``grad_scale``, and nothing changes if ``found_inf`` is non-zero.

    ``fused=True`` steps with liblars's fused operator ``torch.ops.torchlars.lars_sgd_`` (plain
    CPU tensors; the norms ``||w||`` are carried in ``carried_norms`` from one step to the next).
    Under ``torch.compile`` the first step (which creates the momentum buffers) runs
    ``_multi_tensor_lars_sgd``'s ``torch._foreach_*`` ops, which Inductor fuses, and the later
    ones the fused operator as one opaque operator in the graph, carrying the norms with
    ``step_witness`` (see ``torchlars._param_norms``): a CPU tensor that only this param
    group's steps are given, kept from step to step; without it they are recomputed.
    ``fused=None`` and ``foreach=None`` pick, per device and dtype, the fused operator where it
    runs (the C++ extension installed, eager) and the ``torch._foreach_*`` ops elsewhere;
    ``foreach=False`` steps one parameter at a time. ``variant`` is "paper" or "decayed" (see
    :func:`trust_ratio`). Returns, per bucket, the parameters and the fp32 ratios the step used.
    """
    if not params:
        return []
    settings = dict(
        grad_scale=grad_scale,
        found_inf=found_inf,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        eps=eps,
        trust_coef=trust_coef,
        clip=clip,
        variant=variant,
    )
    if (fused or (fused is None and foreach is None)) and triton_steps(params[0].device, params, grads):
        return [(params, _triton().lars_sgd_(params, grads, momentum_buffer_list, **settings))]
    wants_fused = fused or (fused is None and foreach is None and _extension_installed())
    if wants_fused and not torch.compiler.is_compiling():
        if carried_norms is None:
            carried_norms = CarriedParamNorms()
        return _fused_lars_sgd(
            params, grads, momentum_buffer_list, carried_norms=carried_norms, strict=bool(fused), **settings
        )
    elif (
        wants_fused
        and (momentum == 0 or all(buffer is not None for buffer in momentum_buffer_list))
        and fused_lars_sgd_supports(params)
    ):
        # Compiled, once the momentum buffers exist: the fused kernel as one opaque operator.
        # NaN where a step skipped by GradScaler leaves no ratio.
        ratios = torch.full((len(params),), float("nan"), dtype=torch.float32)
        torch.ops.torchlars_python.fused_lars_sgd_step_(
            params,
            grads,
            momentum_buffer_list if momentum != 0 else [],
            torch.zeros((), dtype=torch.int64) if step_witness is None else step_witness,
            lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64),
            ratios,
            **{name: value for name, value in settings.items() if name != "lr"},
        )
        return [(params, ratios)]
    if fused or foreach or foreach is None:
        return _multi_tensor_lars_sgd(params, grads, momentum_buffer_list, **settings)
    ratios = []
    for index in range(len(params)):
        buffers = momentum_buffer_list[index : index + 1]
        ratios += _multi_tensor_lars_sgd(params[index : index + 1], grads[index : index + 1], buffers, **settings)
        momentum_buffer_list[index : index + 1] = buffers
    return ratios


FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# What the fused operator steps: plain tensors. A DTensor's norm is not its local shard's
# (see _distributed), and other subclasses may dispatch elsewhere.
_PLAIN_TENSORS = {Tensor, torch.nn.Parameter}


def fused_lars_sgd_supports(params: list[Tensor]) -> bool:
    """Whether liblars's fused operator can step ``params`` (and is installed)."""
    return _extension_installed() and all(
        _fused_bucket(device, dtype, bucket)
        for (device, dtype), ((bucket,), _) in _group_tensors_by_device_and_dtype([params]).items()
    )


def _fused_bucket(device: torch.device, dtype: torch.dtype, params: list[Tensor]) -> bool:
    return device.type == "cpu" and dtype in FUSED_DTYPES and set(map(type, params)) <= _PLAIN_TENSORS


# Looked up once, at import: a constant to torch.compile, which cannot trace importlib.
_EXTENSION_INSTALLED = importlib.util.find_spec("torchlars._C") is not None


def _extension_installed() -> bool:
    return _EXTENSION_INSTALLED


def _fused_lars_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    carried_norms: CarriedParamNorms | WitnessedNorms,
    strict: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    **settings: Any,
) -> list[tuple[list[Tensor], Tensor]]:
    """The fused operator per (device, dtype) bucket; ``_multi_tensor_lars_sgd`` for a bucket it
    cannot step, or an error if ``strict`` (``fused=True``). ``settings`` are ``lars_sgd``'s:
    lr, weight_decay, momentum, dampening, nesterov, maximize, eps, trust_coef, clip and variant.
    Returns the parameters and ratios of each operator call."""
    # Imported here: the pure-Python package works without the C++ extension.
    from torchlars import ops  # noqa: F401  (defines torch.ops.torchlars)

    momentum, lr, variant = settings["momentum"], settings["lr"], settings.pop("variant")
    grouped = _group_tensors_by_device_and_dtype([params, grads, momentum_buffer_list], with_indices=True)
    fused = {key: _fused_bucket(*key, bucket) for key, ((bucket, _, _), _) in grouped.items()}
    # The kernel skips an overflowing step by itself. Returning here as well keeps the momentum
    # buffers of a skipped first step unset, so the next step is a first step, as with
    # GradScaler and a plain SGD.
    if any(fused.values()) and skipped_by_grad_scaler(found_inf):
        return []
    ratios: list[tuple[list[Tensor], Tensor]] = []
    op_lr = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)
    for (device, dtype), ((device_params, device_grads, device_buffers), indices) in grouped.items():
        if not fused[device, dtype]:
            if strict:
                raise RuntimeError(
                    f"lars_sgd: fused=True steps plain CPU tensors of {FUSED_DTYPES}, got "
                    f"{type(device_params[0]).__name__} tensors of {dtype} on {device}"
                )
            ratios += _multi_tensor_lars_sgd(device_params, device_grads, device_buffers, grad_scale=grad_scale,
                                             found_inf=found_inf, variant=variant, **settings)
            for index, buffer in zip(indices, device_buffers):
                momentum_buffer_list[index] = buffer
            continue
        # One operator call per kind of momentum buffer: those to update, and those to
        # initialise (a first step); normally all of a bucket's buffers are of one kind.
        if momentum == 0:
            calls = [(False, device_params, device_grads, [])]
        elif not any(buffer is None for buffer in device_buffers):
            calls = [(False, device_params, device_grads, device_buffers)]
        else:
            updated = [i for i, buffer in enumerate(device_buffers) if buffer is not None]
            first = [i for i, buffer in enumerate(device_buffers) if buffer is None]
            for i in first:
                device_buffers[i] = momentum_buffer_list[indices[i]] = torch.empty_like(device_params[i])
            calls = [
                (is_first_step, [device_params[i] for i in positions], [device_grads[i] for i in positions],
                 [device_buffers[i] for i in positions])
                for is_first_step, positions in ((False, updated), (True, first))
                if positions
            ]
        for is_first_step, step_params, step_grads, step_buffers in calls:
            key = (device, dtype, is_first_step)
            param_norms = carried_norms.lookup(key, step_params)
            recompute = param_norms is None
            if recompute:  # the step computes them from the parameters it reads anyway
                param_norms = torch.empty(len(step_params), dtype=torch.float32)
            step_ratios = torch.empty(len(step_params), dtype=torch.float32)
            torch.ops.torchlars.lars_sgd_(
                step_params,
                step_grads,
                step_buffers,
                param_norms,
                is_first_step=is_first_step,
                grad_scale=grad_scale,
                found_inf=found_inf,
                recompute_param_norms=recompute,
                trust_ratio=variant,
                trust_ratios=step_ratios,
                **{**settings, "lr": op_lr},
            )
            carried_norms.carry(key, step_params, param_norms)
            ratios.append((step_params, step_ratios))
    return ratios


def skipped_by_grad_scaler(found_inf: Tensor | None) -> bool:
    """Whether GradScaler found an inf in a CPU step: then the whole step is skipped, hooks too.

    As GradScaler skips the step of an optimizer that does not take ``found_inf``. Reading the
    flag is no device sync on the CPU; elsewhere (and under torch.compile) the kernels skip.
    Returning early also keeps torch's fused SGD from leaving uninitialised momentum buffers
    after a skipped first step (it allocates them before its kernel skips).
    """
    return (
        found_inf is not None
        and found_inf.device.type == "cpu"
        and not _triton_on_cpu()
        and not torch.compiler.is_compiling()
        and bool(found_inf.item())
    )


@torch.library.custom_op(
    "torchlars_python::fused_lars_sgd_step_",
    mutates_args=("params", "momentum_buffers", "step_witness", "trust_ratios"),
)
def _fused_lars_sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    step_witness: Tensor,
    lr: Tensor,
    trust_ratios: Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    eps: float,
    trust_coef: float,
    clip: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    variant: str,
) -> None:
    """``_fused_lars_sgd`` as one operator for torch.compile, once every momentum buffer exists.

    Inductor calls it on the parameters themselves (graph inputs mutated in place: no
    functional copy), and it runs the eager fused kernel. The norms it carries from one step to
    the next are checked against ``step_witness``'s version counter (``WitnessedNorms``): it is
    declared mutated, so the compiled code bumps it as it bumps the parameters, and nothing else
    touches it (the operator does not even write it). Where the norms cannot be trusted, the
    kernel recomputes ``||w||`` in the pass that reads the gradients. ``trust_ratios`` gets the
    ratios the step used.
    """
    buffers: list[Tensor | None] = list(momentum_buffers) if momentum != 0 else [None] * len(params)
    ratios = _fused_lars_sgd(
        params,
        grads,
        buffers,
        carried_norms=WitnessedNorms(step_witness),
        strict=True,
        grad_scale=grad_scale,
        found_inf=found_inf,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        eps=eps,
        trust_coef=trust_coef,
        clip=clip,
        variant=variant,
    )
    if ratios:  # one call when every buffer exists, as here; none when GradScaler skipped the step
        trust_ratios.copy_(torch.cat([step_ratios for _, step_ratios in ratios]))


@_fused_lars_sgd_step_.register_fake
def _(params, grads, momentum_buffers, step_witness, lr, trust_ratios, weight_decay, momentum, dampening, nesterov,
      maximize, eps, trust_coef, clip, grad_scale, found_inf, variant) -> None:
    return None


def _multi_tensor_lars_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str,
) -> list[tuple[list[Tensor], Tensor]]:
    all_ratios = []
    grouped = _group_tensors_by_device_and_dtype([params, grads, momentum_buffer_list], with_indices=True)
    for (_, dtype), ((device_params, device_grads, device_buffers), indices) in grouped.items():
        # New tensors from here on: the caller's gradients stay as they are.
        if grad_scale is not None:
            device_grads = torch._foreach_div(device_grads, grad_scale)
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        if variant == "decayed":
            device_grads = torch._foreach_add(device_grads, device_params, alpha=weight_decay)
        param_norms, grad_norms = _param_and_grad_norms(device_params, device_grads, dtype)
        group_ratios = trust_ratio(
            param_norms,
            grad_norms,
            weight_decay=weight_decay,
            lr=lr,
            eps=eps,
            trust_coef=trust_coef,
            clip=clip,
            variant=variant,
        )
        all_ratios.append((device_params, group_ratios))
        ratios = group_ratios.unbind(0)
        if weight_decay != 0 and variant == "paper":
            updates = torch._foreach_add(device_grads, device_params, alpha=weight_decay)
            torch._foreach_mul_(updates, ratios)
        else:
            updates = torch._foreach_mul(device_grads, ratios)
        if found_inf is not None:
            # Kept to restore on an overflow: buffers before their update, parameters before theirs.
            old_params = [param.clone() for param in device_params]
            old_buffers = [None if buffer is None else buffer.clone() for buffer in device_buffers]
        if momentum != 0:
            buffers = []
            for i, (update, buffer) in enumerate(zip(updates, device_buffers)):
                if buffer is None:
                    buffer = device_buffers[i] = momentum_buffer_list[indices[i]] = update.clone()
                else:
                    buffer.mul_(momentum).add_(update, alpha=1 - dampening)
                buffers.append(buffer)
            if nesterov:
                torch._foreach_add_(updates, buffers, alpha=momentum)
            else:
                updates = buffers
        if isinstance(lr, Tensor):
            # alpha=<tensor> would wait on the device for its value (.item()).
            torch._foreach_add_(device_params, torch._foreach_mul(updates, -lr))
        else:
            torch._foreach_add_(device_params, updates, alpha=-lr)
        if found_inf is not None:
            skip = found_inf != 0
            for param, old in zip(device_params, old_params):
                param.copy_(torch.where(skip, old, param))
            for buffer, old in zip(device_buffers, old_buffers):
                # A first step's new buffer has nothing to go back to: zeros, which the next
                # step's update turns into that step's d (exactly so when dampening is 0).
                buffer.copy_(torch.where(skip, torch.zeros_like(buffer) if old is None else old, buffer))
    return all_ratios


# ---------------------------------------------------------------------------------------
# Triton kernels for GPU tensors (torchlars._triton, imported only when used)

# Looked up once, at import: finding a module is cheap, importing triton is not.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_warned_no_triton = False


def _triton() -> Any:
    return importlib.import_module("torchlars._triton")


def _triton_on_cpu() -> bool:
    """Whether CPU tensors take the Triton kernels, through Triton's interpreter (for tests)."""
    return (
        _TRITON_INSTALLED
        and os.environ.get("TRITON_INTERPRET") == "1"
        and os.environ.get("TORCHLARS_TRITON_ON_CPU") == "1"
    )


def triton_steps(device: torch.device, *tensor_lists: list[Tensor]) -> bool:
    """Whether the Triton kernels step these lists of one device and dtype (eager steps only:
    a compiled step keeps the ``torch._foreach_*`` ops, which Inductor fuses itself)."""
    global _warned_no_triton
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and not _TRITON_INSTALLED:
        if not _warned_no_triton:
            _warned_no_triton = True
            warnings.warn(
                "torchlars: triton is not installed, so LARS steps CUDA tensors with torch._foreach_* ops, "
                "one kernel per parameter for some of them; `pip install triton` for its multi-tensor kernels",
                stacklevel=4,
            )
        return False
    if device.type != "cuda" and not (device.type == "cpu" and _triton_on_cpu()):
        return False
    return _triton().steps(*tensor_lists)


def triton_lars_sgd_supports(params: list[Tensor]) -> bool:
    """Whether the Triton kernels can step ``params`` (each bucket) with ``lars_sgd``."""
    return all(
        triton_steps(device, bucket)
        for (device, _), ((bucket,), _) in _group_tensors_by_device_and_dtype([params]).items()
    )
