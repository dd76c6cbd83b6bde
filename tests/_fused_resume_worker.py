"""Resume training with the fused LARS step from checkpoints, in a fresh process, for test_fused.py.

    python _fused_resume_worker.py DIRECTORY

For each optimizer kind, loads ``DIRECTORY/<kind>_checkpoint.pt`` (saved by ``train`` in the
test's process), continues to ``STOP`` and saves ``DIRECTORY/<kind>_resumed.pt``. Nothing
carries over from the run that saved the checkpoint but the file.
"""

import os
import sys

import torch

from torchlars import LARS, LARSSGD, exclude_bias_and_norm

KINDS = ("LARSSGD", "LARS")
STOP = 6


def train(kind: str, start: int, stop: int, checkpoint: str | None = None) -> dict:
    """Model and optimizer state dicts after steps ``start..stop-1`` (step i's batch depends on i only)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    groups = exclude_bias_and_norm(model, 1e-2)
    if kind == "LARS":
        optimizer = LARS(torch.optim.SGD(groups, lr=0.5, momentum=0.9, fused=True), trust_coef=0.02)
    else:
        optimizer = LARSSGD(groups, lr=0.5, momentum=0.9, trust_coef=0.02, fused=True)
    if checkpoint is not None:
        saved = torch.load(checkpoint)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    for step in range(start, stop):
        generator = torch.Generator().manual_seed(step)
        inputs, targets = torch.randn(16, 32, generator=generator), torch.randn(16, 8, generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


if __name__ == "__main__":
    directory = sys.argv[1]
    for kind in KINDS:
        start = torch.load(os.path.join(directory, f"{kind}_checkpoint.pt"))["step"]
        resumed = train(kind, start, STOP, os.path.join(directory, f"{kind}_checkpoint.pt"))
        torch.save(resumed, os.path.join(directory, f"{kind}_resumed.pt"))
