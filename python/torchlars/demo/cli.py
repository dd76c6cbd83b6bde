"""``python -m torchlars.demo``: the command line of the demo."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
import sys

import torch

from torchlars.demo.data import default_data_dir, export_mnist1d
from torchlars.demo.experiment import DemoConfig, run

__all__ = ["main", "parse_args"]

# --full: the default runs, 2K and the LAMB rows added, with three seeds.
FULL = dict(batch_sizes=(2048, 8192, 16384), seeds=(0, 1, 2), lamb=True)


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    return _config(_parser().parse_args(argv))


def _parser() -> argparse.ArgumentParser:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="python -m torchlars.demo",
        description=(
            "Large-batch training on MNIST-1D: a small-batch SGD baseline, then SGD (linear LR "
            "scaling + warm-up), LARS(SGD) and LAMB (warm-up + poly(2)) at large batch "
            "sizes, for the same number of epochs. Writes a markdown table, a PNG plot (accuracy "
            "curves and per-layer trust ratios) and the raw curves (JSON)."
        ),
    )
    parser.add_argument("--full", action="store_true", help=f"the longer version: {FULL}")
    parser.add_argument("--batch-sizes", type=int, nargs="+", metavar="B",
                        help=f"large batch sizes (default: {' '.join(map(str, defaults.batch_sizes))})")
    parser.add_argument("--baseline-batch-size", type=int, default=defaults.baseline_batch_size,
                        help="small baseline batch size (default: %(default)s)")
    parser.add_argument("--epochs", type=int, help=f"epochs of every run (default: {defaults.epochs})")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds; results are averaged (default: 0)")
    parser.add_argument("--baseline-lr", type=float, default=defaults.baseline_lr,
                        help="SGD LR at the baseline batch, scaled linearly for large batches (default: %(default)s)")
    parser.add_argument("--lars-lr", type=float, default=defaults.lars_lr,
                        help="LARS base LR, multiplied by the trust ratio (default: %(default)s)")
    parser.add_argument("--trust-coef", type=float, default=defaults.trust_coef,
                        help="LARS trust coefficient eta (default: %(default)s)")
    parser.add_argument("--lamb", action=argparse.BooleanOptionalAction,
                        help=f"the LAMB rows (default: {'on' if defaults.lamb else 'off'}; on with --full)")
    parser.add_argument("--lamb-lr", type=float, default=defaults.lamb_lr,
                        help="LAMB (AdamW) base LR, multiplied by the trust ratio (default: %(default)s)")
    parser.add_argument("--lamb-weight-decay", type=float, default=defaults.lamb_weight_decay,
                        help="LAMB's decoupled weight decay (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=defaults.num_train,
                        help="MNIST-1D training samples (default: %(default)s)")
    parser.add_argument("--num-test", type=int, default=defaults.num_test,
                        help="MNIST-1D test samples (default: %(default)s)")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="CPU threads of each run (default: half the available cores, 1 to 4)")
    parser.add_argument("--workers", type=int,
                        help="runs trained at once, in separate processes (default: available cores / threads; 1 on a GPU)")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help="where the generated MNIST-1D is cached (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where results go (default: .)")
    parser.add_argument("--name", default="", help="file stem of the results (default: demo_<device>[_full])")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or per-run lines")
    parser.add_argument("--export-data", type=Path, metavar="FILE.pt",
                        help="write the data set (--num-train, --num-test) for libtorch with torch.save, "
                             "for cpp/examples/train_mnist1d, and train nothing")
    return parser


def _config(args: argparse.Namespace) -> DemoConfig:
    defaults = DemoConfig()
    full = FULL if args.full else {}
    device = torch.device(args.device)
    return DemoConfig(
        batch_sizes=tuple(args.batch_sizes or full.get("batch_sizes", defaults.batch_sizes)),
        baseline_batch_size=args.baseline_batch_size,
        epochs=args.epochs or full.get("epochs", defaults.epochs),
        seeds=tuple(args.seeds or full.get("seeds", defaults.seeds)),
        baseline_lr=args.baseline_lr,
        lars_lr=args.lars_lr,
        trust_coef=args.trust_coef,
        lamb=full.get("lamb", defaults.lamb) if args.lamb is None else args.lamb,
        lamb_lr=args.lamb_lr,
        lamb_weight_decay=args.lamb_weight_decay,
        num_train=args.num_train,
        num_test=args.num_test,
        device=str(device),
        threads=args.threads,
        workers=args.workers,
        data_dir=args.data_dir,
        out_dir=args.out_dir,
        name=args.name or f"demo_{device.type}{'_full' if args.full else ''}",
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.export_data:
        export_mnist1d(args.export_data, args.num_train, args.num_test, args.data_dir)
        print(f"wrote {args.export_data}", file=sys.stderr)
        return 0
    config = _config(args)
    result = run(config)
    print(f"\n{result.table}\n")
    print(f"wrote {result.table_path}, {result.plot_path} in {result.seconds / 60:.1f} min", file=sys.stderr)
    return 0
