"""Log LARS's trust ratios as telemetry: TensorBoard, and a Lightning hook.

    python examples/log_trust_ratios.py [--log-dir DIR] [--steps N] [--every K]

``optimizer.trust_ratios()`` gives ``{parameter: 0-d tensor}``, the ratios the last step used,
kept on the parameters' device without a host sync; ``torchlars.named_trust_ratios(optimizer,
model)`` gives the same keyed by parameter name. Reading them is a host sync, so this reads them
once every ``--every`` steps, all together (one ``.tolist()``), not once per step per parameter.

Runs on the CPU in a few seconds. TensorBoard logging needs the ``tensorboard`` package, the
Lightning part ``lightning`` or ``pytorch_lightning``; either is skipped, with a message, when
it is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import tempfile

import torch

import torchlars


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )


def read_trust_ratios(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    """The last step's trust ratios by parameter name, as floats: one host sync for all of them."""
    named = torchlars.named_trust_ratios(optimizer, model)
    if not named:
        return {}
    values = torch.stack([ratio.float() for ratio in named.values()]).tolist()
    return dict(zip(named, values))


def tensorboard_writer(log_dir: str):
    """A ``SummaryWriter`` for ``log_dir``, or None (with a message) without tensorboard."""
    if importlib.util.find_spec("tensorboard") is None:
        print("tensorboard is not installed: skipping the TensorBoard logging (pip install tensorboard)")
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir)


def main(log_dir: str | None = None, steps: int = 20, every: int = 5) -> list[tuple[int, dict[str, float]]]:
    """Train a tiny model with LARS(SGD) and log its trust ratios every ``every`` steps.

    Returns the ``(step, {name: ratio})`` pairs read, whether or not TensorBoard was there.
    """
    torch.manual_seed(0)
    model = make_model()
    base = torch.optim.SGD(torchlars.exclude_bias_and_norm(model, 1e-4), lr=0.5, momentum=0.9)
    optimizer = torchlars.LARS(base, trust_coef=0.001)
    own_dir = None
    if log_dir is None:
        own_dir = tempfile.TemporaryDirectory()
        log_dir = own_dir.name
    writer = tensorboard_writer(log_dir)
    logged = []
    try:
        for step in range(1, steps + 1):
            x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if step % every == 0:
                ratios = read_trust_ratios(optimizer, model)
                logged.append((step, ratios))
                if writer is not None:
                    writer.add_scalars("trust_ratio", ratios, step)
    finally:
        if writer is not None:
            writer.close()
        if own_dir is not None:
            own_dir.cleanup()
    if writer is not None:
        print(f"TensorBoard logs in {log_dir}: tensorboard --logdir {log_dir}")
    for step, ratios in logged:
        print(f"step {step}: " + ", ".join(f"{name}={ratio:.3g}" for name, ratio in ratios.items()))
    return logged


def lightning_package():
    """``lightning``, else ``pytorch_lightning``, else None."""
    for name in ("lightning", "pytorch_lightning"):
        if importlib.util.find_spec(name) is not None:
            return importlib.import_module(name)
    return None


def lightning_module_class():
    """A LightningModule that logs the trust ratios, or None (with a message) without Lightning."""
    L = lightning_package()
    if L is None:
        print("lightning is not installed: skipping the Lightning example (pip install lightning)")
        return None

    class TrustRatioLogging(L.LightningModule):
        def __init__(self, log_every: int = 50) -> None:
            super().__init__()
            self.model = make_model()
            self.log_every = log_every

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            base = torch.optim.SGD(torchlars.exclude_bias_and_norm(self, 1e-4), lr=0.5, momentum=0.9)
            return torchlars.LARS(base)

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            if batch_idx % self.log_every:
                return  # every step would sync with the device every step
            optimizer = self.optimizers().optimizer  # the LARS inside Lightning's wrapper
            self.log_dict({f"trust_ratio/{name}": r for name, r in torchlars.named_trust_ratios(optimizer, self).items()})

    return TrustRatioLogging


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", default="runs/trust_ratios", help="TensorBoard log directory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="read the ratios every this many steps")
    args = parser.parse_args()
    main(args.log_dir, args.steps, args.every)
    module_class = lightning_module_class()
    if module_class is not None:
        print(f"{module_class.__name__}: a LightningModule that logs trust_ratio/<name> with self.log_dict")
