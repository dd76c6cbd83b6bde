"""LARS on a GPU: Triton multi-tensor kernels, a constant number of launches per (device, dtype).

Imported only where ``torchlars._functional`` sends tensors here (CUDA and ROCm tensors with
triton installed; CPU tensors with ``TRITON_INTERPRET=1`` and ``TORCHLARS_TRITON_ON_CPU=1``,
which run the very same kernels through Triton's interpreter), so ``import torchlars`` never
imports triton.

Every kernel works on a whole list of tensors of one device and dtype: one program per chunk
of ``BLOCK`` elements of one tensor, found through the tables of :class:`Tables` (each
tensor's address, its number of elements, which tensor and which of its chunks a program
steps), as Triton's grouped-GEMM tutorial finds its matrices. The jobs:

- :func:`norms`: ``||w||`` and ``||g'||`` per tensor (``g' = sign * g / grad_scale``, or
  ``g' + wd * w`` for the ``"decayed"`` trust ratio), in fp32, in two deterministic stages:
  per-chunk sums of squares, then per-tensor sums of those (no atomics, so the same inputs
  give the same bits);
- :func:`scale_gradients_`: ``g <- (g + wd * w) * r[i]`` for any base optimizer;
- :func:`lars_sgd_`: the whole LARS-momentum SGD update in one pass over w, g and the buffer,
  with GradScaler's ``grad_scale`` and ``found_inf`` read on the device.

The kernels are registered with ``torch.library.triton_op`` (namespace ``torchlars_triton``),
so each is one operator to a dispatch mode. A step calls them through one opaque custom
operator per bucket (``scale_gradients_step_``, ``lars_sgd_step_``), which a compiled step
calls as it is: the tables are found by the tensors' data pointers, which only a running step
has, so they cannot be traced.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton
import triton
import triton.language as tl

from torchlars._functional import LARSSettings, MomentumSGD, lr_tensor, trust_ratio

__all__ = ["DTYPES", "Tables", "lars_sgd_", "norms", "scale_gradients_", "steps", "tables_for"]

# What the kernels step: the arithmetic is done in fp32, as in ATen's fused optimizers.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per program: large enough that a program's fixed cost (loading its table entries)
# is small, small enough that a 100-element bias does not waste most of a program.
BLOCK = 2048
# Chunk partial sums one program of the second norm stage adds per iteration.
_PARTIALS_BLOCK = 128

# ---------------------------------------------------------------------------------------
# Tables


class Tables(NamedTuple):
    """The device tables of one list of tensors (and of the lists stepped with it), as views of
    one int64 tensor uploaded once: ``numels[i]``, ``first_chunk[i]`` (chunks ``first_chunk[i]``
    to ``first_chunk[i + 1]`` are tensor ``i``'s), ``chunk_tensor[c]`` / ``chunk_index[c]``
    (which tensor and which of its chunks program ``c`` steps) and ``addresses[list][i]``."""

    storage: Tensor
    numels: Tensor
    first_chunk: Tensor
    chunk_tensor: Tensor
    chunk_index: Tensor
    addresses: Tensor
    num_chunks: int


# Tables by (device, dtype, numels, data pointers of every list). The tables are a function of
# exactly these, so an entry is right whenever its key matches, whoever owns the tensors now;
# a swapped parameter, a new param group or a loaded state has new pointers, hence new tables.
_TABLES: OrderedDict[tuple, Tables] = OrderedDict()
_MAX_TABLES = 64
tables_built = 0  # how many were uploaded: read by the tests


def tables_for(*tensor_lists: list[Tensor]) -> Tables:
    """The tables of ``tensor_lists`` (lists of equal length, tensor ``i`` of each of the same size),
    from the cache while their tensors' data pointers are unchanged: then nothing is uploaded, and
    a step can be captured in a CUDA graph."""
    global tables_built
    first = tensor_lists[0]
    key = (
        first[0].device,
        first[0].dtype,
        tuple(tensor.numel() for tensor in first),
        tuple(tuple(tensor.data_ptr() for tensor in tensors) for tensors in tensor_lists),
    )
    tables = _TABLES.get(key)
    if tables is not None:
        _TABLES.move_to_end(key)
        return tables
    numels = key[2]
    chunks = [triton.cdiv(numel, BLOCK) for numel in numels]
    first_chunk = [0]
    for count in chunks:
        first_chunk.append(first_chunk[-1] + count)
    chunk_tensor = [i for i, count in enumerate(chunks) for _ in range(count)]
    chunk_index = [j for count in chunks for j in range(count)]
    host = torch.tensor(
        [*numels, *first_chunk, *chunk_tensor, *chunk_index, *(ptr for ptrs in key[3] for ptr in ptrs)],
        dtype=torch.int64,
    )
    device = first[0].device
    if device.type != "cpu":
        # Pinned, so the copy is asynchronous (no host sync); the entry keeps the host tensor alive.
        host = host.pin_memory()
    storage = host.to(device, non_blocking=True)
    n, c = len(numels), first_chunk[-1]
    views = storage.split([n, n + 1, c, c, n * len(tensor_lists)])
    tables = Tables(storage, *views[:4], views[4].view(len(tensor_lists), n), c)
    _TABLES[key] = tables
    tables_built += 1
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return tables


def steps(*tensor_lists: list[Tensor]) -> bool:
    """Whether the kernels step these lists: plain contiguous tensors of one device and dtype of ``DTYPES``."""
    first = tensor_lists[0][0]
    return first.dtype in DTYPES and all(
        type(tensor) in (Tensor, torch.nn.Parameter)
        and tensor.is_contiguous()
        and tensor.device == first.device
        and tensor.dtype == first.dtype
        for tensors in tensor_lists
        for tensor in tensors
    )


# ---------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _chunk(tables_numels, tables_chunk_tensor, tables_chunk_index, BLOCK: tl.constexpr):
    """This program's tensor, its element offsets and how many elements that tensor has."""
    chunk = tl.program_id(0)
    tensor = tl.load(tables_chunk_tensor + chunk)
    offsets = tl.load(tables_chunk_index + chunk) * BLOCK + tl.arange(0, BLOCK)
    return tensor, offsets, tl.load(tables_numels + tensor)


@triton.jit
def _scalar(value, pointer, IS_TENSOR: tl.constexpr):
    """A float option given as a number, or as a one-element tensor (read on the device)."""
    if IS_TENSOR:
        return tl.load(pointer).to(tl.float32)
    return value


@triton.jit
def _sum_of_squares_kernel(
    numels, chunk_tensor, chunk_index, addresses, num_tensors, like, partials,
    grad_scale, weight_decay_tensor, weight_decay, sign,
    HAS_GRAD_SCALE: tl.constexpr, WEIGHT_DECAY_IS_TENSOR: tl.constexpr, DECAYED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tensor, offsets, numel = _chunk(numels, chunk_tensor, chunk_index, BLOCK)
    mask = offsets < numel
    pointer_type = tl.pointer_type(like.dtype.element_ty)
    param = tl.load(tl.load(addresses + tensor).to(pointer_type) + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(tl.load(addresses + num_tensors + tensor).to(pointer_type) + offsets, mask=mask, other=0.0)
    grad = grad.to(tl.float32) * sign
    if HAS_GRAD_SCALE:
        grad = grad / tl.load(grad_scale)
    if DECAYED:
        grad = grad + _scalar(weight_decay, weight_decay_tensor, WEIGHT_DECAY_IS_TENSOR) * param
    chunk = tl.program_id(0)
    tl.store(partials + 2 * chunk, tl.sum(param * param, axis=0))
    tl.store(partials + 2 * chunk + 1, tl.sum(grad * grad, axis=0))


@triton.jit
def _norms_kernel(partials, first_chunk, num_tensors, norms, PARTIALS_BLOCK: tl.constexpr):
    """Program ``i``: tensor ``i``'s chunk sums, added in a fixed order, then the square roots."""
    tensor = tl.program_id(0)
    begin = tl.load(first_chunk + tensor)
    end = tl.load(first_chunk + tensor + 1)
    param_sum = tl.zeros([PARTIALS_BLOCK], dtype=tl.float32)
    grad_sum = tl.zeros([PARTIALS_BLOCK], dtype=tl.float32)
    for start in range(begin, end, PARTIALS_BLOCK):
        chunks = start + tl.arange(0, PARTIALS_BLOCK)
        mask = chunks < end
        param_sum += tl.load(partials + 2 * chunks, mask=mask, other=0.0)
        grad_sum += tl.load(partials + 2 * chunks + 1, mask=mask, other=0.0)
    tl.store(norms + tensor, tl.sqrt(tl.sum(param_sum, axis=0)))
    tl.store(norms + num_tensors + tensor, tl.sqrt(tl.sum(grad_sum, axis=0)))


@triton.jit
def _scale_gradients_kernel(
    numels, chunk_tensor, chunk_index, addresses, num_tensors, like, ratios,
    weight_decay_tensor, weight_decay,
    WEIGHT_DECAY_IS_TENSOR: tl.constexpr, BLOCK: tl.constexpr,
):
    tensor, offsets, numel = _chunk(numels, chunk_tensor, chunk_index, BLOCK)
    mask = offsets < numel
    pointer_type = tl.pointer_type(like.dtype.element_ty)
    param = tl.load(tl.load(addresses + tensor).to(pointer_type) + offsets, mask=mask).to(tl.float32)
    grad_pointer = tl.load(addresses + num_tensors + tensor).to(pointer_type) + offsets
    grad = tl.load(grad_pointer, mask=mask).to(tl.float32)
    grad = (grad + _scalar(weight_decay, weight_decay_tensor, WEIGHT_DECAY_IS_TENSOR) * param) * tl.load(ratios + tensor)
    tl.store(grad_pointer, grad.to(like.dtype.element_ty), mask=mask)


@triton.jit
def _lars_sgd_kernel(
    numels, chunk_tensor, chunk_index, addresses, num_tensors, like, ratios,
    grad_scale, found_inf, lr_tensor, lr, weight_decay, sign, momentum, dampening,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr,
):
    """One pass over w, g and the buffer: the update of ``torchlars._dispatch.lars_sgd``."""
    tensor, offsets, numel = _chunk(numels, chunk_tensor, chunk_index, BLOCK)
    in_tensor = offsets < numel
    mask = in_tensor
    if HAS_FOUND_INF:
        # An overflowing step reads and writes nothing (but a first step's new buffer, below).
        mask = offsets < tl.where(tl.load(found_inf) != 0, 0, numel)
    element_type = like.dtype.element_ty
    pointer_type = tl.pointer_type(element_type)
    param_pointer = tl.load(addresses + tensor).to(pointer_type) + offsets
    param = tl.load(param_pointer, mask=mask).to(tl.float32)
    grad = tl.load(tl.load(addresses + num_tensors + tensor).to(pointer_type) + offsets, mask=mask)
    grad = grad.to(tl.float32) * sign
    if HAS_GRAD_SCALE:
        grad = grad / tl.load(grad_scale)
    update = (grad + weight_decay * param) * tl.load(ratios + tensor)
    if HAS_MOMENTUM:
        buffer_pointer = tl.load(addresses + 2 * num_tensors + tensor).to(pointer_type) + offsets
        if FIRST_STEP:
            buffer = update
            # A skipped first step leaves zeros, not uninitialised memory, in the new buffer.
            tl.store(buffer_pointer, tl.where(mask, buffer, 0.0).to(element_type), mask=in_tensor)
        else:
            buffer = tl.load(buffer_pointer, mask=mask).to(tl.float32) * momentum + (1.0 - dampening) * update
            tl.store(buffer_pointer, buffer.to(element_type), mask=mask)
        if NESTEROV:
            update = update + momentum * buffer
        else:
            update = buffer
    param = param - _scalar(lr, lr_tensor, LR_IS_TENSOR) * update
    tl.store(param_pointer, param.to(element_type), mask=mask)


# ---------------------------------------------------------------------------------------
# Operators


@triton_op("torchlars_triton::norms", mutates_args={})
def _norms(
    params: list[Tensor],
    grads: list[Tensor],
    tables: Tensor,
    num_chunks: int,
    grad_scale: Tensor | None,
    weight_decay_tensor: Tensor | None,
    weight_decay: float,
    sign: float,
    decayed: bool,
) -> Tensor:
    n = len(params)
    numels, first_chunk, chunk_tensor, chunk_index, addresses = _table_views(tables, n, num_chunks)
    partials = torch.empty(2 * max(num_chunks, 1), dtype=torch.float32, device=tables.device)
    result = torch.empty(2, n, dtype=torch.float32, device=tables.device)
    if num_chunks:
        wrap_triton(_sum_of_squares_kernel)[(num_chunks,)](
            numels, chunk_tensor, chunk_index, addresses, n, params[0], partials,
            tables if grad_scale is None else grad_scale,
            tables if weight_decay_tensor is None else weight_decay_tensor,
            weight_decay, sign,
            HAS_GRAD_SCALE=grad_scale is not None, WEIGHT_DECAY_IS_TENSOR=weight_decay_tensor is not None,
            DECAYED=decayed, BLOCK=BLOCK,
        )
    wrap_triton(_norms_kernel)[(n,)](partials, first_chunk, n, result, PARTIALS_BLOCK=_PARTIALS_BLOCK)
    return result


@triton_op("torchlars_triton::scale_gradients_", mutates_args={"grads"})
def _scale_gradients_(
    params: list[Tensor],
    grads: list[Tensor],
    tables: Tensor,
    num_chunks: int,
    ratios: Tensor,
    weight_decay_tensor: Tensor | None,
    weight_decay: float,
) -> None:
    numels, _, chunk_tensor, chunk_index, addresses = _table_views(tables, len(params), num_chunks)
    if num_chunks:
        wrap_triton(_scale_gradients_kernel)[(num_chunks,)](
            numels, chunk_tensor, chunk_index, addresses, len(params), params[0], ratios,
            tables if weight_decay_tensor is None else weight_decay_tensor, weight_decay,
            WEIGHT_DECAY_IS_TENSOR=weight_decay_tensor is not None, BLOCK=BLOCK,
        )


@triton_op("torchlars_triton::lars_sgd_", mutates_args={"params", "momentum_buffers"})
def _lars_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    tables: Tensor,
    num_chunks: int,
    ratios: Tensor,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr_tensor: Tensor | None,
    lr: float,
    weight_decay: float,
    sign: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first_step: bool,
) -> None:
    numels, _, chunk_tensor, chunk_index, addresses = _table_views(tables, len(params), num_chunks)
    if num_chunks:
        wrap_triton(_lars_sgd_kernel)[(num_chunks,)](
            numels, chunk_tensor, chunk_index, addresses, len(params), params[0], ratios,
            tables if grad_scale is None else grad_scale,
            tables if found_inf is None else found_inf,
            tables if lr_tensor is None else lr_tensor,
            lr, weight_decay, sign, momentum, dampening,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            LR_IS_TENSOR=lr_tensor is not None, HAS_MOMENTUM=bool(momentum_buffers),
            FIRST_STEP=first_step, NESTEROV=nesterov, BLOCK=BLOCK,
        )


def _table_views(tables: Tensor, n: int, num_chunks: int) -> tuple[Tensor, ...]:
    """``Tables``' views of its storage, as the operators (which take the storage) see them."""
    return tables.split([n, n + 1, num_chunks, num_chunks, tables.numel() - 2 * n - 1 - 2 * num_chunks])


# ---------------------------------------------------------------------------------------
# Launchers: what torchlars._functional calls, one (device, dtype) bucket at a time.


def norms(
    params: list[Tensor],
    grads: list[Tensor],
    tables: Tables,
    *,
    grad_scale: Tensor | None = None,
    weight_decay: float | Tensor = 0.0,
    sign: float = 1.0,
    decayed: bool = False,
) -> tuple[Tensor, Tensor]:
    """``||w||`` and ``||g'||`` per tensor (fp32), ``g' = sign * g / grad_scale`` (``+ wd * w`` if ``decayed``)."""
    weight_decay_tensor = weight_decay if isinstance(weight_decay, Tensor) else None
    result = torch.ops.torchlars_triton.norms(
        params, grads, tables.storage, tables.num_chunks, grad_scale, weight_decay_tensor,
        0.0 if weight_decay_tensor is not None else float(weight_decay), sign, decayed,
    )
    return result[0], result[1]


def scale_gradients_(
    params: list[Tensor], grads: list[Tensor], settings: LARSSettings, *, weight_decay: float | Tensor,
    lr: float | Tensor
) -> Tensor:
    r""":math:`g \leftarrow (g + \lambda w) \cdot r` for one device and dtype, in 3 kernels and the ratio's
    few tensor ops; returns the fp32 ratios it used."""
    weight_decay_tensor = weight_decay if isinstance(weight_decay, Tensor) else None
    return torch.ops.torchlars_triton.scale_gradients_step_(
        params, grads, lr_tensor(lr), weight_decay_tensor,
        0.0 if weight_decay_tensor is not None else float(weight_decay), settings.eps, settings.trust_coef,
        settings.clip, settings.kind,
    )


@torch.library.custom_op("torchlars_triton::scale_gradients_step_", mutates_args=("grads",))
def _scale_gradients_step_(
    params: list[Tensor],
    grads: list[Tensor],
    lr: Tensor,
    weight_decay_tensor: Tensor | None,
    weight_decay: float,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str,
) -> Tensor:
    """The whole gradient scaling as one operator, which a compiled step calls as it is: its
    tables are found by the tensors' data pointers, which only a running step has. Returns the
    ratios it used."""
    wd = weight_decay if weight_decay_tensor is None else weight_decay_tensor
    tables = tables_for(params, grads)
    param_norms, grad_norms = norms(params, grads, tables, weight_decay=wd, decayed=variant == "decayed")
    settings = LARSSettings(eps=eps, trust_coef=trust_coef, clip=clip, kind=variant)
    ratios = trust_ratio(param_norms, grad_norms, settings, weight_decay=wd, lr=_host_lr(lr, params[0]))
    torch.ops.torchlars_triton.scale_gradients_(
        params, grads, tables.storage, tables.num_chunks, ratios, weight_decay_tensor, weight_decay
    )
    return ratios


@_scale_gradients_step_.register_fake
def _(params, grads, lr, weight_decay_tensor, weight_decay, eps, trust_coef, clip, variant) -> Tensor:
    return _ratios_like(params)


def _ratios_like(params: list[Tensor]) -> Tensor:
    """What the operators return: one fp32 ratio per tensor, on the tensors' device."""
    return torch.empty(len(params), dtype=torch.float32, device=params[0].device)


def _host_lr(lr: Tensor, like: Tensor) -> float | Tensor:
    """A CPU ``lr`` for a GPU step as a number, read on the host (no device sync), as torch's fused
    SGD reads it; an ``lr`` on the step's device as it is."""
    return lr if lr.device == like.device else float(lr)


def lars_sgd_(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], settings: LARSSettings,
    sgd: MomentumSGD, *, first_step: bool, grad_scale: Tensor | None, found_inf: Tensor | None
) -> list[tuple[list[Tensor], Tensor]]:
    """One LARS-momentum step of one device and dtype (the implementation "triton" of
    :func:`torchlars._dispatch.lars_sgd`, with its arguments): the norms (2 kernels), the ratio's
    tensor ops and one update kernel. ``grads`` are left as they are. Returns the parameters and
    the fp32 ratios."""
    ratios = torch.ops.torchlars_triton.lars_sgd_step_(
        params, grads, momentum_buffers, lr_tensor(sgd.lr), grad_scale, found_inf, float(sgd.weight_decay),
        float(sgd.momentum), float(sgd.dampening), sgd.nesterov, sgd.maximize, first_step, settings.eps,
        settings.trust_coef, settings.clip, settings.kind,
    )
    return [(params, ratios)]


@torch.library.custom_op("torchlars_triton::lars_sgd_step_", mutates_args=("params", "momentum_buffers"))
def _lars_sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: Tensor,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    eps: float,
    trust_coef: float,
    clip: bool,
    variant: str,
) -> Tensor:
    """The whole step of a bucket as one operator, which a compiled step calls as it is: its
    tables are found by the tensors' data pointers, which only a running step has. Returns the
    ratios it used."""
    tables = tables_for(params, grads, *([momentum_buffers] if momentum_buffers else []))
    sign = -1.0 if maximize else 1.0
    param_norms, grad_norms = norms(
        params, grads, tables, grad_scale=grad_scale, weight_decay=weight_decay, sign=sign,
        decayed=variant == "decayed",
    )
    host_lr = _host_lr(lr, params[0])
    settings = LARSSettings(eps=eps, trust_coef=trust_coef, clip=clip, kind=variant)
    ratios = trust_ratio(param_norms, grad_norms, settings, weight_decay=weight_decay, lr=host_lr)
    lr_tensor = host_lr if isinstance(host_lr, Tensor) else None
    torch.ops.torchlars_triton.lars_sgd_(
        params, grads, momentum_buffers, tables.storage, tables.num_chunks, ratios, grad_scale, found_inf, lr_tensor,
        0.0 if lr_tensor is not None else host_lr, weight_decay, sign, momentum, dampening, nesterov, first_step,
    )
    return ratios


@_lars_sgd_step_.register_fake
def _(params, grads, momentum_buffers, lr, grad_scale, found_inf, weight_decay, momentum, dampening, nesterov,
      maximize, first_step, eps, trust_coef, clip, variant) -> Tensor:
    return _ratios_like(params)
