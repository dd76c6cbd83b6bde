"""MNIST-1D, generated locally and cached: the demo's stand-in for ImageNet."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["default_data_dir", "export_mnist1d", "load_mnist1d"]


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/torchlars`` (``~/.cache/torchlars`` when unset)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "torchlars"


def load_mnist1d(
    num_train: int, num_test: int, data_dir: Path, seed: int = 42
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``, ``x`` of shape ``(n, 1, 40)``.

    The first call generates the data set with the ``mnist1d`` package (procedural, no
    download; about a minute for 60k samples) and caches it in ``data_dir``.
    """
    path = Path(data_dir) / f"mnist1d_train{num_train}_test{num_test}_seed{seed}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = _generate(num_train, num_test, seed)
        tmp = path.with_suffix(".tmp.npz")  # never leave a half-written cache behind
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
    with np.load(path) as arrays:
        tensors = [torch.from_numpy(arrays[key]) for key in ("x_train", "y_train", "x_test", "y_test")]
    x_train, y_train, x_test, y_test = tensors
    return x_train.unsqueeze(1), y_train, x_test.unsqueeze(1), y_test


def export_mnist1d(path: Path, num_train: int, num_test: int, data_dir: Path) -> None:
    """Write the data set of :func:`load_mnist1d` for libtorch programs.

    ``torch.save`` of a dict of the four tensors (``x_train``, ``y_train``, ``x_test``,
    ``y_test``), which C++ reads with ``torch::jit::pickle_load(bytes).toGenericDict()`` and no
    other library (``cpp/examples/train_mnist1d.cpp``).
    """
    tensors = load_mnist1d(num_train, num_test, data_dir)
    keys = ("x_train", "y_train", "x_test", "y_test")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: tensor.contiguous() for key, tensor in zip(keys, tensors)}, path)


def _generate(num_train: int, num_test: int, seed: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    num_classes = 10
    # make_dataset draws num_samples // 10 samples per class, already shuffled; split here.
    args.num_samples = -(-(num_train + num_test) // num_classes) * num_classes
    args.train_split = 1.0
    args.seed = seed
    dataset = make_dataset(args)
    x, y = dataset["x"].astype(np.float32), dataset["y"].astype(np.int64)
    return {
        "x_train": x[:num_train],
        "y_train": y[:num_train],
        "x_test": x[num_train : num_train + num_test],
        "y_test": y[num_train : num_train + num_test],
    }
