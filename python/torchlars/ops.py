"""``torch.ops.torchlars``: the LARS step of liblars as a PyTorch custom operator.

Importing this module loads the C++ extension (``torchlars._C``, which registers the
operator) and registers the operator's fake implementation, with which ``torch.compile``
and meta tensors trace through it. ``LARS(..., backend="cpp")`` steps with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchlars._extension import _C  # noqa: F401  (loads liblars, which defines torch.ops.torchlars)

__all__ = ["lars_scale_gradients_"]


def lars_scale_gradients_(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float,
    lr: float | Tensor,
    eps: float,
    trust_coef: float,
    clip: bool,
) -> None:
    r"""``torchlars._functional.lars_scale_gradients_``, computed by liblars in C++.

    .. math:: g \leftarrow (g + \lambda w) \cdot r

    Same arguments, same numbers. A tensor ``lr`` is passed to the operator as it is, so
    nothing waits on the device and a changing ``lr`` causes no recompilation.
    """
    if not isinstance(lr, Tensor):
        lr = torch.tensor(lr, dtype=torch.float64)
    torch.ops.torchlars.lars_scale_gradients_(
        params, grads, weight_decay=weight_decay, lr=lr, eps=eps, trust_coef=trust_coef, clip=clip
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
) -> None:
    # Only mutates grads in place: nothing to allocate, only the C++ kernel's checks.
    torch._check(
        len(params) == len(grads),
        lambda: f"lars_scale_gradients_: got {len(params)} params but {len(grads)} grads",
    )
    for i, (param, grad) in enumerate(zip(params, grads)):
        torch._check(
            param.shape == grad.shape and param.dtype == grad.dtype and param.device == grad.device,
            lambda: f"lars_scale_gradients_: grads[{i}] does not match params[{i}]",
        )
