"""A plain per-parameter LARS, written from the formula (the contract in the project's SPEC, as
the ``torchlars.LARS`` docstring states it), for tests to compare with; and the SGD options
the tests step every path with."""

import math

import torch

# The momentum-SGD options every LARS-SGD path is tested with, by name.
SGD_OPTIONS = {
    "plain": {},
    "decay": {"weight_decay": 1e-2},
    "momentum": {"momentum": 0.9, "weight_decay": 1e-2},
    "dampening": {"momentum": 0.5, "dampening": 0.3, "weight_decay": 1e-2},
    "nesterov": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    "maximize": {"momentum": 0.9, "maximize": True, "weight_decay": 1e-2},
}


def reference_scaled_grad(param, grad, *, weight_decay, lr, eps, trust_coef, clip):
    param_norm = param.double().norm().item()
    grad_norm = grad.double().norm().item()
    if param_norm > 0 and grad_norm > 0:
        ratio = trust_coef * param_norm / (grad_norm + weight_decay * param_norm + eps)
    else:
        ratio = 1.0
    if clip:
        ratio = min(ratio / float(lr), 1.0)
    assert math.isfinite(ratio)
    return ((grad.double() + weight_decay * param.double()) * ratio).to(grad.dtype)


class ReferenceLARS:
    """LARS applied parameter by parameter, then a base optimizer built without weight decay.

    With ``maximize=True`` it is LARS on the negated loss: the gradient is negated first, and
    the base steps with ``maximize=False``.
    """

    def __init__(self, base_cls, groups, base_kwargs, *, eps=1e-8, trust_coef=1e-3, clip=False):
        self.groups = groups
        self.eps, self.trust_coef, self.clip = eps, trust_coef, clip
        base_groups = []
        for group in groups:
            base_group = dict(group)
            if not group.get("lars_exclude", False):
                base_group["weight_decay"] = 0.0
                if group.get("maximize", base_kwargs.get("maximize", False)):
                    base_group["maximize"] = False
            base_groups.append(base_group)
        self.base = base_cls(base_groups, **base_kwargs)
        self.base_kwargs = base_kwargs

    def step(self):
        for group, base_group in zip(self.groups, self.base.param_groups):
            if group.get("lars_exclude", False):
                continue
            weight_decay = float(group.get("weight_decay", self.base_kwargs.get("weight_decay", 0.0)))
            sign = -1 if group.get("maximize", self.base_kwargs.get("maximize", False)) else 1
            for param in base_group["params"]:
                if param.grad is None:
                    continue
                param.grad = reference_scaled_grad(
                    param.detach(),
                    sign * param.grad,
                    weight_decay=weight_decay,
                    lr=base_group["lr"],
                    eps=self.eps,
                    trust_coef=self.trust_coef,
                    clip=self.clip,
                )
        self.base.step()


# --- The "decayed" and "update" variants (SPEC.md, "Trust-ratio variants") ---------------


def reference_decayed_scaled_grad(param, grad, *, weight_decay, lr, eps, trust_coef, clip):
    """``(g + wd * w) * r`` with the "decayed" ratio ``tc * ||w|| / (||g + wd * w|| + eps)``."""
    decayed = grad.double() + weight_decay * param.double()
    param_norm, decayed_norm = param.double().norm().item(), decayed.norm().item()
    ratio = trust_coef * param_norm / (decayed_norm + eps) if param_norm > 0 and decayed_norm > 0 else 1.0
    if clip:
        ratio = min(ratio / float(lr), 1.0)
    return (decayed * ratio).to(grad.dtype)


def reference_update_step(params, base_step, *, lr, eps, trust_coef, clip):
    """The "update" variant (LAMB) around ``base_step()``, which steps ``params`` with its own
    weight decay: then ``w <- w_before + r * (w_after - w_before)`` with
    ``r = tc * ||w_before|| / (||w_after - w_before|| / lr + eps)``. Returns the ratios."""
    before = [param.detach().double().clone() for param in params]
    base_step()
    ratios = []
    with torch.no_grad():
        for param, old in zip(params, before):
            update = param.double() - old
            param_norm, update_norm = old.norm().item(), update.norm().item() / float(lr)
            ratio = trust_coef * param_norm / (update_norm + eps) if param_norm > 0 and update_norm > 0 else 1.0
            if clip:
                ratio = min(ratio / float(lr), 1.0)
            param.copy_(old + ratio * update)
            ratios.append(ratio)
    return ratios
