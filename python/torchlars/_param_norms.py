"""The parameter norms that the fused LARS step carries from one step to the next.

liblars's fused operator (``torch.ops.torchlars.lars_sgd_``) accumulates ``||w_new||`` while it
writes ``w_new``, so the next step need not read the parameters once more for ``||w||``. A
carried norm is only used while nothing else can have written the parameter since: each one
is kept with the parameter objects and their autograd version counters and data pointers as
the step left them. Any in-place edit (``p.mul_()``, ``p.copy_()`` under ``no_grad``, a
``Module.load_state_dict``, an EMA swap, ``set_`` by a reparametrisation) bumps the version
counter; ``p.data = t`` and ``torch.utils.swap_tensors`` change the data pointer or the
counter; a parameter replaced in its group is another object. Then the step recomputes the
norms itself (``recompute_param_norms=True``), from the parameters it reads anyway, in the
summation order of ``torch.ops.torchlars.lars_param_norms``: a recomputed norm is bit for bit
the carried one, so a checkpoint resumed in a new process continues exactly like the
uninterrupted run.

One blind spot is autograd's own: an in-place edit through ``p.data`` (``p.data.mul_(2)``)
bumps no version counter. Edit parameters under ``torch.no_grad()`` instead, or call the
optimizer's ``load_state_dict`` (which forgets every carried norm).

Under ``torch.compile`` the step is one opaque operator inside the graph, and the compiled code
bumps the version counters of every tensor that operator mutates, a number of times that
depends on the torch release and the backend (2 with Inductor in torch 2.13 and 2.14, 1 with the
eager backend). ``WitnessedNorms`` carries the norms there: the optimizer hands the operator one
private tensor per param group, its *step witness*, which the operator declares as mutated like
the parameters, so that the compiled code bumps it alike, and which nothing else can reach. A
norm is trusted only if the parameter's counter advanced exactly as much as the witness's since
the last step (and the parameter is still the same tensor, with the same data); any edit of
the parameter, inside the graph or outside, makes the two differ.
"""

from __future__ import annotations

from collections.abc import Hashable
import weakref

from torch import Tensor

__all__ = ["CarriedParamNorms", "WitnessedNorms"]


def _stamps(params: list[Tensor]) -> bytes:
    """What identifies the parameters as they are now: each one's address, version and data pointer."""
    from torchlars import _C  # the fused step that carries norms needs the extension anyway

    return _C._param_stamps(params)


class CarriedParamNorms:
    """``||w||`` per parameter as the last fused step wrote ``w``, per bucket of one param group.

    A bucket is what one operator call steps (tensors of one device and dtype); ``key`` names it.
    The parameters are kept alive with their stamps, so no other tensor can take their address.
    """

    def __init__(self) -> None:
        self._buckets: dict[Hashable, tuple[bytes, list[Tensor], Tensor]] = {}

    def lookup(self, key: Hashable, params: list[Tensor]) -> Tensor | None:
        """The fp32 norms of ``params`` as the last step left them, or None if any may be stale."""
        carried = self._buckets.get(key)
        if carried is not None and carried[0] == _stamps(params):
            return carried[2]
        return None

    def carry(self, key: Hashable, params: list[Tensor], norms: Tensor) -> None:
        """Remember ``norms`` (just written by the step) as the norms of ``params`` as they are now."""
        self._buckets[key] = (_stamps(params), list(params), norms)


# WitnessedNorms's carried norms, by the address of the step witness and the bucket's key: the
# compiled operator gets no optimizer, only its tensors.
_WITNESSED: dict[tuple[int, Hashable], tuple[list[weakref.ref], bytes, int, Tensor]] = {}


class WitnessedNorms:
    """The norms the compiled step carries, trusted while each parameter's version counter moved
    as much as the step witness's did (see the module's docstring). Same interface as
    CarriedParamNorms."""

    def __init__(self, witness: Tensor) -> None:
        self._witness = witness
        self._address = _address(witness)

    def lookup(self, key: Hashable, params: list[Tensor]) -> Tensor | None:
        carried = _WITNESSED.get((self._address, key))
        if carried is None:
            return None
        refs, param_stamps, witness_version, norms = carried
        if len(refs) != len(params) or any(ref() is not param for ref, param in zip(refs, params)):
            return None
        from torchlars import _C

        if not _C._stamps_moved_by(param_stamps, _stamps(params), self._witness._version - witness_version):
            return None
        return norms

    def carry(self, key: Hashable, params: list[Tensor], norms: Tensor) -> None:
        entry = (self._address, key)
        if entry not in _WITNESSED:
            weakref.finalize(self._witness, _WITNESSED.pop, entry, None)
        # Weak: a backend that hands the operator copies must not have them kept alive here.
        refs = [weakref.ref(param) for param in params]
        _WITNESSED[entry] = (refs, _stamps(params), self._witness._version, norms)


def _address(tensor: Tensor) -> int:
    return int.from_bytes(_stamps([tensor])[:8], "little", signed=True)
