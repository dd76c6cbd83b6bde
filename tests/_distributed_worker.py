"""What each gloo rank runs for test_distributed.py.

Every case trains the same tiny problem twice in each process: distributed (DDP, FSDP2, HSDP or
hand-placed DTensors) and as one unsharded single-process run, then compares the parameters.
They run on 4 ranks, so that both dimensions of the 2-D meshes are of size 2.
Results go to ``<out_dir>/rank<r>.json``: per case, the error (or None) and the collectives
counted during ``LARS.step()``.
"""

from __future__ import annotations

import copy
from datetime import timedelta
import faulthandler
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel

from torchlars import LARS, LARSSGD, exclude_bias_and_norm

STEPS = 4
BATCH = 8
# Large enough steps that a trust ratio from a shard's norm instead of the whole
# parameter's moves the parameters by far more than the tolerance.
LR, MOMENTUM, WEIGHT_DECAY, TRUST_COEF = 0.5, 0.9, 1e-2, 0.02
# With clip, this LR clips the first layer's trust ratio and not the second's.
CLIP_LR = 0.05
ATOL = 1e-6


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Entry point of ``torch.multiprocessing.start_processes``: run every case on this rank."""
    # If a native crash kills the rank (SIGABRT, SIGSEGV), the test's captured stderr shows
    # where every thread was.
    faulthandler.enable(all_threads=True)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=30),
    )
    torch.set_num_threads(1)
    results = {}
    for name, case in CASES.items():
        try:
            results[name] = {"error": None, "collectives": case()}
        except Exception:  # reported to the test, which fails on it
            results[name] = {"error": traceback.format_exc(), "collectives": None}
    # Written whole or not at all: a file that exists holds every case's result.
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as file:
        json.dump(results, file)
    os.replace(path + ".tmp", path)
    # No rank tears its connections down while the other may still use them; then leave
    # without the interpreter's finalisation, which gloo's threads can race with.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _model() -> nn.Module:
    # Odd sizes, so that FSDP2 shards unevenly (the 3-row weight leaves one rank a single row).
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 5, generator=generator), torch.randn(BATCH, 3, generator=generator)) for _ in range(STEPS)]


def _lars(params, clip: bool, eps: float = 1e-8) -> LARS:
    base = torch.optim.SGD(params, lr=CLIP_LR if clip else LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    return LARS(base, eps=eps, trust_coef=TRUST_COEF, clip=clip)


def _lamb(params, clip: bool, eps: float = 1e-8) -> LARS:
    """LAMB: the "update" trust ratio around AdamW."""
    base = torch.optim.AdamW(params, lr=0.05, weight_decay=WEIGHT_DECAY)
    return LARS(base, eps=eps, trust_coef=1.0, clip=clip, trust_ratio="update")


def _train(model: nn.Module, clip: bool, shard: bool, make=_lars) -> dict[str, int]:
    """Train ``model`` (this rank's half of every batch if ``shard``) and count the step's collectives."""
    optimizer = make(exclude_bias_and_norm(model, WEIGHT_DECAY), clip)
    counts: dict[str, int] = {}
    for inputs, targets in _batches():
        if shard:
            inputs = inputs.chunk(dist.get_world_size())[dist.get_rank()]
            targets = targets.chunk(dist.get_world_size())[dist.get_rank()]
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        with CommDebugMode() as comm:
            optimizer.step()
        for op, count in comm.get_comm_counts().items():
            counts[str(op)] = max(counts.get(str(op), 0), count)
    return counts


def _assert_same(distributed: list[torch.Tensor], reference: list[torch.Tensor], start: list[torch.Tensor]) -> None:
    for index, (param, expected, initial) in enumerate(zip(distributed, reference, start)):
        whole = param.full_tensor() if isinstance(param, DTensor) else param
        torch.testing.assert_close(whole, expected, atol=ATOL, rtol=0, msg=lambda m, i=index: f"parameter {i}: {m}")
        # The comparison means something only if training moved the parameter well past ATOL.
        assert (expected - initial).abs().max() > 1e3 * ATOL, f"parameter {index} barely moved"


def _compare_with_single_process(wrap, clip: bool, make=_lars) -> dict[str, int]:
    model = _model()
    reference = copy.deepcopy(model)
    start = [p.detach().clone() for p in reference.parameters()]
    _train(reference, clip, shard=False, make=make)
    distributed = wrap(model)
    counts = _train(distributed, clip, shard=True, make=make)
    _assert_same(list(distributed.parameters()), [p.detach() for p in reference.parameters()], start)
    return counts


def _fsdp2(model: nn.Module) -> nn.Module:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def fsdp2_no_clip() -> dict[str, int]:
    return _compare_with_single_process(_fsdp2, clip=False)


def fsdp2_clip() -> dict[str, int]:
    return _compare_with_single_process(_fsdp2, clip=True)


def fsdp2_lamb() -> dict[str, int]:
    return _compare_with_single_process(_fsdp2, clip=False, make=_lamb)


def ddp_no_clip() -> dict[str, int]:
    return _compare_with_single_process(DistributedDataParallel, clip=False)


def ddp_clip() -> dict[str, int]:
    return _compare_with_single_process(DistributedDataParallel, clip=True)


def zero_lars_sgd() -> dict[str, int]:
    """ZeroRedundancyOptimizer(optimizer_class=LARSSGD) under DDP: each rank steps its share of
    the parameters with LARSSGD and broadcasts it; the same as LARSSGD in one process."""
    model = _model()
    reference = copy.deepcopy(model)
    start = [p.detach().clone() for p in reference.parameters()]
    options = dict(lr=LR, momentum=MOMENTUM, trust_coef=TRUST_COEF)
    reference_optimizer = LARSSGD(exclude_bias_and_norm(reference, WEIGHT_DECAY), **options)
    distributed = DistributedDataParallel(model)
    optimizer = ZeroRedundancyOptimizer(
        exclude_bias_and_norm(distributed.module, WEIGHT_DECAY), optimizer_class=LARSSGD, **options
    )
    assert isinstance(optimizer.optim, LARSSGD)
    for inputs, targets in _batches():
        reference_optimizer.zero_grad()
        nn.functional.mse_loss(reference(inputs), targets).backward()
        reference_optimizer.step()
        rank_inputs = inputs.chunk(dist.get_world_size())[dist.get_rank()]
        rank_targets = targets.chunk(dist.get_world_size())[dist.get_rank()]
        optimizer.zero_grad()
        nn.functional.mse_loss(distributed(rank_inputs), rank_targets).backward()
        optimizer.step()
    # Each rank stepped only its share: the other rank's parameters came by broadcast.
    assert 0 < sum(len(group["params"]) for group in optimizer.optim.param_groups) < len(start)
    _assert_same(list(distributed.module.parameters()), [p.detach() for p in reference.parameters()], start)
    return {}


def _placed_run(layout: list[tuple], groups: list[dict], clip: bool) -> dict[str, int]:
    """Train hand-placed parameters with fixed random gradients, against the same unplaced.

    ``layout`` holds ``(shape, dtype, mesh or None, placements)`` per parameter (a None mesh
    means a plain tensor); ``groups`` the param groups, with parameter indices for "params".
    """
    generator = torch.Generator().manual_seed(2)
    wholes = [torch.randn(shape, generator=generator, dtype=dtype) for shape, dtype, _, _ in layout]
    grads = [[torch.randn(w.shape, generator=generator, dtype=w.dtype) for w in wholes] for _ in range(STEPS)]

    def place(tensor, mesh, placements):
        return tensor.clone() if mesh is None else distribute_tensor(tensor, mesh, placements)

    placed = [nn.Parameter(place(w, mesh, placements)) for w, (_, _, mesh, placements) in zip(wholes, layout)]
    reference = [nn.Parameter(w.clone()) for w in wholes]
    start = [w.clone() for w in wholes]  # distribute_tensor may keep ``w`` as the local tensor
    # The trust ratio does not change when both norms are scaled alike, as they are when a
    # copy is counted twice; a large eps makes that visible.
    optimizers = [
        _lars([{**group, "params": [params[i] for i in group["params"]]} for group in groups], clip, eps=0.5)
        for params in (placed, reference)
    ]
    counts: dict[str, int] = {}
    for step_grads in grads:
        for param, ref, grad, (_, _, mesh, placements) in zip(placed, reference, step_grads, layout):
            param.grad = place(grad, mesh, placements)
            ref.grad = grad.clone()
        with CommDebugMode() as comm:
            optimizers[0].step()
        optimizers[1].step()
        for op, count in comm.get_comm_counts().items():
            counts[str(op)] = max(counts.get(str(op), 0), count)
    _assert_same(placed, [p.detach() for p in reference], start)
    return counts


def dtensors_mixed() -> dict[str, int]:
    """Shard(0) (uneven, and empty on a rank), Shard(1), Replicate, fp64 and plain parameters
    in three param groups, on one mesh."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    layout = [
        ((5, 3), torch.float32, mesh, [Shard(0)]),
        ((3, 4), torch.float32, mesh, [Shard(1)]),
        ((4, 4), torch.float32, mesh, [Replicate()]),
        ((3, 3), torch.float32, None, None),
        ((6, 2), torch.float64, mesh, [Shard(0)]),
        ((4, 2), torch.float32, mesh, [Shard(0)]),
        ((4,), torch.float32, mesh, [Shard(0)]),
        ((1, 3), torch.float32, mesh, [Shard(0)]),
    ]
    groups = [
        {"params": [0, 2, 3, 4, 7], "maximize": True},  # g -> -g on the local shards too
        {"params": [1, 5], "weight_decay": 0.0, "lr": 0.3},
        {"params": [6], "weight_decay": 1e-3, "lars_exclude": True},
    ]
    counts = _placed_run(layout, groups, clip=False)
    counts_clip = _placed_run(layout, groups, clip=True)
    return {op: max(counts.get(op, 0), counts_clip.get(op, 0)) for op in {*counts, *counts_clip}}


def _two_by_two_mesh(names: tuple[str, str]) -> DeviceMesh:
    assert dist.get_world_size() == 4, "the 2-D cases run on 4 ranks: both mesh dimensions of size 2"
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=names)


def dtensors_two_meshes() -> dict[str, int]:
    """2-D meshes, both dimensions of size 2: HSDP-style (Replicate, Shard) on one, FSDP + TP
    pieces along both dimensions on another, copies along either dimension on both."""
    hsdp = _two_by_two_mesh(("replicate", "shard"))
    fsdp_tp = _two_by_two_mesh(("dp", "tp"))
    layout = [
        ((5, 3), torch.float32, hsdp, [Replicate(), Shard(0)]),
        ((3, 4), torch.float32, hsdp, [Replicate(), Replicate()]),
        ((5, 4), torch.float32, fsdp_tp, [Shard(0), Replicate()]),
        ((4, 3), torch.float32, fsdp_tp, [Replicate(), Shard(1)]),
        ((2, 3), torch.float32, fsdp_tp, [Shard(1), Shard(0)]),
        ((3, 3), torch.float32, fsdp_tp, [Replicate(), Replicate()]),
    ]
    return _placed_run(layout, [{"params": list(range(len(layout)))}], clip=False)


def _hsdp(model: nn.Module) -> nn.Module:
    mesh = _two_by_two_mesh(("replicate", "shard"))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def hsdp() -> dict[str, int]:
    """FSDP2's HSDP on a 2 x 2 mesh: parameters (Replicate(), Shard(0)), each batch over 4 ranks."""
    return _compare_with_single_process(_hsdp, clip=False)


def fsdp1_refused() -> dict[str, int]:
    """FSDP1's flat parameters, and with use_orig_params=True the views into them, are refused."""
    for use_orig_params, expected in ((False, "FlatParameter"), (True, "use_orig_params=True")):
        model = FullyShardedDataParallel(_model(), device_id=torch.device("cpu"), use_orig_params=use_orig_params)
        try:
            LARS(torch.optim.SGD(model.parameters(), lr=0.1))
        except ValueError as error:
            assert expected in str(error) and "FSDP2" in str(error), str(error)
        else:
            raise AssertionError(f"no error for FSDP1 with use_orig_params={use_orig_params}")
    return {}


def unsupported_placements() -> dict[str, int]:
    """A Partial gradient, and a gradient placed unlike its parameter, are refused by name."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    param = nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
    for grad, expected in (
        (DTensor.from_local(torch.ones(4, 2), mesh, [Partial()]), "Partial"),
        (distribute_tensor(torch.ones(4, 2), mesh, [Replicate()]), "redistribute the gradient"),
    ):
        param.grad = grad
        optimizer = _lars([torch.nn.Parameter(torch.ones(2)), param], clip=False)
        try:
            optimizer.step()
        except RuntimeError as error:
            assert "parameter 1 of param group 0" in str(error) and expected in str(error), str(error)
        else:
            raise AssertionError(f"no error for a gradient placed as {grad.placements}")
        assert torch.equal(param.full_tensor(), torch.ones(4, 2)), "the parameter changed"
    return {}


CASES = {
    case.__name__: case
    for case in (
        fsdp2_no_clip,
        fsdp2_clip,
        fsdp2_lamb,
        ddp_no_clip,
        ddp_clip,
        dtensors_mixed,
        unsupported_placements,
        zero_lars_sgd,
        fsdp1_refused,
        dtensors_two_meshes,
        hsdp,
    )
}
