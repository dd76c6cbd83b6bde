"""The demo's outputs: a markdown table in the paper's shape and a plot of the curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
import statistics

from torchlars.demo.train import RunResult, RunSpec

__all__ = ["format_table", "save_plot"]


def format_table(results: Sequence[RunResult], *, epochs: int, num_train: int) -> str:
    """One markdown row per run (seeds averaged), like Table 3 of You et al. (2017)."""
    header = (
        "| Batch | LR policy | LR | Warm-up | Epochs | Steps | Best test top-1 |\n"
        "|---:|---|---:|---:|---:|---:|---:|"
    )
    rows = [header]
    for spec, runs in _by_spec(results).items():
        steps = epochs * (num_train // spec.batch_size)
        warmup = f"{spec.warmup_epochs:g} epochs" if spec.warmup_epochs else "none"
        rows.append(
            f"| {_batch_label(spec.batch_size)} | {spec.lr_policy} | {spec.lr:g} | {warmup} "
            f"| {epochs} | {steps} | {_accuracy_cell(runs)} |"
        )
    return "\n".join(rows)


def save_plot(results: Sequence[RunResult], path: Path, *, baseline_batch_size: int, title: str) -> None:
    """Test accuracy per epoch: one panel per large batch size, baseline repeated in each."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    by_spec = _by_spec(results)
    baseline = [spec for spec in by_spec if spec.batch_size == baseline_batch_size]
    large_batches = sorted({spec.batch_size for spec in by_spec} - {baseline_batch_size})
    panels = large_batches or [baseline_batch_size]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    styles = {"sgd": dict(color="tab:red", linestyle="--"), "lars": dict(color="tab:blue", linestyle="-")}
    for ax, batch_size in zip(axes[0], panels):
        for spec in baseline:
            _plot_curve(ax, by_spec[spec], f"baseline B={_batch_label(spec.batch_size)}", color="0.45", linestyle=":")
        for spec, runs in by_spec.items():
            if spec.batch_size == batch_size and spec not in baseline:
                _plot_curve(ax, runs, f"{spec.optimizer.upper()} B={_batch_label(batch_size)}", **styles[spec.optimizer])
        ax.set_title(f"batch {_batch_label(batch_size)}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(loc="center right", fontsize=8)  # clear of the curves, which start low and end high
    axes[0][0].set_ylabel("test top-1 accuracy (%)")
    axes[0][0].set_ylim(0, 100)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curve(ax, runs: list[RunResult], label: str, **style) -> None:
    curves = [run.test_acc for run in runs]
    length = min(len(curve) for curve in curves)
    mean = [100 * statistics.fmean(curve[i] for curve in curves) for i in range(length)]
    ax.plot(range(1, length + 1), mean, label=label, **style)


def _by_spec(results: Sequence[RunResult]) -> dict[RunSpec, list[RunResult]]:
    grouped: dict[RunSpec, list[RunResult]] = {}
    for result in results:
        grouped.setdefault(result.spec, []).append(result)
    return grouped


def _accuracy_cell(runs: list[RunResult]) -> str:
    best = [100 * run.best_test_acc for run in runs]
    if len(best) == 1:
        return f"{best[0]:.1f}%"
    return f"{statistics.fmean(best):.1f}% ({min(best):.1f}–{max(best):.1f}, {len(best)} seeds)"


def _batch_label(batch_size: int) -> str:
    return f"{batch_size // 1024}K" if batch_size >= 1024 and batch_size % 1024 == 0 else str(batch_size)
