"""``torchlars.cpp.LARS``, ``torchlars.cpp.LARSSGD`` and ``torchlars.cpp.LAMB``: liblars's C++
optimizers (``lars::LARS``, ``lars::LARSSGD``, ``lars::LAMB``), from Python."""

from __future__ import annotations

from collections.abc import Callable, Iterable
import inspect
from typing import Any

import torch

import torchlars
from torchlars._extension import _C
from torchlars._optimizer import check_bool, evaluate_closure

__all__ = ["LAMB", "LARS", "LARSSGD"]


class LARS:
    r"""LARS around a libtorch optimizer, stepping in C++.

    The same algorithm as :class:`torchlars.LARS` (see its docstring for the formula and
    the paper), computed by ``lars::LARS`` of liblars around libtorch's SGD, Adam, AdamW,
    RMSprop or Adagrad. The parity tests hold both to the same numbers. ``step`` and
    ``zero_grad`` run in C++ without the GIL, behind a lock of their own: calls from several
    threads run one after the other.

    Example::

        optimizer = torchlars.cpp.LARS(model.parameters(), "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
        # Biases and norm weights left to the base optimizer:
        optimizer = torchlars.cpp.LARS(exclude_bias_and_norm(model, 1e-4), "sgd", lr=0.1, momentum=0.9)

    Args:
        params: tensors, or param-group dicts as for ``torch.optim``: ``"params"``, options
            of the base for that group, and ``"lars_exclude": True`` to leave the group
            entirely to the base optimizer.
        base: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` or ``"adagrad"``.
        eps: added to the denominator of the trust ratio (default: 1e-8).
        trust_coef: the trust coefficient (default: 1e-3).
        clip: clip the trust ratio at the learning rate, as NVIDIA apex's LARC does
            (default: False).
        trust_ratio: ``"paper"`` (default), ``"decayed"`` or ``"update"``, as in
            :class:`torchlars.LARS`.
        **base_options: the libtorch base's options, by libtorch's names: ``lr``,
            ``momentum``, ``dampening``, ``weight_decay``, ``nesterov`` (sgd); ``lr``,
            ``betas``, ``base_eps``, ``weight_decay``, ``amsgrad`` (adam, adamw); ``lr``,
            ``alpha``, ``base_eps``, ``weight_decay``, ``momentum``, ``centered`` (rmsprop);
            ``lr``, ``lr_decay``, ``weight_decay``, ``initial_accumulator_value``,
            ``base_eps`` (adagrad). The base's ``eps`` is spelt ``base_eps`` because
            ``eps`` is LARS's. Unset options take libtorch's defaults; sgd needs ``lr``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base: str,
        eps: float = 1e-8,
        trust_coef: float = 0.001,
        *,
        clip: bool = False,
        trust_ratio: str = "paper",
        **base_options: Any,
    ) -> None:
        if not isinstance(base, str):
            raise TypeError(f"torchlars.cpp.LARS: `base` must be a str such as 'sgd', got {torch.typename(base)}")
        check_bool("torchlars.cpp.LARS", clip=clip)
        if not isinstance(trust_ratio, str):
            raise TypeError(f"torchlars.cpp.LARS: `trust_ratio` must be a str, got {torch.typename(trust_ratio)}")
        groups = _param_groups(params)
        self._lars = _C.LARS(
            param_groups=[(tensors, {**base_options, **options}) for tensors, options, _ in groups],
            base=base,
            base_defaults=base_options,
            eps=eps,
            trust_coef=trust_coef,
            clip=clip,
            trust_ratio=trust_ratio,
            excluded_param_groups=[index for index, (_, _, excluded) in enumerate(groups) if excluded],
        )
        self.base = base

    @property
    def eps(self) -> float:
        return self._lars.eps

    @property
    def trust_coef(self) -> float:
        return self._lars.trust_coef

    @property
    def clip(self) -> bool:
        return self._lars.clip

    @property
    def trust_ratio(self) -> str:
        return self._lars.trust_ratio

    def trust_ratios(self) -> dict[torch.Tensor, torch.Tensor]:
        """``{parameter: its trust ratio in the last step}`` for every adapted parameter that had
        a gradient then: 0-d fp32 tensors, the values the step used, kept without a sync."""
        return self._lars.trust_ratios()

    def __repr__(self) -> str:
        return (
            f"torchlars.cpp.LARS(base={self.base!r}, eps={self.eps}, trust_coef={self.trust_coef}, clip={self.clip}, "
            f"trust_ratio={self.trust_ratio!r})"
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Scale the gradients, then step the base optimizer, in C++; ``closure`` as in
        :meth:`torchlars.LARS.step`."""
        loss = evaluate_closure(closure)
        self._lars.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._lars.zero_grad(set_to_none)


# The options of torchlars's Python optimizers that choose among their implementations.
_PYTHON_ONLY = ("foreach", "fused")


class _BuiltFromParams:
    """What :class:`LARSSGD` and :class:`LAMB` share: a liblars optimizer built from param groups
    whose options are checked here for their types (their values are checked in C++), with
    ``step``, ``zero_grad``, ``param_groups`` and ``trust_ratios``.

    Its constructor takes the options of ``_TWIN``'s, torchlars's Python optimizer of the same
    algorithm, in the same positions, with the same defaults (written once, there), but the
    choice among the Python implementations (``foreach``, ``fused``): liblars steps with its own.
    """

    _NAME: str
    _TWIN: type
    _BUILD: type  # the liblars optimizer's class in torchlars._C
    _NUMBERS: tuple[str, ...] = ()
    _BOOLS: tuple[str, ...] = ()
    _STRS: tuple[str, ...] = ()
    _OPTIONAL_NUMBERS: tuple[str, ...] = ()  # numbers or None
    _PAIRS: tuple[str, ...] = ()  # pairs of numbers

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # What help() and inspect show: the options this constructor takes.
        twin = inspect.signature(cls._TWIN)
        cls.__signature__ = twin.replace(
            parameters=[option for option in twin.parameters.values() if option.name not in _PYTHON_ONLY]
        )

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], *args: Any, **options: Any) -> None:
        defaults = self._defaults(args, options)
        self._check_types(defaults, "the defaults")
        groups = []
        for index, (tensors, options, excluded) in enumerate(_param_groups(params, self._NAME)):
            unknown = sorted(set(options) - set(defaults))
            if unknown:
                raise TypeError(
                    f"{self._NAME}: unknown option(s) {unknown} in param group {index}; "
                    f"its options are {', '.join(defaults)}"
                )
            merged = {**defaults, **options, "lars_exclude": excluded}
            self._check_types(merged, f"param group {index}")
            groups.append((tensors, merged))
        self._optimizer = self._BUILD(param_groups=groups, defaults=defaults)

    @classmethod
    def _defaults(cls, args: tuple[Any, ...], options: dict[str, Any]) -> dict[str, Any]:
        """The options given, bound as ``_TWIN``'s constructor binds them, with its defaults."""
        for name in _PYTHON_ONLY:
            if name in options:
                raise TypeError(
                    f"{cls._NAME}: no `{name}` option: it chooses among the Python implementations of "
                    f"torchlars.{cls._TWIN.__name__}, and this optimizer steps with liblars's"
                )
        try:
            bound = inspect.signature(cls._TWIN).bind(None, *args, **options)
        except TypeError as error:
            raise TypeError(f"{cls._NAME}: {error}") from None
        bound.apply_defaults()
        defaults = {name: value for name, value in bound.arguments.items() if name not in ("params", *_PYTHON_ONLY)}
        return {**defaults, "lars_exclude": False}

    @classmethod
    def _check_types(cls, options: dict[str, Any], where: str) -> None:
        def is_number(value: Any) -> bool:
            return not isinstance(value, bool) and isinstance(value, (int, float))

        def refuse(name: str, kind: str) -> None:
            raise TypeError(f"{cls._NAME}: `{name}` ({where}) must be {kind}, got {torch.typename(options[name])}")

        for name in cls._NUMBERS:
            if not is_number(options[name]):
                refuse(name, "a number")
        for name in cls._OPTIONAL_NUMBERS:
            if options[name] is not None and not is_number(options[name]):
                refuse(name, "a number or None")
        for name in cls._BOOLS:
            if not isinstance(options[name], bool):
                refuse(name, "a bool")
        for name in cls._STRS:
            if not isinstance(options[name], str):
                refuse(name, "a str")
        for name in cls._PAIRS:
            value = options[name]
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(map(is_number, value))):
                refuse(name, "a pair of numbers")

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The param groups with all their options, as ``torch.optim``'s (a copy: read, not written)."""
        return self._optimizer.param_groups()

    def trust_ratios(self) -> dict[torch.Tensor, torch.Tensor]:
        """``{parameter: its trust ratio in the last step}`` for every adapted parameter that had
        a gradient then: 0-d fp32 tensors, the values the step used, kept without a sync."""
        return self._optimizer.trust_ratios()

    def __repr__(self) -> str:
        return f"{self._NAME}({len(self.param_groups)} param groups)"

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of every param group, in C++.

        Args:
            closure: re-evaluates the model and returns the loss; it runs first (with grad
                enabled), so the gradients it produces are the ones stepped on.
        """
        loss = evaluate_closure(closure)
        self._optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none)


class LARSSGD(_BuiltFromParams):
    r"""LARS with momentum SGD, built from params, stepping in C++ (``lars::LARSSGD``).

    The same optimizer as :class:`torchlars.LARSSGD` (see its docstring for the formula and
    the paper), computed by liblars's ``lars::LARSSGD``: CPU parameters of fp32, fp64, bf16
    and fp16 with its fused LARS-momentum operator, groups with ``"lars_exclude": True`` as
    plain SGD. The parity tests hold both to the same numbers. ``step`` and ``zero_grad`` run
    in C++ without the GIL, behind a lock of their own.

    This is the C++ optimizer's Python face, as :class:`LARS` above is ``lars::LARS``'s: it
    exists so that the C++ class itself is tested against the Python one option by option
    (tests/test_cpp_lars_sgd.py), and so that a Python program can step with exactly what a
    C++ program gets. It is not a ``torch.optim.Optimizer``: no state dict, no hooks; use
    :class:`torchlars.LARSSGD` for those.

    Example::

        optimizer = torchlars.cpp.LARSSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    Args:
        params: tensors, or param-group dicts as for ``torch.optim``: ``"params"``, any option
            below for that group, and ``"lars_exclude": True`` to step the group as plain SGD.
        lr, momentum, dampening, weight_decay, nesterov, maximize, eps, trust_coef, clip,
        trust_ratio: as in :class:`torchlars.LARSSGD` (``trust_ratio`` ``"paper"`` or
        ``"decayed"``; ``lr`` a number).
    """

    _NAME = "torchlars.cpp.LARSSGD"
    _TWIN = torchlars.LARSSGD
    _BUILD = _C.LARSSGD
    # The values themselves (signs, nesterov's needs, trust_ratio) are checked in C++.
    _NUMBERS = ("lr", "momentum", "dampening", "weight_decay", "eps", "trust_coef")
    _BOOLS = ("nesterov", "maximize", "clip", "lars_exclude")
    _STRS = ("trust_ratio",)


class LAMB(_BuiltFromParams):
    r"""LAMB built from params, stepping in C++ (``lars::LAMB``).

    The same optimizer as :class:`torchlars.LAMB` (see its docstring for the algorithm and the
    paper), computed by liblars's ``lars::LAMB``: CPU parameters of fp32, fp64, bf16 and fp16
    with its fused LAMB operator (``torch.ops.torchlars.lamb_``). Groups whose ``weight_decay``
    is 0 step as AdamW unless ``always_adapt``; groups with ``"lars_exclude": True`` always do.
    ``step`` and ``zero_grad`` run in C++ without the GIL, behind a lock of their own.

    Like :class:`LARSSGD`, the C++ optimizer's Python face, for parity tests and for stepping
    with exactly what a C++ program gets; not a ``torch.optim.Optimizer``.

    Example::

        optimizer = torchlars.cpp.LAMB(model.parameters(), lr=1e-3, weight_decay=0.01)

    Args:
        params: tensors, or param-group dicts as for ``torch.optim``: ``"params"``, any option
            below for that group, and ``"lars_exclude": True`` to step the group as plain AdamW.
        lr, betas, eps, weight_decay, trust_coef, trust_eps, trust_clip, always_adapt,
        bias_correction, max_grad_norm, maximize: as in :class:`torchlars.LAMB` (``lr`` a
        number; ``max_grad_norm`` is read from the defaults only, as timm's Lamb reads it).
    """

    _NAME = "torchlars.cpp.LAMB"
    _TWIN = torchlars.LAMB
    _BUILD = _C.LAMB
    # The values themselves (signs, betas in [0, 1)) are checked in C++.
    _NUMBERS = ("lr", "eps", "weight_decay", "trust_coef", "trust_eps")
    _OPTIONAL_NUMBERS = ("max_grad_norm",)
    _BOOLS = ("trust_clip", "always_adapt", "bias_correction", "maximize", "lars_exclude")
    _PAIRS = ("betas",)


def _param_groups(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    owner: str = "torchlars.cpp.LARS",
) -> list[tuple[list[torch.Tensor], dict[str, Any], bool]]:
    """(tensors, options, excluded) of every param group, checked; errors name ``owner``."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{owner}: `params` must be an iterable of tensors or of dicts, got a Tensor")
    entries = list(params)
    if not entries:
        raise ValueError(f"{owner}: `params` is empty")
    if not isinstance(entries[0], dict):
        entries = [{"params": entries}]
    groups = []
    for group_index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise TypeError(
                f"{owner}: param group {group_index} must be a dict like the first, got {torch.typename(entry)}"
            )
        options = dict(entry)
        if "params" not in options:
            raise ValueError(f"{owner}: param group {group_index} has no 'params'")
        tensors = options.pop("params")
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        for param_index, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"{owner}: parameter {param_index} of param group {group_index} "
                    f"is a {torch.typename(tensor)}, not a Tensor"
                )
        excluded = options.pop("lars_exclude", False)
        if not isinstance(excluded, bool):
            raise TypeError(
                f"{owner}: 'lars_exclude' of param group {group_index} must be a bool, got {torch.typename(excluded)}"
            )
        groups.append((tensors, options, excluded))
    return groups
