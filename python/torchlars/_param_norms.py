"""The parameter norms that the fused LARS step carries from one step to the next.

liblars's fused operator (``torch.ops.torchlars.lars_sgd_``) accumulates ``||w_new||`` while it
writes ``w_new``, so the next step need not read the parameters once more for ``||w||``. A
carried norm is only used while nothing else can have written the parameter since: each one
is kept with the parameter objects and their autograd version counters and data pointers as
the step left them. Any in-place edit (``p.mul_()``, ``p.copy_()`` under ``no_grad``, a
``Module.load_state_dict``, an EMA swap, ``set_`` by a reparametrisation) bumps the version
counter; ``p.data = t`` and ``torch.utils.swap_tensors`` change the data pointer or the
counter; a parameter replaced in its group is another object. Then the norms are recomputed
with ``torch.ops.torchlars.lars_param_norms``, whose summation order is the kernel's, so a
recomputed norm is bit for bit the carried one: a checkpoint resumed in a new process
continues exactly like the uninterrupted run.

One blind spot is autograd's own: an in-place edit through ``p.data`` (``p.data.mul_(2)``)
bumps no version counter. Edit parameters under ``torch.no_grad()`` instead, or call the
optimizer's ``load_state_dict`` (which forgets every carried norm).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor

__all__ = ["CarriedParamNorms"]


def norms_now(params: list[Tensor]) -> Tensor:
    """The fp32 norms of ``params``, summed in the order in which the fused step sums them."""
    return torch.ops.torchlars.lars_param_norms(params)


def _stamps(params: list[Tensor]) -> list[tuple[int, int]]:
    return [(param._version, param.data_ptr()) for param in params]


class CarriedParamNorms:
    """``||w||`` per parameter as the last fused step wrote ``w``, per bucket of one param group.

    A bucket is what one operator call steps (tensors of one device and dtype); ``key`` names it.
    """

    def __init__(self) -> None:
        self._buckets: dict[Hashable, tuple[list[Tensor], list[tuple[int, int]], Tensor]] = {}

    def lookup(self, key: Hashable, params: list[Tensor]) -> Tensor:
        """The fp32 norms of ``params`` now: the carried ones if still true, else recomputed."""
        carried = self._buckets.get(key)
        if carried is not None:
            carried_params, stamps, norms = carried
            if (
                len(carried_params) == len(params)
                and all(a is b for a, b in zip(carried_params, params))
                and stamps == _stamps(params)
            ):
                return norms
        return norms_now(params)

    def carry(self, key: Hashable, params: list[Tensor], norms: Tensor) -> None:
        """Remember ``norms`` (just written by the step) as the norms of ``params`` as they are now."""
        self._buckets[key] = (list(params), _stamps(params), norms)

    def clear(self) -> None:
        self._buckets.clear()
