"""Interleaved timing of optimizer steps, with fresh gradients before every timed step.

Each variant steps its own copy of the same parameters. Before every timed step the
gradients are copied back from the originals (untimed), so no variant steps on a gradient
that an earlier step has rescaled in place. Rounds rotate the order of the variants; within
a round each variant takes ``steps`` timed steps, and its round value is their median.
Ratios to the baseline are taken round by round (the same few seconds of machine state),
and reported as the median ratio and the spread of the per-round ratios.
"""

from __future__ import annotations

from collections.abc import Callable
import math
import statistics
import time

import torch
from torch import Tensor

CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def make_params(shapes, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Parameters with gradients, and a copy of those gradients; identical for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape in shapes:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        param = (torch.randn(shape, generator=generator) / math.sqrt(fan_in)).to(device, dtype)
        param.requires_grad_(True)
        grad = (torch.randn(shape, generator=generator) * 1e-3).to(device, dtype)
        param.grad = grad.clone()
        params.append(param)
        grads.append(grad)
    return params, grads


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Stepper:
    """One variant's step over its own parameters, timed one step at a time."""

    def __init__(self, step: Callable[[], object], params: list[Tensor], grads: list[Tensor], device: str) -> None:
        self.step, self.params, self.grads, self.device = step, params, grads, device

    def refresh_grads(self) -> None:
        current = [param.grad for param in self.params]
        torch._foreach_copy_(current, self.grads)

    def time_one(self, clock: Callable[[], float]) -> float:
        self.refresh_grads()
        synchronize(self.device)
        start = clock()
        self.step()
        synchronize(self.device)
        return clock() - start


def interleaved(steppers: dict[str, Stepper], rounds: int, steps: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    """Per variant, its round values (the median of ``steps`` timed steps per round)."""
    values: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for round_index in range(rounds):
        # Rotate the order so that no variant always runs right after the same neighbour.
        offset = round_index % len(names)
        for name in names[offset:] + names[:offset]:
            values[name].append(statistics.median(steppers[name].time_one(clock) for _ in range(steps)))
    return values


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles and range of ``values``."""
    ordered = sorted(values)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1]}


def paired_ratios(values: list[float], baseline: list[float]) -> list[float]:
    """Round by round, ``values`` over the baseline's value of the same round."""
    return [value / base for value, base in zip(values, baseline)]
