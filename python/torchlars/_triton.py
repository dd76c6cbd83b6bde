"""LARS and LAMB on a GPU: Triton multi-tensor kernels, three launches per (device, dtype).

Imported only where ``torchlars._dispatch`` sends tensors here (CUDA and ROCm tensors with
triton installed; CPU tensors with ``TRITON_INTERPRET=1`` and ``TORCHLARS_TRITON_ON_CPU=1``,
which run the very same kernels through Triton's interpreter), so ``import torchlars`` never
imports triton.

Every kernel works on a whole list of tensors of one device and dtype: one program per chunk of
``BLOCK`` elements of one tensor, found through two tables, as Triton's grouped-GEMM tutorial
finds its matrices:

- the chunk table (:class:`ChunkTable`) depends only on the tensors' sizes: each tensor's number
  of elements and first chunk, and for each chunk its tensor and its index in that tensor. It is
  built once per list of sizes and never changes;
- the address table (:class:`Addresses`) holds the tensors' addresses, one row per list stepped
  together (parameters, gradients, buffers...). It is refreshed, one small upload from a pinned
  buffer it owns, only when an address changed (gradients reallocated by ``zero_grad()``).

A step of a bucket is three launches: per-chunk partial sums of squares; one program per tensor
that adds its chunks' sums in a fixed order (no atomics: the same inputs give the same bits) and
computes the trust ratio from the two norms, for every variant; then the update (or the
gradient scaling). LAMB's pass 1 updates the moments while it sums, its pass 2 writes the
weights. Where every address is 16-byte aligned (the caching allocator's always are), the
kernels take an ``ALIGNED`` specialisation whose pointers Triton can prove aligned, so whole
chunks load and store 16 bytes at a time.

A step is one opaque custom operator per bucket (namespace ``torchlars_triton``:
``scale_gradients_step_``, ``lars_sgd_step_``, ``lamb_step_``, ``scale_update_step_``), which
launches the kernels and which a compiled step calls as it is: the tables are found by the
tensors' data pointers, which only a running step has, so they cannot be traced.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor
import triton
import triton.language as tl

from torchlars._functional import LAMBSettings, LARSSettings, MomentumSGD

__all__ = [
    "DTYPES",
    "Addresses",
    "ChunkTable",
    "lamb_",
    "lars_sgd_",
    "scale_gradients_",
    "scale_update_",
    "steps",
    "tables_for",
]

# What the kernels step: the arithmetic is done in fp32, as in ATen's fused optimizers.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per program: large enough that a program's fixed cost (loading its table entries)
# is small, small enough that a 100-element bias does not waste most of a program.
BLOCK = 2048
# Warps per program of the element-wise kernels: 8 elements per thread, two 16-byte accesses per
# stream in fp32; chosen by ptxas's register counts (tests/test_triton_compile.py), no spills.
NUM_WARPS = 8
# Chunk partial sums one program of the ratio stage adds per iteration.
PARTIALS_BLOCK = 128
# The alignment the ALIGNED specialisation proves to Triton.
ALIGNMENT = 16

# ---------------------------------------------------------------------------------------
# Tables


class ChunkTable:
    """Which tensor and which of its chunks each program steps, for one list of sizes: int64 views of
    one device tensor, ``numels[i]``, ``first_chunk[i]`` (chunks ``first_chunk[i]`` to
    ``first_chunk[i + 1]`` are tensor ``i``'s), ``chunk_tensor[c]`` and ``chunk_index[c]``."""

    def __init__(self, numels: tuple[int, ...], device: torch.device) -> None:
        global chunk_tables_built
        sizes = torch.tensor(numels, dtype=torch.int64)
        chunks = (sizes + BLOCK - 1) // BLOCK
        first_chunk = torch.cat([torch.zeros(1, dtype=torch.int64), chunks.cumsum(0)])
        self.num_tensors, self.num_chunks = len(numels), int(first_chunk[-1])
        chunk_tensor = torch.repeat_interleave(torch.arange(len(numels)), chunks)
        chunk_index = torch.arange(self.num_chunks) - first_chunk[chunk_tensor]
        host = torch.cat([sizes, first_chunk, chunk_tensor, chunk_index])
        if device.type != "cpu":
            # Pinned, so that the copy is asynchronous (no host sync); kept alive while it may run.
            host = host.pin_memory()
        self._host = host
        self.storage = host.to(device, non_blocking=True)
        n, c = self.num_tensors, self.num_chunks
        self.numels, self.first_chunk, self.chunk_tensor, self.chunk_index = self.storage.split([n, n + 1, c, c])
        chunk_tables_built += 1


class Addresses:
    """The addresses of the lists of tensors stepped together, one row per list, on the device:
    what changes when ``zero_grad()`` lets the gradients be reallocated. Written into a pinned host
    buffer this object owns and uploaded asynchronously, only when an address changed."""

    def __init__(self, num_lists: int, num_tensors: int, device: torch.device) -> None:
        self.device = device
        self.table = torch.empty(num_lists * num_tensors, dtype=torch.int64, device=device)
        on_host = device.type == "cpu"
        self.host = self.table if on_host else torch.empty_like(self.table, device="cpu", pin_memory=True)
        self.pointers: tuple[int, ...] | None = None
        self.aligned = False
        self._uploaded: torch.cuda.Event | None = None

    def refresh(self, pointers: tuple[int, ...]) -> None:
        global address_uploads
        if pointers == self.pointers:
            return  # nothing uploaded: a step can be captured in a CUDA graph
        if self.device.type != "cpu":
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "torchlars: the tensors of a Triton step moved during CUDA graph capture; run a step with "
                    "the same parameters, gradients and buffers before capturing it"
                )
            if self._uploaded is not None and not self._uploaded.query():
                # The last upload may still read the buffer: take a new one rather than wait.
                self.host = torch.empty_like(self.host, pin_memory=True)
        self.host.copy_(torch.tensor(pointers, dtype=torch.int64))
        if self.device.type != "cpu":
            self.table.copy_(self.host, non_blocking=True)
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()
        self.pointers = pointers
        self.aligned = functools.reduce(operator.or_, pointers) % ALIGNMENT == 0
        address_uploads += 1


# Chunk tables by (device, numels); address tables by (job, device, dtype, numels, the parameters'
# addresses, number of lists): two optimizers over different parameters never share one (a CUDA
# graph reads the table it was captured with), and one optimizer's gradients may move freely.
_CHUNK_TABLES: OrderedDict[tuple, ChunkTable] = OrderedDict()
_ADDRESSES: OrderedDict[tuple, Addresses] = OrderedDict()
_MAX_TABLES = 64
# What the kernels and tables cost, counted: read by tests/kernel_count.py, the tests and the benchmarks.
chunk_tables_built = 0
address_uploads = 0
kernel_launches = 0


def tables_for(*tensor_lists: list[Tensor], job: str = "") -> tuple[ChunkTable, Addresses]:
    """The tables of ``tensor_lists`` (lists of equal length, parameters first, tensor ``i`` of each
    of the same size), their addresses refreshed. Nothing is built or uploaded while the sizes and
    the addresses are those of the last call for this ``job`` (each entry point has its own address
    table, so that two jobs on the same parameters in one step do not overwrite each other's)."""
    params = tensor_lists[0]
    device = params[0].device
    numels = tuple(tensor.numel() for tensor in params)
    pointers = tuple(tensor.data_ptr() for tensors in tensor_lists for tensor in tensors)
    chunks = _cached(_CHUNK_TABLES, (device, numels), lambda: ChunkTable(numels, device))
    key = (job, device, params[0].dtype, numels, pointers[: len(params)], len(tensor_lists))
    addresses = _cached(_ADDRESSES, key, lambda: Addresses(len(tensor_lists), len(params), device))
    addresses.refresh(pointers)
    return chunks, addresses


def _cached(cache: OrderedDict, key: tuple, build):
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        if len(cache) > _MAX_TABLES:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


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
# Kernel building blocks


@triton.jit
def _chunk(numels, chunk_tensor, chunk_index, BLOCK: tl.constexpr):
    """This program's tensor, its chunk's first element and how many elements that tensor has."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensor + chunk)
    return tensor, tl.load(chunk_index + chunk) * BLOCK, tl.load(numels + tensor)


@triton.jit
def _tensor(addresses, index, like, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """Entry ``index`` of the address table as a pointer of ``like``'s type. ``ALIGNED``: written as
    ``like`` (which Triton knows 16-byte aligned) plus a multiple of 16 bytes, so that Triton can
    prove every chunk aligned and load 16 bytes at a time."""
    address = tl.load(addresses + index)
    if ALIGNED:
        return like + (address - like.to(tl.int64)) // 16 * VEC
    else:
        return address.to(tl.pointer_type(like.dtype.element_ty))


@triton.jit
def _load(pointer, offsets, numel, MASKED: tl.constexpr):
    """fp32 values at ``offsets``; 0 beyond ``numel`` when ``MASKED`` (a chunk that is not whole)."""
    if MASKED:
        return tl.load(pointer + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
    else:
        return tl.load(pointer + offsets).to(tl.float32)


@triton.jit
def _store(pointer, offsets, numel, value, MASKED: tl.constexpr):
    if MASKED:
        tl.store(pointer + offsets, value.to(pointer.dtype.element_ty), mask=offsets < numel)
    else:
        tl.store(pointer + offsets, value.to(pointer.dtype.element_ty))


@triton.jit
def _scalar(value, pointer, IS_TENSOR: tl.constexpr):
    """A float option given as a number, or as a one-element tensor read on the device."""
    if IS_TENSOR:
        return tl.load(pointer).to(tl.float32)
    else:
        return value


@triton.jit
def _whole_chunk(start, numel, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Whether this chunk takes the unmasked, vectorised body: aligned tensors' whole chunks."""
    if ALIGNED:
        return start + BLOCK <= numel
    else:
        return False


@triton.jit
def _skipped(found_inf, HAS_FOUND_INF: tl.constexpr):
    """GradScaler's verdict, read on the device: an overflowing step writes nothing."""
    if HAS_FOUND_INF:
        return tl.load(found_inf) != 0
    else:
        return False


# ---------------------------------------------------------------------------------------
# Stage 1 of LARS: per-chunk sums of squares of w and g' (g' = sign * g / grad_scale, + wd * w
# for the "decayed" ratio)


@triton.jit
def _lars_chunk_sums(param, grad, offsets, numel, scale, weight_decay, sign,
                     HAS_GRAD_SCALE: tl.constexpr, DECAYED: tl.constexpr, MASKED: tl.constexpr):
    w = _load(param, offsets, numel, MASKED)
    g = _load(grad, offsets, numel, MASKED) * sign
    if HAS_GRAD_SCALE:
        g = tl.math.div_rn(g, scale)
    if DECAYED:
        g = g + weight_decay * w
    return tl.sum(w * w, axis=0), tl.sum(g * g, axis=0)


@triton.jit
def _lars_sums_kernel(
    numels, chunk_tensor, chunk_index, addresses, num_tensors, like, partials,
    grad_scale, weight_decay_tensor, weight_decay, sign,
    HAS_GRAD_SCALE: tl.constexpr, WEIGHT_DECAY_IS_TENSOR: tl.constexpr, DECAYED: tl.constexpr,
    ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    tensor, start, numel = _chunk(numels, chunk_tensor, chunk_index, BLOCK)
    param = _tensor(addresses, tensor, like, ALIGNED, VEC)
    grad = _tensor(addresses, num_tensors + tensor, like, ALIGNED, VEC)
    offsets = start + tl.arange(0, BLOCK)
    scale = 1.0
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale)
    wd = _scalar(weight_decay, weight_decay_tensor, WEIGHT_DECAY_IS_TENSOR)
    if _whole_chunk(start, numel, ALIGNED, BLOCK):
        param_sum, grad_sum = _lars_chunk_sums(param, grad, offsets, numel, scale, wd, sign, HAS_GRAD_SCALE, DECAYED,
                                               False)
    else:
        param_sum, grad_sum = _lars_chunk_sums(param, grad, offsets, numel, scale, wd, sign, HAS_GRAD_SCALE, DECAYED,
                                               True)
    chunk = tl.program_id(0)
    tl.store(partials + 2 * chunk, param_sum)
    tl.store(partials + 2 * chunk + 1, grad_sum)


# ---------------------------------------------------------------------------------------
# Stage 2 (LARS and LAMB): per tensor, the two norms and the trust ratio


@triton.jit
def _trust_ratio_kernel(
    partials, first_chunk, ratios, lr_tensor, lr, weight_decay_tensor, weight_decay, eps, trust_coef,
    LR_IS_TENSOR: tl.constexpr, WEIGHT_DECAY_IS_TENSOR: tl.constexpr, PAPER: tl.constexpr, CLIP: tl.constexpr,
    ADAPT: tl.constexpr, PARTIALS_BLOCK: tl.constexpr,
):
    """Program ``i``: tensor ``i``'s chunk sums added in a fixed order, the norms ``||w||`` and ``||d||``
    (``d`` the gradient, the decayed gradient or LAMB's update), then the ratio of
    ``torchlars._functional.trust_ratio``: ``trust_coef * ||w|| / (||d|| [+ wd * ||w||] + eps)``, 1
    unless both norms are > 0, ``min(r / lr, 1)`` with ``CLIP``; 1 for every tensor unless ``ADAPT``."""
    tensor = tl.program_id(0)
    if ADAPT:
        begin = tl.load(first_chunk + tensor)
        end = tl.load(first_chunk + tensor + 1)
        param_sum = tl.zeros([PARTIALS_BLOCK], dtype=tl.float32)
        other_sum = tl.zeros([PARTIALS_BLOCK], dtype=tl.float32)
        for start in range(begin, end, PARTIALS_BLOCK):
            chunks = start + tl.arange(0, PARTIALS_BLOCK)
            mask = chunks < end
            param_sum += tl.load(partials + 2 * chunks, mask=mask, other=0.0)
            other_sum += tl.load(partials + 2 * chunks + 1, mask=mask, other=0.0)
        param_norm = tl.sqrt_rn(tl.sum(param_sum, axis=0))
        other_norm = tl.sqrt_rn(tl.sum(other_sum, axis=0))
        denominator = other_norm
        if PAPER:
            denominator = other_norm + _scalar(weight_decay, weight_decay_tensor, WEIGHT_DECAY_IS_TENSOR) * param_norm
        ratio = tl.math.div_rn(trust_coef * param_norm, denominator + eps)
        ratio = tl.where((param_norm > 0) & (other_norm > 0), ratio, 1.0)
        if CLIP:
            # NaN stays NaN, as torch.clamp keeps it: a broken step shows in its ratio.
            ratio = tl.minimum(tl.math.div_rn(ratio, _scalar(lr, lr_tensor, LR_IS_TENSOR)), 1.0, tl.PropagateNan.ALL)
        tl.store(ratios + tensor, ratio)
    else:
        tl.store(ratios + tensor, 1.0)


# ---------------------------------------------------------------------------------------
# Stage 3 of LARS: the gradient scaling (any base), or the whole LARS-momentum SGD update


@triton.jit
def _scale_gradients_chunk(param, grad, offsets, numel, ratio, weight_decay, MASKED: tl.constexpr):
    w = _load(param, offsets, numel, MASKED)
    g = _load(grad, offsets, numel, MASKED)
    _store(grad, offsets, numel, (g + weight_decay * w) * ratio, MASKED)


@triton.jit
def _scale_gradients_kernel(
    numels, chunk_tensor, chunk_index, addresses, num_tensors, like, ratios,
    weight_decay_tensor, weight_decay,
    WEIGHT_DECAY_IS_TENSOR: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    """``g <- (g + wd * w) * r``."""
    tensor, start, numel = _chunk(numels, chunk_tensor, chunk_index, BLOCK)
    param = _tensor(addresses, tensor, like, ALIGNED, VEC)
    grad = _tensor(addresses, num_tensors + tensor, like, ALIGNED, VEC)
    offsets = start + tl.arange(0, BLOCK)
    ratio = tl.load(ratios + tensor)
    wd = _scalar(weight_decay, weight_decay_tensor, WEIGHT_DECAY_IS_TENSOR)
    if _whole_chunk(start, numel, ALIGNED, BLOCK):
        _scale_gradients_chunk(param, grad, offsets, numel, ratio, wd, False)
    else:
        _scale_gradients_chunk(param, grad, offsets, numel, ratio, wd, True)


@triton.jit
def _lars_sgd_chunk(
    param, grad, buffer, offsets, numel, skipped, ratio, lr, weight_decay, sign, scale, momentum, dampening,
    HAS_GRAD_SCALE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
    MASKED: tl.constexpr, BLOCK: tl.constexpr,
):
    if skipped:
        if HAS_MOMENTUM and FIRST_STEP:
            # A skipped first step leaves zeros, not uninitialised memory, in the new buffer.
            _store(buffer, offsets, numel, tl.zeros([BLOCK], dtype=tl.float32), MASKED)
    else:
        w = _load(param, offsets, numel, MASKED)
        g = _load(grad, offsets, numel, MASKED) * sign
        if HAS_GRAD_SCALE:
            g = tl.math.div_rn(g, scale)
        update = (g + weight_decay * w) * ratio
        if HAS_MOMENTUM:
            if FIRST_STEP:
                b = update
            else:
                b = _load(buffer, offsets, numel, MASKED) * momentum + (1.0 - dampening) * update
            _store(buffer, offsets, numel, b, MASKED)
            if NESTEROV:
                update = update + momentum * b
            else:
                update = b
        _store(param, offsets, numel, w - lr * update, MASKED)


@triton.jit
def _lars_sgd_kernel(
    numels, chunk_tensor, chunk_index, addresses, num_tensors, like, ratios,
    grad_scale, found_inf, lr_tensor, lr, weight_decay_tensor, weight_decay, sign, momentum, dampening,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
    WEIGHT_DECAY_IS_TENSOR: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    """One pass over w, g and the buffer: the update of ``torchlars._dispatch.lars_sgd``."""
    tensor, start, numel = _chunk(numels, chunk_tensor, chunk_index, BLOCK)
    param = _tensor(addresses, tensor, like, ALIGNED, VEC)
    grad = _tensor(addresses, num_tensors + tensor, like, ALIGNED, VEC)
    buffer = param
    if HAS_MOMENTUM:
        buffer = _tensor(addresses, 2 * num_tensors + tensor, like, ALIGNED, VEC)
    offsets = start + tl.arange(0, BLOCK)
    skipped = _skipped(found_inf, HAS_FOUND_INF)
    scale = 1.0
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale)
    ratio = tl.load(ratios + tensor)
    step_lr = _scalar(lr, lr_tensor, LR_IS_TENSOR)
    wd = _scalar(weight_decay, weight_decay_tensor, WEIGHT_DECAY_IS_TENSOR)
    if _whole_chunk(start, numel, ALIGNED, BLOCK):
        _lars_sgd_chunk(param, grad, buffer, offsets, numel, skipped, ratio, step_lr, wd, sign, scale,
                        momentum, dampening, HAS_GRAD_SCALE, HAS_MOMENTUM, FIRST_STEP, NESTEROV, False, BLOCK)
    else:
        _lars_sgd_chunk(param, grad, buffer, offsets, numel, skipped, ratio, step_lr, wd, sign, scale,
                        momentum, dampening, HAS_GRAD_SCALE, HAS_MOMENTUM, FIRST_STEP, NESTEROV, True, BLOCK)


# ---------------------------------------------------------------------------------------
# LAMB: pass 1 updates m and v and sums ||w||^2 and ||u||^2 per chunk; pass 2 recomputes u and
# writes w. u = (m / bc1) / (sqrt(v / bc2) + eps) + wd * w, bc = 1 - beta^step.


@triton.jit
def _bias_correction(log_beta, step):
    """``1 - beta^step`` as ``-expm1(step * ln(beta))``: in fp32, ``1 - exp(x)`` would lose most digits
    where ``beta^step`` is near 1 (``beta2 = 0.999``, the first steps), so small ``|x|`` takes the series."""
    x = step * log_beta
    series = x * (1 + x / 2 * (1 + x / 3 * (1 + x / 4 * (1 + x / 5 * (1 + x / 6 * (1 + x / 7 * (1 + x / 8)))))))
    return -tl.where(x > -0.5, series, tl.exp(x) - 1.0)


@triton.jit
def _lamb_direction(w, m, v, step, log_beta1, log_beta2, eps, weight_decay, BIAS_CORRECTION: tl.constexpr):
    """LAMB's u from the moments; the bias corrections from the tensor's step count."""
    if BIAS_CORRECTION:
        m = tl.math.div_rn(m, _bias_correction(log_beta1, step))
        v = tl.math.div_rn(v, _bias_correction(log_beta2, step))
    return tl.math.div_rn(m, tl.sqrt_rn(v) + eps) + weight_decay * w


@triton.jit
def _lamb_moments_chunk(
    param, grad, exp_avg, exp_avg_sq, offsets, numel, skipped, step, scale, sign, beta1, beta2, log_beta1, log_beta2,
    eps, weight_decay, HAS_GRAD_SCALE: tl.constexpr, BIAS_CORRECTION: tl.constexpr, MASKED: tl.constexpr,
):
    w = _load(param, offsets, numel, MASKED)
    g = _load(grad, offsets, numel, MASKED) * sign
    if HAS_GRAD_SCALE:
        g = tl.math.div_rn(g, scale)
    m = beta1 * _load(exp_avg, offsets, numel, MASKED) + (1.0 - beta1) * g
    v = beta2 * _load(exp_avg_sq, offsets, numel, MASKED) + (1.0 - beta2) * g * g
    if not skipped:
        _store(exp_avg, offsets, numel, m, MASKED)
        _store(exp_avg_sq, offsets, numel, v, MASKED)
    # The moments as stored: pass 2 reads them back, and the ratio belongs to the step it scales.
    m = m.to(exp_avg.dtype.element_ty).to(tl.float32)
    v = v.to(exp_avg.dtype.element_ty).to(tl.float32)
    u = _lamb_direction(w, m, v, step, log_beta1, log_beta2, eps, weight_decay, BIAS_CORRECTION)
    if MASKED:
        u = tl.where(offsets < numel, u, 0.0)
    return tl.sum(w * w, axis=0), tl.sum(u * u, axis=0)


@triton.jit
def _lamb_moments_kernel(
    numels, chunk_tensor, chunk_index, addresses, num_tensors, like, partials,
    grad_scale, found_inf, sign, beta1, beta2, log_beta1, log_beta2, eps, weight_decay,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    """LAMB pass 1: m and v updated (unless GradScaler skips the step), ``||w||^2`` and ``||u||^2`` per chunk."""
    tensor, start, numel = _chunk(numels, chunk_tensor, chunk_index, BLOCK)
    param = _tensor(addresses, tensor, like, ALIGNED, VEC)
    grad = _tensor(addresses, num_tensors + tensor, like, ALIGNED, VEC)
    exp_avg = _tensor(addresses, 2 * num_tensors + tensor, like, ALIGNED, VEC)
    exp_avg_sq = _tensor(addresses, 3 * num_tensors + tensor, like, ALIGNED, VEC)
    step = tl.load(tl.load(addresses + 4 * num_tensors + tensor).to(tl.pointer_type(tl.float32)))
    offsets = start + tl.arange(0, BLOCK)
    skipped = _skipped(found_inf, HAS_FOUND_INF)
    scale = 1.0
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale)
    if _whole_chunk(start, numel, ALIGNED, BLOCK):
        param_sum, update_sum = _lamb_moments_chunk(
            param, grad, exp_avg, exp_avg_sq, offsets, numel, skipped, step, scale, sign, beta1, beta2, log_beta1,
            log_beta2, eps, weight_decay, HAS_GRAD_SCALE, BIAS_CORRECTION, False)
    else:
        param_sum, update_sum = _lamb_moments_chunk(
            param, grad, exp_avg, exp_avg_sq, offsets, numel, skipped, step, scale, sign, beta1, beta2, log_beta1,
            log_beta2, eps, weight_decay, HAS_GRAD_SCALE, BIAS_CORRECTION, True)
    chunk = tl.program_id(0)
    tl.store(partials + 2 * chunk, param_sum)
    tl.store(partials + 2 * chunk + 1, update_sum)


@triton.jit
def _lamb_update_chunk(param, exp_avg, exp_avg_sq, offsets, numel, step, ratio, lr, log_beta1, log_beta2, eps,
                       weight_decay, BIAS_CORRECTION: tl.constexpr, MASKED: tl.constexpr):
    w = _load(param, offsets, numel, MASKED)
    m = _load(exp_avg, offsets, numel, MASKED)
    v = _load(exp_avg_sq, offsets, numel, MASKED)
    u = _lamb_direction(w, m, v, step, log_beta1, log_beta2, eps, weight_decay, BIAS_CORRECTION)
    _store(param, offsets, numel, w - lr * ratio * u, MASKED)


@triton.jit
def _lamb_update_kernel(
    numels, chunk_tensor, chunk_index, addresses, num_tensors, like, ratios,
    found_inf, lr_tensor, lr, log_beta1, log_beta2, eps, weight_decay,
    HAS_FOUND_INF: tl.constexpr, LR_IS_TENSOR: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    """LAMB pass 2: ``w <- w - lr * r * u``, u recomputed from the moments pass 1 wrote."""
    tensor, start, numel = _chunk(numels, chunk_tensor, chunk_index, BLOCK)
    if not _skipped(found_inf, HAS_FOUND_INF):
        param = _tensor(addresses, tensor, like, ALIGNED, VEC)
        exp_avg = _tensor(addresses, 2 * num_tensors + tensor, like, ALIGNED, VEC)
        exp_avg_sq = _tensor(addresses, 3 * num_tensors + tensor, like, ALIGNED, VEC)
        step = tl.load(tl.load(addresses + 4 * num_tensors + tensor).to(tl.pointer_type(tl.float32)))
        offsets = start + tl.arange(0, BLOCK)
        ratio = tl.load(ratios + tensor)
        step_lr = _scalar(lr, lr_tensor, LR_IS_TENSOR)
        if _whole_chunk(start, numel, ALIGNED, BLOCK):
            _lamb_update_chunk(param, exp_avg, exp_avg_sq, offsets, numel, step, ratio, step_lr, log_beta1,
                               log_beta2, eps, weight_decay, BIAS_CORRECTION, False)
        else:
            _lamb_update_chunk(param, exp_avg, exp_avg_sq, offsets, numel, step, ratio, step_lr, log_beta1,
                               log_beta2, eps, weight_decay, BIAS_CORRECTION, True)


# ---------------------------------------------------------------------------------------
# The "update" trust ratio of LARS(any base): w <- w_before + r * (w - w_before)


@triton.jit
def _update_sums_chunk(param, before, offsets, numel, lr, MASKED: tl.constexpr):
    w = _load(param, offsets, numel, MASKED)
    w_before = _load(before, offsets, numel, MASKED)
    u = tl.math.div_rn(w - w_before, lr)
    return tl.sum(w_before * w_before, axis=0), tl.sum(u * u, axis=0)


@triton.jit
def _update_sums_kernel(
    numels, chunk_tensor, chunk_index, addresses, num_tensors, like, partials, lr_tensor, lr,
    LR_IS_TENSOR: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    """``||w_before||^2`` and ``||u||^2`` per chunk, ``u = (w - w_before) / lr`` the base's step per unit lr."""
    tensor, start, numel = _chunk(numels, chunk_tensor, chunk_index, BLOCK)
    param = _tensor(addresses, tensor, like, ALIGNED, VEC)
    before = _tensor(addresses, num_tensors + tensor, like, ALIGNED, VEC)
    offsets = start + tl.arange(0, BLOCK)
    step_lr = _scalar(lr, lr_tensor, LR_IS_TENSOR)
    if _whole_chunk(start, numel, ALIGNED, BLOCK):
        param_sum, update_sum = _update_sums_chunk(param, before, offsets, numel, step_lr, False)
    else:
        param_sum, update_sum = _update_sums_chunk(param, before, offsets, numel, step_lr, True)
    chunk = tl.program_id(0)
    tl.store(partials + 2 * chunk, param_sum)
    tl.store(partials + 2 * chunk + 1, update_sum)


@triton.jit
def _scale_update_chunk(param, before, offsets, numel, ratio, MASKED: tl.constexpr):
    w = _load(param, offsets, numel, MASKED)
    w_before = _load(before, offsets, numel, MASKED)
    _store(param, offsets, numel, w_before + ratio * (w - w_before), MASKED)


@triton.jit
def _scale_update_kernel(
    numels, chunk_tensor, chunk_index, addresses, num_tensors, like, ratios,
    ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    tensor, start, numel = _chunk(numels, chunk_tensor, chunk_index, BLOCK)
    param = _tensor(addresses, tensor, like, ALIGNED, VEC)
    before = _tensor(addresses, num_tensors + tensor, like, ALIGNED, VEC)
    offsets = start + tl.arange(0, BLOCK)
    ratio = tl.load(ratios + tensor)
    if _whole_chunk(start, numel, ALIGNED, BLOCK):
        _scale_update_chunk(param, before, offsets, numel, ratio, False)
    else:
        _scale_update_chunk(param, before, offsets, numel, ratio, True)


# The boolean specialisations of each kernel: what tests/test_triton_compile.py compiles.
KERNEL_FLAGS = {
    _lars_sums_kernel: ("HAS_GRAD_SCALE", "WEIGHT_DECAY_IS_TENSOR", "DECAYED", "ALIGNED"),
    _trust_ratio_kernel: ("LR_IS_TENSOR", "WEIGHT_DECAY_IS_TENSOR", "PAPER", "CLIP", "ADAPT"),
    _scale_gradients_kernel: ("WEIGHT_DECAY_IS_TENSOR", "ALIGNED"),
    _lars_sgd_kernel: ("HAS_GRAD_SCALE", "HAS_FOUND_INF", "LR_IS_TENSOR", "WEIGHT_DECAY_IS_TENSOR", "HAS_MOMENTUM",
                       "FIRST_STEP", "NESTEROV", "ALIGNED"),
    _lamb_moments_kernel: ("HAS_GRAD_SCALE", "HAS_FOUND_INF", "BIAS_CORRECTION", "ALIGNED"),
    _lamb_update_kernel: ("HAS_FOUND_INF", "LR_IS_TENSOR", "BIAS_CORRECTION", "ALIGNED"),
    _update_sums_kernel: ("LR_IS_TENSOR", "ALIGNED"),
    _scale_update_kernel: ("ALIGNED",),
}


def _launch(kernel, grid: int, *args, **constexprs) -> None:
    """Launch ``kernel`` on ``grid`` programs; element-wise kernels get their tile constants."""
    global kernel_launches
    if "ALIGNED" in constexprs:
        constexprs.update(VEC=ALIGNMENT // args[5].element_size(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    if grid:
        kernel[(grid,)](*args, **constexprs)
        kernel_launches += 1


def _log(beta: float) -> float:
    """ln(beta), for the bias corrections on the device; beta = 0 gives beta ** step = 0."""
    return math.log(beta) if beta > 0 else float("-inf")


# ---------------------------------------------------------------------------------------
# Scalars: a tensor option read where the kernels can read it


class _Scalar(NamedTuple):
    """A float option as the kernels take it, two arguments side by side (``lr_tensor, lr``): a
    one-element tensor on the step's device, read there, or a number (``tensor`` None)."""

    tensor: Tensor | None
    number: float

    @property
    def is_tensor(self) -> bool:
        return self.tensor is not None


def _scalar_option(tensor: Tensor | None, number: float, device: torch.device) -> _Scalar:
    """An option of a step operator as the kernels take it: a tensor on the step's device, which the
    kernels read there; a number, or a CPU tensor of a GPU step read on the host (no device sync, as
    torch's fused SGD reads a CPU lr)."""
    if tensor is None:
        return _Scalar(None, number)
    if tensor.device == device:
        return _Scalar(tensor, 0.0)
    return _Scalar(None, float(tensor))


def _operator_scalar(value: float | Tensor) -> tuple[Tensor | None, float]:
    """An option as the step operators' schemas take it: ``(tensor, 0.0)`` or ``(None, number)``."""
    return (value, 0.0) if isinstance(value, Tensor) else (None, float(value))


def _device_of(tensors: list[Tensor]) -> torch.device:
    """The device a bucket steps on (a function, so that a test can pretend it is a GPU)."""
    return tensors[0].device


def _check_scalars(params: list[Tensor], **options: float | Tensor | None) -> None:
    """Refuse, where they enter, tensor options that no kernel of this step can read and the host
    cannot read without a sync: those on another device than the parameters, but the CPU."""
    device = _device_of(params)
    for name, value in options.items():
        if not isinstance(value, Tensor):
            continue
        if value.numel() != 1:
            raise ValueError(f"torchlars: `{name}` must be a number or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(
                f"torchlars: `{name}` is a tensor on {value.device} but the parameters are on {device}; "
                f"put it on {device} or on the CPU"
            )


def _check_on_device(params: list[Tensor], **tensors: Tensor | None) -> None:
    """GradScaler's tensors, which the kernels read: on the parameters' device."""
    device = _device_of(params)
    for name, value in tensors.items():
        if value is not None and value.device != device:
            raise ValueError(f"torchlars: `{name}` must be on {device}, the parameters' device, got {value.device}")


# ---------------------------------------------------------------------------------------
# Launching a step's kernels. The step operators below launch them directly: an operator per
# launch would cost its dispatch and the version counters of every mutated tensor again (about
# 0.3 ms for ResNet-50's 161 tensors on the host), for nothing that the opaque step operator does
# not already declare.


class _RatioOptions(NamedTuple):
    """What ``_trust_ratio_kernel`` makes of the norms: ``trust_coef * ||w|| / (||d|| [+ wd * ||w||
    with paper] + eps)``, ``min(r / lr, 1)`` with ``clip``; 1 for every tensor unless ``adapt``."""

    eps: float
    trust_coef: float
    clip: bool
    lr: _Scalar = _Scalar(None, 1.0)
    weight_decay: _Scalar = _Scalar(None, 0.0)
    paper: bool = False
    adapt: bool = True


class _Bucket:
    """The tensor lists of one step as its kernels take them: the chunk and address tables, and the
    first parameter, which types the addresses as pointers."""

    def __init__(self, job: str, *tensor_lists: list[Tensor]) -> None:
        self.chunks, self.addresses = tables_for(*tensor_lists, job=job)
        self.like = tensor_lists[0][0]

    def launch_per_chunk(self, kernel, buffer: Tensor, *args, **constexprs) -> None:
        """``kernel`` on one program per chunk: the tables, ``buffer`` (the partial sums it writes or
        the ratios it reads), then ``args``."""
        chunks = self.chunks
        _launch(
            kernel, chunks.num_chunks, chunks.numels, chunks.chunk_tensor, chunks.chunk_index, self.addresses.table,
            chunks.num_tensors, self.like, buffer, *_with_placeholders(args, buffer), ALIGNED=self.addresses.aligned,
            **constexprs,
        )

    def trust_ratios(self, options: _RatioOptions, sums_kernel, *sums_args, **sums_flags) -> Tensor:
        """Stages 1 and 2, two kernels: ``sums_kernel`` (given ``sums_args`` and ``sums_flags``) writes
        each chunk's sums of squares of w and of the direction, then one program per tensor adds
        them into the two norms and the ratio. Returns the fp32 ratios, one per tensor."""
        chunks = self.chunks
        partials = torch.empty(2 * max(chunks.num_chunks, 1), dtype=torch.float32, device=chunks.storage.device)
        ratios = torch.empty(chunks.num_tensors, dtype=torch.float32, device=chunks.storage.device)
        self.launch_per_chunk(sums_kernel, partials, *sums_args, **sums_flags)
        _launch(
            _trust_ratio_kernel, chunks.num_tensors, partials, chunks.first_chunk, ratios,
            *_with_placeholders((*options.lr, *options.weight_decay), partials), options.eps, options.trust_coef,
            LR_IS_TENSOR=options.lr.is_tensor, WEIGHT_DECAY_IS_TENSOR=options.weight_decay.is_tensor,
            PAPER=options.paper, CLIP=options.clip, ADAPT=options.adapt, PARTIALS_BLOCK=PARTIALS_BLOCK,
        )
        return ratios


def _with_placeholders(args: tuple, placeholder: Tensor) -> list:
    """A kernel's arguments, every optional tensor left out (None) replaced by ``placeholder``: the
    specialisation that does not read it still needs a pointer."""
    return [placeholder if arg is None else arg for arg in args]


def _lars_trust_ratios(
    bucket: _Bucket, settings: LARSSettings, lr: _Scalar, weight_decay: _Scalar, *, grad_scale: Tensor | None,
    sign: float,
) -> Tensor:
    """LARS's ratios from ``||w||`` and ``||g'||``, ``g' = sign * g / grad_scale [+ wd * w]`` (2 kernels)."""
    return bucket.trust_ratios(
        _RatioOptions(
            settings.eps, settings.trust_coef, settings.clip, lr, weight_decay, paper=settings.kind == "paper"
        ),
        _lars_sums_kernel, grad_scale, *weight_decay, sign,
        HAS_GRAD_SCALE=grad_scale is not None, WEIGHT_DECAY_IS_TENSOR=weight_decay.is_tensor,
        DECAYED=settings.kind == "decayed",
    )


# ---------------------------------------------------------------------------------------
# Entry points: what torchlars._dispatch calls, one (device, dtype) bucket at a time. Each checks
# its arguments and calls its step operator, one opaque custom operator, which a compiled step
# calls as it is. The operators' schemas take numbers, bools and strings, not settings objects.


class _StepOperator:
    """A step of one bucket, ``implementation``, as the custom operator ``torchlars_triton::<name>``,
    which returns one fp32 ratio per parameter and writes the lists named ``mutates_args``.

    Called through the operator where a trace or a dispatch mode must see it (torch.compile,
    FakeTensorMode, tests/kernel_count.py); in plain eager code, ``implementation`` directly, the
    mutated tensors' version counters bumped in one call, as the operator would. The operator's own
    dispatch (argument checks, one version bump per tensor) costs about 0.3 ms of host time for
    ResNet-50's lists, more than the rest of the step's host work."""

    def __init__(self, name: str, implementation, mutates_args: tuple[str, ...]) -> None:
        custom_op = torch.library.custom_op(f"torchlars_triton::{name}", implementation, mutates_args=mutates_args)
        custom_op.register_fake(_ratios_like)
        self.operator = getattr(torch.ops.torchlars_triton, name)
        self.implementation = implementation
        arg_names = list(inspect.signature(implementation).parameters)
        self.mutated = tuple(arg_names.index(arg) for arg in mutates_args)

    def __call__(self, *args) -> Tensor:
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            return self.operator(*args)
        ratios = self.implementation(*args)
        torch.autograd.graph.increment_version([tensor for index in self.mutated for tensor in args[index]])
        return ratios


def _step_operator(name: str, *, mutates_args: tuple[str, ...]):
    """Make the decorated step implementation the :class:`_StepOperator` ``name``."""
    return lambda implementation: _StepOperator(name, implementation, mutates_args)


def _ratios_like(params: list[Tensor], *_other_args) -> Tensor:
    """What the operators return, for tracing: one fp32 ratio per tensor, on the tensors' device."""
    return torch.empty(len(params), dtype=torch.float32, device=params[0].device)


def scale_gradients_(
    params: list[Tensor], grads: list[Tensor], settings: LARSSettings, *, weight_decay: float | Tensor,
    lr: float | Tensor
) -> Tensor:
    r""":math:`g \leftarrow (g + \lambda w) \cdot r` for one device and dtype, in 3 kernels; returns the
    fp32 ratios it used."""
    _check_scalars(params, lr=lr, weight_decay=weight_decay)
    return _scale_gradients_step(
        params, grads, *_operator_scalar(lr), *_operator_scalar(weight_decay), settings.eps, settings.trust_coef,
        settings.clip, settings.kind,
    )


@_step_operator("scale_gradients_step_", mutates_args=("grads",))
def _scale_gradients_step(
    params: list[Tensor], grads: list[Tensor],
    lr_tensor: Tensor | None, lr: float, weight_decay_tensor: Tensor | None, weight_decay: float,
    eps: float, trust_coef: float, clip: bool, variant: str,
) -> Tensor:
    device = _device_of(params)
    lr, weight_decay = _scalar_option(lr_tensor, lr, device), _scalar_option(weight_decay_tensor, weight_decay, device)
    bucket = _Bucket("scale_gradients", params, grads)
    settings = LARSSettings(eps, trust_coef, clip, variant)
    ratios = _lars_trust_ratios(bucket, settings, lr, weight_decay, grad_scale=None, sign=1.0)
    bucket.launch_per_chunk(
        _scale_gradients_kernel, ratios, *weight_decay, WEIGHT_DECAY_IS_TENSOR=weight_decay.is_tensor
    )
    return ratios


def lars_sgd_(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], settings: LARSSettings,
    sgd: MomentumSGD, *, first_step: bool, grad_scale: Tensor | None, found_inf: Tensor | None
) -> list[tuple[list[Tensor], Tensor]]:
    """One LARS-momentum step of one device and dtype in 3 kernels (the implementation "triton" of
    :func:`torchlars._dispatch.lars_sgd`, with its arguments): the chunk sums, the norms and ratios,
    the update. ``grads`` are left as they are. Returns the parameters and the fp32 ratios."""
    _check_scalars(params, lr=sgd.lr, weight_decay=sgd.weight_decay)
    _check_on_device(params, grad_scale=grad_scale, found_inf=found_inf)
    ratios = _lars_sgd_step(
        params, grads, momentum_buffers, *_operator_scalar(sgd.lr), grad_scale, found_inf,
        *_operator_scalar(sgd.weight_decay), float(sgd.momentum), float(sgd.dampening), sgd.nesterov, sgd.maximize,
        first_step, settings.eps, settings.trust_coef, settings.clip, settings.kind,
    )
    return [(params, ratios)]


@_step_operator("lars_sgd_step_", mutates_args=("params", "momentum_buffers"))
def _lars_sgd_step(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
    lr_tensor: Tensor | None, lr: float, grad_scale: Tensor | None, found_inf: Tensor | None,
    weight_decay_tensor: Tensor | None, weight_decay: float,
    momentum: float, dampening: float, nesterov: bool, maximize: bool, first_step: bool,
    eps: float, trust_coef: float, clip: bool, variant: str,
) -> Tensor:
    device = _device_of(params)
    lr, weight_decay = _scalar_option(lr_tensor, lr, device), _scalar_option(weight_decay_tensor, weight_decay, device)
    bucket = _Bucket("lars_sgd", params, grads, *([momentum_buffers] if momentum_buffers else []))
    sign = -1.0 if maximize else 1.0
    settings = LARSSettings(eps, trust_coef, clip, variant)
    ratios = _lars_trust_ratios(bucket, settings, lr, weight_decay, grad_scale=grad_scale, sign=sign)
    bucket.launch_per_chunk(
        _lars_sgd_kernel, ratios, grad_scale, found_inf, *lr, *weight_decay, sign, momentum, dampening,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, LR_IS_TENSOR=lr.is_tensor,
        WEIGHT_DECAY_IS_TENSOR=weight_decay.is_tensor, HAS_MOMENTUM=bool(momentum_buffers), FIRST_STEP=first_step,
        NESTEROV=nesterov,
    )
    return ratios


def lamb_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], settings: LAMBSettings, *, lr: float | Tensor, grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None
) -> Tensor:
    r"""One LAMB step (You et al., 2019) of one device and dtype in 3 kernels; returns the fp32 ratios.

    ``state_steps`` are the 0-d fp32 step counts on the parameters' device, already incremented.
    ``m, v`` updated from ``g`` (negated with ``maximize``, divided by ``grad_scale``);
    ``u = (m / bc1) / (sqrt(v / bc2) + eps) + wd w``, ``bc = 1 - beta^step`` (1 without
    ``bias_correction``); ``r = trust_coef ||w|| / (||u|| + trust_eps)`` if both norms are > 0, else 1;
    ``min(r, 1)`` with ``trust_clip``; 1 unless ``adapt``; ``w <- w - lr r u``. Nothing changes when
    ``found_inf`` is non-zero. The arguments of the C++ operator ``torchlars::lamb_``.
    """
    device = _device_of(params)
    _check_scalars(params, lr=lr)
    _check_on_device(params, grad_scale=grad_scale, found_inf=found_inf)
    for step in state_steps:
        if step.device != device or step.dtype != torch.float32 or step.numel() != 1:
            raise ValueError(
                f"torchlars lamb_: `state_steps` must be one-element float32 tensors on {device} (the Triton kernels "
                f"read them there), got a {step.dtype} tensor of shape {tuple(step.shape)} on {step.device}"
            )
    return _lamb_step(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, *_operator_scalar(lr), grad_scale, found_inf,
        settings.beta1, settings.beta2, settings.eps, settings.weight_decay, settings.trust_coef, settings.trust_eps,
        settings.trust_clip, settings.adapt, settings.bias_correction, settings.maximize,
    )


@_step_operator("lamb_step_", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def _lamb_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], lr_tensor: Tensor | None, lr: float, grad_scale: Tensor | None,
    found_inf: Tensor | None, beta1: float, beta2: float, eps: float, weight_decay: float,
    trust_coef: float, trust_eps: float, trust_clip: bool, adapt: bool, bias_correction: bool, maximize: bool,
) -> Tensor:
    lr = _scalar_option(lr_tensor, lr, _device_of(params))
    bucket = _Bucket("lamb", params, grads, exp_avgs, exp_avg_sqs, state_steps)
    log_beta1, log_beta2 = _log(beta1), _log(beta2)
    # Pass 1 is the sums kernel; trust_clip is LARS's clip with lr = 1: min(r, 1).
    ratios = bucket.trust_ratios(
        _RatioOptions(trust_eps, trust_coef, trust_clip, adapt=adapt),
        _lamb_moments_kernel, grad_scale, found_inf, -1.0 if maximize else 1.0, beta1, beta2, log_beta1, log_beta2,
        eps, weight_decay,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, BIAS_CORRECTION=bias_correction,
    )
    bucket.launch_per_chunk(
        _lamb_update_kernel, ratios, found_inf, *lr, log_beta1, log_beta2, eps, weight_decay,
        HAS_FOUND_INF=found_inf is not None, LR_IS_TENSOR=lr.is_tensor, BIAS_CORRECTION=bias_correction,
    )
    return ratios


def scale_update_(
    params: list[Tensor], params_before: list[Tensor], settings: LARSSettings, *, lr: float | Tensor
) -> Tensor:
    r"""The ``trust_ratio="update"`` scaling of ``LARS(any base)`` for one device and dtype, in 3 kernels:
    :math:`w \leftarrow w_{before} + r (w - w_{before})`, ``r`` from ``||w_before||`` and the base's step
    per unit of learning rate ``||w - w_before|| / lr``. ``params_before`` is left as it is. Returns the
    fp32 ratios; the Triton twin of ``torchlars._functional.multi_tensor_lars_update_``."""
    _check_scalars(params, lr=lr)
    return _scale_update_step(
        params, params_before, *_operator_scalar(lr), settings.eps, settings.trust_coef, settings.clip
    )


@_step_operator("scale_update_step_", mutates_args=("params",))
def _scale_update_step(
    params: list[Tensor], params_before: list[Tensor], lr_tensor: Tensor | None, lr: float,
    eps: float, trust_coef: float, clip: bool,
) -> Tensor:
    lr = _scalar_option(lr_tensor, lr, _device_of(params))
    bucket = _Bucket("scale_update", params, params_before)
    ratios = bucket.trust_ratios(
        _RatioOptions(eps, trust_coef, clip, lr), _update_sums_kernel, *lr, LR_IS_TENSOR=lr.is_tensor
    )
    bucket.launch_per_chunk(_scale_update_kernel, ratios)
    return ratios
