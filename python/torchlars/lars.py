"""``LARS``: the optimizer wrapper users construct."""

from __future__ import annotations

from collections.abc import Callable, Iterable
import importlib
import inspect
from typing import Any
import warnings

import torch
from torch import nn
from torch.optim import Optimizer

from torchlars._distributed import (
    flat_shard_problem,
    lars_scale_dtensor_gradients_,
    lars_update_dtensors_,
    split_dtensors,
)
from torchlars._dispatch import fused_kernels_step, lars_scale_gradients_, lars_update_, skips_on_host
from torchlars._functional import LARSSettings, lars_scaled_gradients
from torchlars._optimizer import (
    TrustRatios,
    evaluate_closure,
    group_index,
    lars_settings,
    params_with_dense_grads,
    position,
    prepare_trust_ratio_record,
    record_trust_ratios,
)
from torchlars.lars_sgd import params_and_grads, step_group

__all__ = ["LARS", "exclude_bias_and_norm", "named_trust_ratios"]


class LARS(TrustRatios, Optimizer):
    r"""Layer-wise Adaptive Rate Scaling around any ``torch.optim`` optimizer.

    Implements LARS from `Large Batch Training of Convolutional Networks
    <https://arxiv.org/abs/1708.03888>`_ (You, Gitman & Ginsburg, 2017), as a drop-in
    successor of torchlars 0.1.2. Before every step of the wrapped ``optimizer``, each
    parameter :math:`w` with gradient :math:`g` in a group with weight decay :math:`\lambda`
    and learning rate :math:`\gamma` gets

    .. math::
        r &= \begin{cases}
            \eta \, \|w\|_2 / (\|g\|_2 + \lambda \|w\|_2 + \epsilon)
                & \text{if } \|w\|_2 > 0 \text{ and } \|g\|_2 > 0 \\
            1 & \text{otherwise}
        \end{cases} \\
        r &\leftarrow \min(r / \gamma, 1) \qquad \text{only if clip (LARC)} \\
        g &\leftarrow (g + \lambda w) \, r

    where :math:`\eta` is ``trust_coef`` (``trust_ratio="paper"``, the default). With
    ``trust_ratio="decayed"`` (SimCLR, BYOL, Barlow Twins, VICReg, MoCo v3, optax's ``lars``) the
    denominator is :math:`\|g + \lambda w\|_2 + \epsilon` instead, and the zero-norm test is on
    that norm. With ``trust_ratio="update"`` (LAMB, You et al., 2019, `arXiv:1904.00962
    <https://arxiv.org/abs/1904.00962>`_) the base steps first, with its own weight decay, and
    its step :math:`u = w_{after} - w_{before}` is scaled instead:

    .. math::
        r = \eta \, \|w_{before}\|_2 / (\|u\|_2 / \gamma + \epsilon), \qquad
        w \leftarrow w_{before} + r \, u

    with the same zero-norm rule and clip; ``LARS(AdamW(...), trust_coef=1.0, eps=0.0,
    trust_ratio="update")`` is LAMB. For "paper" and "decayed", the wrapped optimizer then steps on the scaled
    gradient with its weight decay set to 0 (the decay is already in :math:`g`); its learning
    rate, momentum and state apply as usual. Groups with ``"lars_exclude": True`` are left
    to the wrapped optimizer untouched (see :func:`exclude_bias_and_norm`).

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects, so
    LR schedulers, hooks and state dicts behave as with the wrapped optimizer alone. The step
    never synchronises with the device and traces under ``torch.compile``.

    Args:
        optimizer: the optimizer to wrap, e.g. ``torch.optim.SGD(model.parameters(), lr=0.1)``.
        eps: added to the denominator of the trust ratio (default: 1e-8).
        trust_coef: the trust coefficient :math:`\eta` (default: 1e-3).
        clip: clip the trust ratio at the learning rate, as NVIDIA apex's LARC does
            (default: False).
        trust_ratio: ``"paper"`` (default), ``"decayed"`` or ``"update"``, as above.

    ``trust_ratios()`` returns the ratios of the last step per parameter, as device tensors.
    An adaptive base (Adam, AdamW, RMSprop, Adagrad, ...) divides each coordinate by its own
    running scale, which mostly cancels a per-layer factor on the gradient: "paper" and
    "decayed" around one warn once; use ``trust_ratio="update"`` there.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        eps: float = 1e-8,
        trust_coef: float = 0.001,
        *,
        clip: bool = False,
        trust_ratio: str = "paper",
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "LARS: `optimizer` must be a torch.optim.Optimizer, e.g. "
                f"LARS(torch.optim.SGD(params, lr=0.1)), but got {torch.typename(optimizer)}"
            )
        if isinstance(optimizer, LARS):
            raise TypeError("LARS: `optimizer` is already a LARS optimizer; wrap its base instead")
        settings = lars_settings("LARS", eps=eps, trust_coef=trust_coef, clip=clip, trust_ratio=trust_ratio)
        _check_base(optimizer)
        if trust_ratio != "update" and type(optimizer) in _ADAPTIVE_BASES:
            warnings.warn(
                f"LARS: a {type(optimizer).__name__} base divides each coordinate of the gradient by its "
                f"own running scale, which mostly cancels the trust ratio of trust_ratio={trust_ratio!r}; "
                "use trust_ratio='update' (LAMB) to scale the base's step instead",
                UserWarning,
                stacklevel=2,
            )
        self.optim = optimizer
        prepare_trust_ratio_record(self)
        self.eps = settings.eps
        self.trust_coef = settings.trust_coef
        self.clip = settings.clip
        self.trust_ratio = settings.kind
        # What Optimizer.__init__ would set up, minus the param groups, which are the base's.
        self.__setstate__(self.__getstate__())

    # The wrapped optimizer's own objects, so that schedulers and user code see one truth.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optim.param_groups = value

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler then passes grad_scale and found_inf to step instead of unscaling itself.
        return self._steps_fused_sgd()

    @property
    def settings(self) -> LARSSettings:
        """LARS's settings (``eps``, ``trust_coef``, ``clip``, ``trust_ratio``) as one object."""
        return LARSSettings(self.eps, self.trust_coef, self.clip, self.trust_ratio)

    @property
    def state(self) -> dict:
        return self.optim.state

    @state.setter
    def state(self, value: dict) -> None:
        self.optim.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optim.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optim.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        return {
            "optim": self.optim,
            "eps": self.eps,
            "trust_coef": self.trust_coef,
            "clip": self.clip,
            "trust_ratio": self.trust_ratio,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("trust_ratio", "paper")
        super().__setstate__(state)
        prepare_trust_ratio_record(self)

    def __repr__(self) -> str:
        base = "\n".join("    " + line for line in repr(self.optim).splitlines())
        return (
            f"LARS(eps={self.eps}, trust_coef={self.trust_coef}, clip={self.clip}, trust_ratio={self.trust_ratio!r},\n"
            f"  optimizer=\n{base}\n)"
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Scale the gradients, then step the wrapped optimizer.

        Args:
            closure: re-evaluates the model and returns the loss; it runs first, so the
                gradients it produces are the ones that get scaled.
        """
        loss = evaluate_closure(closure)
        adapted_groups = [group for group in self.param_groups if not group.get("lars_exclude", False)]
        if self.trust_ratio == "update":
            self._step_and_scale_update(adapted_groups)
            return loss
        if self._steps_fused_sgd():
            self._step_fused_sgd(adapted_groups)
            return loss
        with torch.no_grad():
            record_trust_ratios(self, self._scale_gradients(adapted_groups))
        taken_over = [{key: group[key] for key in _TAKEN_OVER if key in group} for group in adapted_groups]
        for group, options in zip(adapted_groups, taken_over):
            group.update({key: _TAKEN_OVER[key] for key in options})
        try:
            self._step_base()
        finally:
            for group, options in zip(adapted_groups, taken_over):
                group.update(options)
        return loss

    def _step_and_scale_update(self, adapted_groups: list[dict[str, Any]]) -> None:
        """``trust_ratio="update"``: the base steps with all its options, then LARS scales its step."""
        # Per group, (plain params, grads) and (DTensor params, grads).
        gathered = [split_dtensors(*params_with_dense_grads(group, self.param_groups, "LARS")) for group in adapted_groups]
        with torch.no_grad():
            # Before the base writes them: the weights the ratio is taken from and the step starts at.
            before = [torch._foreach_mul(params, 1.0) if params else [] for (params, _), _ in gathered]
            dtensors_before = [[param.to_local().clone() for param in params] for _, (params, _) in gathered]
        self._step_base()
        ratios = []
        with torch.no_grad():
            for group, ((params, _), _), params_before in zip(adapted_groups, gathered, before):
                ratios += lars_update_(params, params_before, self.settings, lr=group["lr"])
            # DTensor (FSDP2) parameters of all groups together, for one collective per device mesh.
            ratios += lars_update_dtensors_(
                [params for _, (params, _) in gathered],
                dtensors_before,
                self.settings,
                lrs=[group["lr"] for group in adapted_groups],
            )
        record_trust_ratios(self, ratios)

    def _steps_fused_sgd(self) -> bool:
        """Whether this step goes through the fused LARS-momentum kernels (liblars's, Triton's):
        around ``torch.optim.SGD(..., fused=True)`` when they step every parameter LARS adapts."""
        base = self.optim
        if type(base) is not torch.optim.SGD or not all(group.get("fused") for group in base.param_groups):
            return False
        return fused_kernels_step(
            [param for group in base.param_groups if not group.get("lars_exclude", False) for param in group["params"]]
        )

    def _step_fused_sgd(self, adapted_groups: list[dict[str, Any]]) -> None:
        """The step around ``SGD(fused=True)``: the adapted groups step with the fused LARS-momentum
        kernels, the excluded ones with the base's own step, alone on them, with its step hooks."""
        base = self.optim
        param_groups = base.param_groups
        # Every group's gradients are checked before any parameter changes.
        gathered = [params_and_grads(group, param_groups, "LARS") for group in adapted_groups]
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if skips_on_host(found_inf):
            return
        ratios = []
        with torch.no_grad():
            for group, (params, grads) in zip(adapted_groups, gathered):
                ratios += step_group(group, params, grads, base.state, self.settings, grad_scale=grad_scale,
                                     found_inf=found_inf)
        record_trust_ratios(self, ratios)
        amp = {name: value for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)) if value is not None}
        base.param_groups = [group for group in param_groups if all(group is not g for g in adapted_groups)]
        base.__dict__.update(amp)  # where torch's fused SGD looks for them, as GradScaler puts them
        try:
            self._step_base()
        finally:
            base.param_groups = param_groups
            for name in amp:
                del base.__dict__[name]

    def _step_base(self) -> None:
        """Step the wrapped optimizer with its own step hooks, and without the global ones.

        The global step hooks already run around ``LARS.step`` (``Optimizer`` wraps every
        optimizer's ``step`` in them), so calling ``self.optim.step()`` would run each twice.
        Without ``_use_grad_for_differentiable`` (see :func:`_unhooked_step`) the base's update
        also stays in the graph of ``LARS.step`` under ``torch.compile``.
        """
        base = self.optim
        base_step = _unhooked_step(type(base))
        pre_hooks = getattr(base, "_optimizer_step_pre_hooks", None)
        post_hooks = getattr(base, "_optimizer_step_post_hooks", None)
        if base_step is None or pre_hooks is None or post_hooks is None:
            warnings.warn(_UNKNOWN_OPTIMIZER_INTERNALS, stacklevel=3)
            base.step()
            return
        args: tuple = (base,)  # as torch's hooks get them: self first
        kwargs: dict[str, Any] = {}
        for pre_hook in pre_hooks.values():
            result = pre_hook(base, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"a step pre-hook of the wrapped optimizer must return None or (new_args, new_kwargs), got {result!r}"
                    )
                args, kwargs = result
        # The grad mode that _use_grad_for_differentiable would set.
        with torch.set_grad_enabled(base.defaults.get("differentiable", False)):
            base_step(*args, **kwargs)
        for post_hook in post_hooks.values():
            post_hook(base, args, kwargs)

    def _scale_gradients(self, adapted_groups: list[dict[str, Any]]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        # Per group, (plain params, grads) and (DTensor params, grads).
        gathered = [split_dtensors(*params_with_dense_grads(group, self.param_groups, "LARS")) for group in adapted_groups]
        for group, (_, (dtensor_params, _)) in zip(adapted_groups, gathered):
            if group.get("differentiable", False) and dtensor_params:
                raise ValueError(
                    f"LARS: param group {group_index(group, self.param_groups)} has differentiable=True "
                    "and DTensor parameters, whose differentiable step LARS does not have; build the "
                    "base optimizer with differentiable=False"
                )
        for group, ((_, grads), (_, dtensor_grads)) in zip(adapted_groups, gathered):
            if group.get("maximize", False) and not group.get("differentiable", False) and (grads or dtensor_grads):
                # LARS on maximize=True is LARS on the negated loss, as in torch.optim: g -> -g
                # before the decay is added (the base then steps with maximize=False).
                torch._foreach_neg_([*grads, *(grad.to_local() for grad in dtensor_grads)])
        ratios = []
        for group, ((params, grads), _) in zip(adapted_groups, gathered):
            if group.get("differentiable", False):
                # New gradients that autograd differentiates through, as the base's own
                # differentiable step does; the caller's gradients are left as they are.
                with torch.enable_grad():
                    scaled = lars_scaled_gradients(
                        params,
                        grads,
                        self.settings,
                        weight_decay=group.get("weight_decay", 0.0),
                        lr=group["lr"],
                        maximize=group.get("maximize", False),
                    )
                for param, grad in zip(params, scaled):
                    param.grad = grad
                continue
            ratios += lars_scale_gradients_(
                params, grads, self.settings, weight_decay=group.get("weight_decay", 0.0), lr=group["lr"]
            )
        # DTensor (FSDP2) parameters of all groups together, for one collective per device mesh.
        ratios += lars_scale_dtensor_gradients_(
            [params for _, (params, _) in gathered],
            [grads for _, (_, grads) in gathered],
            self.settings,
            weight_decays=[group.get("weight_decay", 0.0) for group in adapted_groups],
            lrs=[group["lr"] for group in adapted_groups],
        )
        return ratios

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optim.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, plus LARS's settings under ``"lars"``.

        A plain optimizer of the wrapped type loads it as its own (it ignores ``"lars"``).
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optim.state_dict()
        state_dict["lars"] = {
            "eps": self.eps,
            "trust_coef": self.trust_coef,
            "clip": self.clip,
            "trust_ratio": self.trust_ratio,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ``LARS`` or of a plain optimizer of the wrapped type."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        state_dict = dict(state_dict)
        settings = state_dict.pop("lars", None)
        if settings is not None:
            settings = {"trust_ratio": self.trust_ratio, **settings}
            lars_settings("LARS", **settings)
        self.optim.load_state_dict(state_dict)
        if settings is not None:
            self.eps = float(settings["eps"])
            self.trust_coef = float(settings["trust_coef"])
            self.clip = bool(settings["clip"])
            self.trust_ratio = settings["trust_ratio"]
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


# Bases that divide each coordinate by a running scale of its own, cancelling a per-layer factor.
_ADAPTIVE_BASES = {
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
}

# The base's options that LARS applies itself in an adapted group, and what the base steps
# with instead: the decay is folded into the scaled gradient, and so is the sign of maximize.
_TAKEN_OVER = {"weight_decay": 0.0, "maximize": False}


def _check_base(optimizer: Optimizer) -> None:
    """Refuse, at construction, a base optimizer LARS cannot wrap, by what to change."""
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"LARS cannot wrap {type(optimizer).__name__}: its step needs a closure, which it "
            "evaluates several times per step (e.g. LBFGS's line search), so there is no one gradient "
            "for LARS to scale; wrap an optimizer whose step(closure=None) can go without one"
        )
    for group in optimizer.param_groups:
        if group.get("lars_exclude", False):
            continue
        for param in group["params"]:
            problem = flat_shard_problem(param)
            if problem is not None:
                raise ValueError(f"LARS cannot scale {position(param, group, optimizer.param_groups)}: {problem}")


def _torch_use_grad_code() -> Any:
    """The code of ``torch.optim``'s ``_use_grad_for_differentiable`` wrapper, or None.

    torch's optimizers decorate their ``step`` with it: it sets the grad mode and graph-breaks
    on purpose under ``torch.compile``. A private name, looked up without failing: if a torch
    release renames it, LARS still works, with the base's update in a graph of its own.
    """
    decorator = getattr(importlib.import_module("torch.optim.optimizer"), "_use_grad_for_differentiable", None)
    return getattr(decorator(lambda self: None), "__code__", None) if callable(decorator) else None


_USE_GRAD_CODE = _torch_use_grad_code()
_UNKNOWN_OPTIMIZER_INTERNALS = (
    "torchlars: this torch's torch.optim.Optimizer does not wrap step as torchlars knows it; "
    "LARS steps the wrapped optimizer through its public step(), so global step hooks run twice "
    "per step and torch.compile breaks the graph there. The numbers are unchanged."
)
if _USE_GRAD_CODE is None:
    warnings.warn(
        "torchlars: torch.optim.optimizer._use_grad_for_differentiable is not there in this torch; "
        "under torch.compile the wrapped optimizer's update gets a graph of its own. The numbers "
        "are unchanged.",
        stacklevel=2,
    )


def _unhooked_step(optimizer_class: type) -> Callable[..., Any] | None:
    """``optimizer_class.step`` without the layers ``torch.optim`` wraps around it, or None.

    ``Optimizer`` wraps the ``step`` of every optimizer class in a layer that runs the global
    and the optimizer's step hooks (and marks it ``hooked``); torch's optimizers decorate their
    ``step`` with ``_use_grad_for_differentiable``. Both are taken off; any other wrapper, a
    user's or a subclass's, stays. None when the hooks layer is not the one LARS knows.
    """
    step = optimizer_class.step
    if not getattr(step, "hooked", False) or not hasattr(step, "__wrapped__"):
        return None
    step = step.__wrapped__
    if _USE_GRAD_CODE is not None and getattr(step, "__code__", None) is _USE_GRAD_CODE:
        step = step.__wrapped__
    return step


def exclude_bias_and_norm(
    model: nn.Module | Iterable[torch.nn.Parameter], weight_decay: float
) -> list[dict[str, Any]]:
    """Param groups that keep biases and normalization weights out of LARS.

    Every trainable parameter with ``ndim <= 1`` (biases, BatchNorm/LayerNorm scales and
    shifts) goes into a group with ``weight_decay=0`` and ``"lars_exclude": True``; all
    others into a group with the given ``weight_decay``. Large-batch recipes need this: a
    zero-initialised bias would otherwise take the base learning rate unscaled.

    Example::

        base = torch.optim.SGD(exclude_bias_and_norm(model, 5e-4), lr=0.1, momentum=0.9)
        optimizer = LARS(base)
    """
    parameters = model.parameters() if isinstance(model, nn.Module) else model
    adapted, excluded = [], []
    for param in parameters:
        if param.requires_grad:
            (excluded if param.ndim <= 1 else adapted).append(param)
    groups = []
    if adapted:
        groups.append({"params": adapted, "weight_decay": weight_decay})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def named_trust_ratios(optimizer: Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """``optimizer.trust_ratios()`` keyed by ``model.named_parameters()`` names, for loggers.

    Example (Lightning): ``self.log_dict({f"trust_ratio/{k}": v for k, v in
    named_trust_ratios(optimizer, self).items()})``.

    ``optimizer`` may be a wrapper that keeps the torchlars optimizer in ``.optimizer``, as
    accelerate's ``AcceleratedOptimizer`` (what a transformers ``Trainer`` hands its callbacks)
    and Lightning's ``LightningOptimizer`` do: wrappers are followed to the optimizer.
    """
    wrapper = optimizer
    while not hasattr(optimizer, "trust_ratios"):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            raise TypeError(
                f"named_trust_ratios: {type(wrapper).__name__} has no trust_ratios() and wraps no optimizer "
                "that has one (looked through `.optimizer`); pass a torchlars optimizer (LARS, LARSSGD) "
                "or a wrapper around one"
            )
        optimizer = inner
    ratios = optimizer.trust_ratios()
    return {name: ratios[param] for name, param in model.named_parameters() if param in ratios}
