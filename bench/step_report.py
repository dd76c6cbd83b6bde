"""The report of ``bench_step.py``: the issue's targets, the markdown tables, the chart."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import platform
import subprocess

import torch

import torchlars
from step_variants import EPS, LR, MOMENTUM, TRUST_COEF, WEIGHT_DECAY

# (set, dtype, mode): the largest ratio to the fastest SGD of the mode that the issue accepts,
# and the LARS variants held to it.
TARGETS = {
    ("resnet50", "fp32", "eager"): (1.25, ("lars_fused", "larssgd")),
    ("resnet50", "bf16", "eager"): (1.3, ("lars_fused", "larssgd")),
    ("small", "fp32", "eager"): (1.3, ("lars_fused", "larssgd")),
    ("resnet50", "fp32", "compiled"): (1.35, ("larssgd_compiled", "lars_compiled")),
}
# Ours against timm.optim.Lars, per mode.
OURS = {"eager": ("lars_fused", "larssgd", "lars_python"), "compiled": ("larssgd_compiled", "lars_compiled")}
TIMM = {"eager": "timm_lars", "compiled": "timm_lars_compiled"}


def evaluate_targets(results: list[dict]) -> list[dict]:
    rows = {(row["set"], row["dtype"], row["variant"]): row for row in results}
    targets = []
    for (set_name, dtype, mode), (limit, names) in TARGETS.items():
        floor = rows.get((set_name, dtype, "read_pass"), {}).get("floor_ratio") if mode == "eager" else None
        for name in names:
            row = rows.get((set_name, dtype, name), {})
            ratio = row.get("ratio")
            targets.append({
                "target": f"{set_name} {dtype}: {row.get('label', name)} / fastest {mode} SGD",
                "value": ratio, "limit": limit, "floor": floor,
                "verdict": "n/a" if ratio is None else "met" if ratio <= limit else f"MISSED by {ratio / limit - 1:.0%}",
            })
    for set_name, dtype in sorted({(row["set"], row["dtype"]) for row in results}):
        for mode, timm_name in TIMM.items():
            timm = rows.get((set_name, dtype, timm_name), {}).get("median_s")
            ours = [rows.get((set_name, dtype, name), {}) for name in OURS[mode]]
            ours = [row for row in ours if "median_s" in row]
            best = min(ours, key=lambda row: row["median_s"], default=None)
            value = timm / best["median_s"] if timm and best else None
            targets.append({
                "target": f"{set_name} {dtype} {mode}: timm.optim.Lars / {best['label'] if best else 'ours'}",
                "value": value, "limit": 1.0, "floor": None,
                "verdict": "n/a" if value is None else "met" if value > 1.0 else "MISSED",
            })
    return targets


def machine_info(device: str, repo_dir: pathlib.Path) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torchlars": getattr(torchlars, "__version__", "?"), "torchlars_path": str(pathlib.Path(torchlars.__file__).parent),
            "cpu": platform.processor(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["load_average"] = pathlib.Path("/proc/loadavg").read_text().split()[:3]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(["git", "-C", str(repo_dir), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, check=True).stdout.strip()
    if importlib.util.find_spec("timm"):
        import timm

        info["timm"] = timm.__version__
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def markdown(report: dict) -> str:
    info = report["machine"]
    lines = [f"# LARS step benchmark ({report['device']})", "",
             f"- Command: `{report['command']}`",
             f"- Date: {report['date']}; load average at the end {' '.join(info.get('load_average', ['?']))}",
             f"- Machine: {info.get('gpu', info['cpu'])}; {info['cpu_count']} CPU cores ({info['cpu']}); "
             f"torch {info['torch']}, {info['torch_threads']} threads; Python {info['python']}; "
             f"torchlars {info['torchlars']} ({info.get('git_commit', '?')}); timm {info.get('timm', 'not installed')}",
             f"- lr={LR}, momentum={MOMENTUM}, weight_decay={WEIGHT_DECAY}; LARS eps={EPS}, trust_coef={TRUST_COEF}; "
             f"{report['rounds']} interleaved rounds of {report['steps']} steps, each step timed alone after its "
             "gradients were refreshed; "
             + ("wall time." if report["clock"] == "wall" else "the stepping thread's CPU time (`--clock thread`)."),
             "- *step*: median of the round medians, [interquartile range], min–max. *vs fastest SGD*: per round, "
             "the step over the fastest SGD of the same mode (eager or compiled) in that round; median "
             "[interquartile range] over the rounds. *floor*: the fastest eager SGD plus one read of the "
             "weights and gradients (`torch._foreach_norm`), the least a LARS step can cost on this machine.",
             ""]
    for (set_name, dtype_name), rows in _cases(report["results"]).items():
        first = rows[0]
        lines += [f"## {set_name}, {dtype_name}: {first['tensors']} tensors, {first['bytes'] / 1e6:.1f} MB", "",
                  "| variant | mode | step (ms): median [IQR] | min–max | vs fastest SGD |",
                  "|---|---|---:|---:|---:|"]
        for row in rows:
            if row["status"] != "ok":
                lines.append(f"| {row['label']} | {row['mode']} | {row['status']} | | |")
                continue
            if "ratio" in row:
                ratio = f"{row['ratio']:.2f}x [{row['ratio_q1']:.2f}–{row['ratio_q3']:.2f}]"
                if row.get("is_baseline"):
                    ratio += " (baseline)"
            elif "floor_ratio" in row:
                ratio = f"floor {row['floor_ratio']:.2f}x [{row['floor_q1']:.2f}–{row['floor_q3']:.2f}]"
            else:
                ratio = "–"
            lines.append(f"| {row['label']} | {row['mode']} | {_ms(row['median_s'])} [{_ms(row['q1_s'])}–{_ms(row['q3_s'])}] | "
                         f"{_ms(row['min_s'])}–{_ms(row['max_s'])} | {ratio} |")
        lines.append("")
    lines += ["## Targets", "", "| target | value | limit | floor | verdict |", "|---|---:|---:|---:|---|"]
    for target in report["targets"]:
        value = "–" if target["value"] is None else f"{target['value']:.2f}"
        floor = "–" if target["floor"] is None else f"{target['floor']:.2f}"
        lines.append(f"| {target['target']} | {value} | {target['limit']} | {floor} | {target['verdict']} |")
    lines.append("")
    checks = report["cuda_checks"]
    lines += ["## Host syncs, CUDA graphs, kernel launches (fp32)", ""]
    if isinstance(checks, str):
        lines += [checks, ""]
    else:
        lines += ["| variant / set | syncs per step | CUDA graph replay | kernels per step |", "|---|---:|---|---:|"]
        for key, syncs in checks["syncs_per_step"].items():
            graph = checks["cuda_graph"].get(key, "–")
            if isinstance(graph, dict):
                graph = ("matches eager" if graph["matches"] else "DIFFERS") + f" (max diff {graph['max_abs_diff']:.1e})"
            lines.append(f"| {key} | {syncs} | {graph} | {checks['kernels_per_step'].get(key, '–')} |")
        lines.append("")
    return "\n".join(lines)


def _cases(results: list[dict]) -> dict:
    cases: dict = {}
    for row in results:
        cases.setdefault((row["set"], row["dtype"]), []).append(row)
    return cases


def chart(report: dict, path: pathlib.Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = _cases(report["results"])
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 5.5), squeeze=False)
    for ax, ((set_name, dtype_name), rows) in zip(axes[0], cases.items()):
        rows = [row for row in rows if "ratio" in row]
        ratios = [row["ratio"] for row in rows]
        errors = [[row["ratio"] - row["ratio_q1"] for row in rows], [row["ratio_q3"] - row["ratio"] for row in rows]]
        colors = ["tab:gray" if row["variant"].startswith("sgd") else
                  "tab:red" if row["variant"] in ("loop_0_1_2",) or row["variant"].startswith("timm") else "tab:blue"
                  for row in rows]
        ax.barh(range(len(rows)), ratios, xerr=errors, color=colors, error_kw={"linewidth": 0.8})
        ax.set_yticks(range(len(rows)), [f"{row['label']} ({row['mode']})" for row in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.8)
        for index, ratio in enumerate(ratios):
            ax.text(ratio, index, f" {ratio:.2f}x", va="center", fontsize=7)
        ax.set_title(f"{set_name}, {dtype_name}", fontsize=10)
        ax.set_xlabel("step / fastest SGD of the same mode (IQR bars)")
    fig.suptitle(f"LARS step vs SGD on {report['machine'].get('gpu', report['machine']['cpu'])}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
