"""One training run: a small 1-D CNN on MNIST-1D with SGD, LARS(SGD) or LAMB."""

from __future__ import annotations

from dataclasses import dataclass, field
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from torchlars import LAMB, LARS, exclude_bias_and_norm, named_trust_ratios

__all__ = ["RunSpec", "RunResult", "make_model", "train_run"]


@dataclass(frozen=True)
class RunSpec:
    """What distinguishes one row of the table from another."""

    optimizer: str  # "sgd", "lars" or "lamb"
    batch_size: int
    lr: float  # peak learning rate, reached at the end of warm-up
    warmup_epochs: float
    lr_policy: str  # how ``lr`` was chosen, for the table
    trust_coef: float = 0.0  # LARS and LAMB only
    weight_decay: float | None = None  # None: the demo's (``train_run``'s); LAMB sets its own
    betas: tuple[float, float] = (0.9, 0.999)  # LAMB only: AdamW's moment decays


@dataclass
class RunResult:
    spec: RunSpec
    seed: int
    test_acc: list[float] = field(default_factory=list)  # after every epoch, in [0, 1]
    train_loss: list[float] = field(default_factory=list)
    # LARS and LAMB: layer name -> its trust ratio at the last step of every epoch, in depth order.
    trust_ratios: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def best_test_acc(self) -> float:
        return max(self.test_acc, default=0.0)


def make_model(num_classes: int = 10, width: int = 16) -> nn.Module:
    """Three strided conv-BN-ReLU blocks and a linear classifier, for inputs ``(n, 1, 40)``."""

    def block(c_in: int, c_out: int, kernel_size: int) -> list[nn.Module]:
        conv = nn.Conv1d(c_in, c_out, kernel_size, stride=2, padding=kernel_size // 2, bias=False)
        return [conv, nn.BatchNorm1d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, width, 5),  # length 40 -> 20
        *block(width, 2 * width, 3),  # -> 10
        *block(2 * width, 4 * width, 3),  # -> 5
        nn.Flatten(),
        nn.Linear(4 * width * 5, num_classes),
    )


OPTIMIZERS = ("sgd", "lars", "lamb")


def make_optimizer(spec: RunSpec, model: nn.Module, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """SGD; LARS(SGD); or :class:`~torchlars.LAMB` (AdamW's step scaled per layer by its trust ratio).

    LARS and LAMB keep biases and norms out of the weight decay and the trust ratio
    (:func:`~torchlars.exclude_bias_and_norm`); those take the base optimizer's plain step.
    """
    weight_decay = weight_decay if spec.weight_decay is None else spec.weight_decay
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=momentum, weight_decay=weight_decay)
    if spec.optimizer == "lars":
        base = torch.optim.SGD(exclude_bias_and_norm(model, weight_decay), lr=spec.lr, momentum=momentum)
        return LARS(base, trust_coef=spec.trust_coef)
    if spec.optimizer == "lamb":
        return LAMB(exclude_bias_and_norm(model, weight_decay), lr=spec.lr, betas=spec.betas, eps=1e-6,
                    weight_decay=weight_decay, trust_coef=spec.trust_coef)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}; use one of {', '.join(map(repr, OPTIMIZERS))}")


def warmup_poly_schedule(warmup_steps: int, total_steps: int, power: float = 2.0):
    """LR multiplier: linear warm-up to 1, then polynomial decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - progress) ** power

    return factor


def train_run(
    spec: RunSpec,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    seed: int,
    weight_decay: float,
    momentum: float,
    device: torch.device,
    progress: bool = True,
    desc: str = "",
    precise_bn_samples: int = 5_000,
    eval_batch_size: int = 4096,
) -> RunResult:
    """Train a fresh model with ``spec`` for ``epochs``; test accuracy after every epoch.

    LARS and LAMB runs also record every adapted layer's trust ratio at the end of each epoch
    (one host sync per epoch, for all layers together).

    Before each evaluation BatchNorm's statistics are recomputed on ``precise_bn_samples``
    training samples (see :func:`recalibrate_batch_norm`).
    """
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_model().to(device)
    optimizer = make_optimizer(spec, model, weight_decay, momentum)
    steps_per_epoch = len(x_train) // spec.batch_size  # drop the last partial batch
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {spec.batch_size} exceeds the {len(x_train)} training samples")
    total_steps = epochs * steps_per_epoch
    warmup_steps = max(1, round(spec.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_poly_schedule(warmup_steps, total_steps))
    loss_fn = nn.CrossEntropyLoss()
    result = RunResult(spec, seed)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = time.perf_counter()
    desc = desc or f"{spec.optimizer.upper()} B={spec.batch_size}"
    with tqdm(total=total_steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=generator).to(device)
            losses = []
            for step in range(steps_per_epoch):
                batch = order[step * spec.batch_size : (step + 1) * spec.batch_size]
                loss = loss_fn(model(x_train[batch]), y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.detach())
                bar.update()
            result.train_loss.append(torch.stack(losses).mean().item())
            if isinstance(optimizer, (LARS, LAMB)):
                _record_trust_ratios(result.trust_ratios, named_trust_ratios(optimizer, model))
            recalibrate_batch_norm(model, x_train[order[:precise_bn_samples]], eval_batch_size)
            result.test_acc.append(evaluate(model, x_test, y_test, eval_batch_size))
            bar.set_postfix(loss=f"{result.train_loss[-1]:.3f}", test_acc=f"{result.test_acc[-1]:.3f}")
    result.seconds = time.perf_counter() - start
    return result


def _record_trust_ratios(history: dict[str, list[float]], ratios: dict[str, torch.Tensor]) -> None:
    values = torch.stack(list(ratios.values())).tolist()  # the one sync
    for name, value in zip(ratios, values):
        history.setdefault(name, []).append(value)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    model.eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Set BatchNorm's running statistics to their exact average over ``x`` ("precise BN").

    At 16K a run takes 3 steps per epoch, so the running averages (momentum 0.1) would lag the
    weights by several epochs and test accuracy would measure that lag, not the optimizer.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size])
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
