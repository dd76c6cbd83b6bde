"""LARS on DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism): whole-layer norms.

A DTensor's local tensor is only a piece of its parameter, but the trust ratio needs the norm
of the whole parameter and of its whole gradient. Each rank takes the sums of squares of its
own pieces, the sums of every layer of every param group on a device mesh are reduced in one
``all_reduce``, and each rank then scales its own pieces of the gradients with
:func:`torchlars._functional.scale_by_trust_ratio_` (or, for ``trust_ratio="update"``, its pieces
of the base's step with :func:`torchlars._functional.scale_update_`). One collective per mesh
and step, however many layers, and no host synchronisation.

Along a mesh dimension a parameter is either cut into pieces (``Shard``, and the strided shards
of FSDP2 with tensor parallelism), whose sums of squares add up, or copied (``Replicate``), in
which case only the rank at coordinate 0 of that dimension contributes, so that nothing is
counted twice. This covers FSDP2, HSDP's ``(Replicate(), Shard(0))`` and 2-D FSDP + TP meshes.
``Partial`` placements (unreduced sums) are refused: the norm of a sum is not the sum of norms.

Plain tensors (DDP, single device) never come here: their local norms are already whole.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from torchlars._foreach import decay_, norms
from torchlars._functional import LARSSettings, scale_by_trust_ratio_, scale_update_

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "flat_shard_problem",
    "is_dtensor",
    "lars_scale_dtensor_gradients_",
    "lars_update_dtensors_",
    "sharding_problem",
    "split_dtensors",
]


def is_dtensor(tensor: Tensor) -> bool:
    # torch.distributed.tensor is slow to import, so torchlars does not; until something
    # imports it, no tensor is a DTensor.
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and isinstance(tensor, dtensor_module.DTensor)


def flat_shard_problem(param: Tensor) -> str | None:
    """Why LARS cannot scale ``param`` if it is (a view into) a flat shard of FSDP1, else None.

    FSDP1 (``FullyShardedDataParallel``) flattens a module's parameters into one
    ``FlatParameter`` and hands each rank a piece of it, so a local norm is neither a layer's
    nor the whole's. With ``use_orig_params=True`` the original parameters are views into that
    piece, which FSDP1 marks. (The attributes are FSDP1's own; FSDP2 uses DTensors instead.)
    """
    if is_dtensor(param):
        return None
    if getattr(param, "_is_flat_param", False):
        kind = "an FSDP1 FlatParameter"
    elif getattr(param, "_fsdp_flattened", False):
        kind = "a view into an FSDP1 flat parameter (use_orig_params=True)"
    else:
        return None
    return (
        f"it is {kind}, whose local norm is that of a flat shard, not of a layer. Shard the model "
        "with FSDP2 instead (torch.distributed.fsdp.fully_shard), whose DTensor parameters LARS "
        "scales with whole-layer norms"
    )


def sharding_problem(param: Tensor) -> str | None:
    """Why LARS cannot scale ``param.grad`` (DTensors, FSDP1's flat shards), or None when it can."""
    flat_shard = flat_shard_problem(param)
    if flat_shard is not None:
        return flat_shard
    grad = param.grad
    if not is_dtensor(param) and not is_dtensor(grad):
        return None
    if not (is_dtensor(param) and is_dtensor(grad)):
        return "the parameter and its gradient must both be DTensors, or both plain tensors"
    for name, tensor in (("parameter", param), ("gradient", grad)):
        for placement in tensor.placements:
            if placement.is_partial():
                return (
                    f"its {name} is Partial ({placement}), a sum not reduced yet, and LARS needs the "
                    f"norm of the whole; reduce it first, e.g. grad.redistribute(placements={list(param.placements)})"
                )
    if grad.device_mesh != param.device_mesh or grad.placements != param.placements:
        return (
            f"its gradient is placed as {grad.placements} on {grad.device_mesh} but the parameter "
            f"as {param.placements} on {param.device_mesh}; redistribute the gradient like the parameter"
        )
    return None


def split_dtensors(
    params: list[Tensor], grads: list[Tensor]
) -> tuple[tuple[list[Tensor], list[Tensor]], tuple[list[Tensor], list[Tensor]]]:
    """``((plain params, plain grads), (DTensor params, DTensor grads))``, order kept."""
    plain: tuple[list[Tensor], list[Tensor]] = ([], [])
    distributed: tuple[list[Tensor], list[Tensor]] = ([], [])
    for param, grad in zip(params, grads):
        params_and_grads = distributed if is_dtensor(param) else plain
        params_and_grads[0].append(param)
        params_and_grads[1].append(grad)
    return plain, distributed


def lars_scale_dtensor_gradients_(
    params: list[list[Tensor]],
    grads: list[list[Tensor]],
    settings: LARSSettings,
    *,
    weight_decays: list[float | Tensor],
    lrs: list[float | Tensor],
) -> list[tuple[list[Tensor], Tensor]]:
    """:func:`torchlars._dispatch.lars_scale_gradients_` for DTensors, all param groups at once.

    ``params[k]``, ``grads[k]``, ``weight_decays[k]`` and ``lrs[k]`` belong to param group
    ``k``. Every rank of a mesh passes the same parameters in the same order (FSDP2 does).
    Returns the DTensor parameters with their ratios, as the plain path does.
    """
    pieces = _pieces(params, [[param.to_local() for param in group] for group in params],
                     [[grad.to_local() for grad in group] for group in grads])
    if settings.kind == "decayed":  # the ratio is taken from the decayed gradient: decay first
        for layout in pieces.values():
            for (group_index, _, _), (_, local_params, local_grads) in layout.items():
                decay_(local_params, local_grads, weight_decays[group_index])
    ratios = []
    for mesh, layout in pieces.items():
        for (kind, (dtensors, local_params, local_grads)), (param_norms, grad_norms) in zip(
            layout.items(), _whole_norms(mesh, layout)
        ):
            group_index = kind[0]
            kind_ratios = scale_by_trust_ratio_(
                local_params,
                local_grads,
                param_norms,
                grad_norms,
                settings,
                weight_decay=0.0 if settings.kind == "decayed" else weight_decays[group_index],
                lr=lrs[group_index],
            )
            ratios.append((dtensors, kind_ratios))
    return ratios


def lars_update_dtensors_(
    params: list[list[Tensor]],
    locals_before: list[list[Tensor]],
    settings: LARSSettings,
    *,
    lrs: list[float | Tensor],
) -> list[tuple[list[Tensor], Tensor]]:
    """:func:`torchlars._dispatch.lars_update_` for DTensors, all param groups at once.

    ``locals_before[k][i]`` is a copy of ``params[k][i].to_local()`` taken before the base's step.
    One collective per mesh for the norms of the weights and of the steps.
    """
    minus_steps = [  # w_before - w, per local piece
        torch._foreach_sub(before, [param.to_local() for param in group]) if before else []
        for group, before in zip(params, locals_before)
    ]
    pieces = _pieces(params, locals_before, minus_steps)
    ratios = []
    for mesh, layout in pieces.items():
        whole = _whole_norms(mesh, layout)
        for (kind, (dtensors, _, local_steps)), (param_norms, step_norms) in zip(layout.items(), whole):
            kind_ratios = scale_update_(
                [param.to_local() for param in dtensors],
                local_steps,
                param_norms,
                step_norms,
                settings,
                lr=lrs[kind[0]],
            )
            ratios.append((dtensors, kind_ratios))
    return ratios


def _pieces(
    params: list[list[Tensor]], first: list[list[Tensor]], second: list[list[Tensor]]
) -> dict[DeviceMesh, dict[_PieceKind, tuple[list[Tensor], list[Tensor], list[Tensor]]]]:
    """Per mesh, the DTensor parameters with two lists of their local pieces (the weights and
    gradients, or the weights and steps), grouped by param group, dtype and the mesh dimensions
    along which they are copies. The layout depends on the placements only, so it is the same
    on every rank and the reduced sums line up."""
    pieces: dict[DeviceMesh, dict[_PieceKind, tuple[list[Tensor], list[Tensor], list[Tensor]]]] = {}
    for group_index, (group_params, group_first, group_second) in enumerate(zip(params, first, second)):
        for param, a, b in zip(group_params, group_first, group_second):
            copied_along = tuple(dim for dim, placement in enumerate(param.placements) if placement.is_replicate())
            kind = (group_index, param.dtype, copied_along)
            dtensors, firsts, seconds = pieces.setdefault(param.device_mesh, {}).setdefault(kind, ([], [], []))
            dtensors.append(param)
            firsts.append(a)
            seconds.append(b)
    return pieces


def _whole_norms(
    mesh: DeviceMesh, layout: dict[_PieceKind, tuple[list[Tensor], list[Tensor], list[Tensor]]]
) -> list[tuple[Tensor, Tensor]]:
    """Per kind of ``layout``, the norms of the whole tensors whose local pieces are its two
    lists: from the local sums of squares and one collective (per sharded dimension)."""
    reduced_dims, process_groups = _reduction(mesh, layout)
    coordinate = mesh.get_coordinate()
    local_norms = []
    for (_, dtype, copied_along), (_, first, second) in layout.items():
        kind_norms = torch.cat([norms(first, dtype), norms(second, dtype)])
        if any(coordinate[dim] != 0 for dim in copied_along if dim in reduced_dims):
            kind_norms = torch.zeros_like(kind_norms)  # a copy, counted by the rank at coordinate 0
        local_norms.append(kind_norms)
    sums_of_squares = torch.cat(local_norms).square_()
    for process_group in process_groups:
        dist.all_reduce(sums_of_squares, op=dist.ReduceOp.SUM, group=process_group)
    whole = sums_of_squares.sqrt_().split([len(kind_norms) for kind_norms in local_norms])
    return [tuple(norms_of_kind.to(local.dtype).chunk(2)) for norms_of_kind, local in zip(whole, local_norms)]


# (param group index, dtype, mesh dimensions along which the parameter is replicated)
_PieceKind = tuple[int, torch.dtype, tuple[int, ...]]


def _reduction(
    mesh: DeviceMesh, layout: dict[_PieceKind, tuple[list[Tensor], list[Tensor], list[Tensor]]]
) -> tuple[list[int], list[dist.ProcessGroup]]:
    """The mesh dimensions the sums of squares are summed over, and the groups to do it with."""
    copied_along = [kind[2] for kind in layout]
    sharded_dims = [dim for dim in range(mesh.ndim) if not all(dim in copied for copied in copied_along)]
    if len(sharded_dims) > 1 and mesh.size() == dist.get_world_size():
        # Pieces along several dimensions (FSDP + TP): sum over the whole mesh, which is the
        # default group, in one collective; copies along any dimension are then left out.
        return list(range(mesh.ndim)), [dist.group.WORLD]
    # FSDP2 and HSDP shard along one dimension; a sub-mesh spanning several sharded
    # dimensions has no group of its own, so those take one collective per dimension.
    return sharded_dims, [mesh.get_group(dim) for dim in sharded_dims]
