"""Large-batch training demo: LARS holds accuracy where linearly scaled SGD degrades.

A small 1-D CNN with BatchNorm trains on MNIST-1D (generated locally) at a small baseline
batch with SGD, then at large batches with SGD (linear LR scaling + warm-up) and with
LARS(SGD) (warm-up + poly(2), biases and norms excluded), all for the same number of epochs,
as in Table 3 of You, Gitman & Ginsburg (2017); with ``--lamb`` also
:class:`torchlars.LAMB`. Run it with ``python -m torchlars.demo``.
"""

from torchlars.demo.cli import main
from torchlars.demo.experiment import DemoConfig, DemoResult, run

__all__ = ["DemoConfig", "DemoResult", "main", "run"]
