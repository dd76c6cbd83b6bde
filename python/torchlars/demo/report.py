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


# One line style per optimizer, in every panel.
STYLES = {
    "sgd": dict(color="tab:red", linestyle="--"),
    "lars": dict(color="tab:blue", linestyle="-"),
    "lamb": dict(color="tab:green", linestyle="-."),
}


def save_plot(results: Sequence[RunResult], path: Path, *, baseline_batch_size: int, title: str) -> None:
    """Two rows of panels.

    Top: test accuracy per epoch, one panel per large batch size, baseline repeated in each.
    Bottom: per-layer trust ratios over training (log scale), one panel per optimizer that has
    them (LARS, LAMB) at the largest batch size, one line per adapted layer coloured by depth.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    by_spec = _by_spec(results)
    baseline = [spec for spec in by_spec if spec.batch_size == baseline_batch_size]
    large_batches = sorted({spec.batch_size for spec in by_spec} - {baseline_batch_size})
    panels = large_batches or [baseline_batch_size]
    largest = max(spec.batch_size for spec in by_spec)
    ratio_specs = [spec for spec, runs in by_spec.items() if spec.batch_size == largest and runs[0].trust_ratios]
    columns = max(len(panels), len(ratio_specs))
    rows = 2 if ratio_specs else 1
    fig = plt.figure(figsize=(4.2 * columns, 3.6 * rows))
    grid = fig.add_gridspec(rows, columns)
    accuracy_axes = []
    for column, batch_size in enumerate(panels):
        ax = fig.add_subplot(grid[0, column], sharey=accuracy_axes[0] if accuracy_axes else None)
        accuracy_axes.append(ax)
        for spec in baseline:
            _plot_curve(ax, by_spec[spec], f"baseline B={_batch_label(spec.batch_size)}", color="0.45", linestyle=":")
        for spec, runs in by_spec.items():
            if spec.batch_size == batch_size and spec not in baseline:
                _plot_curve(ax, runs, f"{spec.optimizer.upper()} B={_batch_label(batch_size)}", **STYLES[spec.optimizer])
        ax.set_title(f"batch {_batch_label(batch_size)}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="center right", fontsize=8)  # clear of the curves, which start low and end high
    accuracy_axes[0].set_ylabel("test top-1 accuracy (%)")
    accuracy_axes[0].set_ylim(0, 100)
    for column, spec in enumerate(ratio_specs):
        ax = fig.add_subplot(grid[1, column])
        _plot_trust_ratios(ax, by_spec[spec][0], plt.get_cmap("viridis"))
        ax.set_title(f"{spec.optimizer.upper()} B={_batch_label(spec.batch_size)}: trust ratio per layer", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("trust ratio (last step of epoch)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_trust_ratios(ax, run: RunResult, colormap) -> None:
    """One line per adapted layer (the first seed's run), input side dark, output side light."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    layers = list(run.trust_ratios.items())
    for depth, (name, ratios) in enumerate(layers):
        color = colormap(depth / max(1, len(layers) - 1) * 0.9)  # 0.9: the last colour stays visible
        ax.plot(range(1, len(ratios) + 1), ratios, color=color, label=name)
    ax.set_yscale("log")
    # Ticks at 1, 2, 5 x 10^k in plain numbers: the ratios often span less than a decade.
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="major")
    # Below the axes, where it hides no line.
    ax.legend(fontsize=7, ncol=len(layers), loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False,
              handlelength=1.5, columnspacing=1.0)


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
