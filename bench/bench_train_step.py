"""A whole training step (forward, backward, optimizer step) with each optimizer, on CPU or CUDA.

Models: ResNet-50 (bottleneck blocks from torch.nn, the 161 parameter tensors of
``param_sets.resnet50_shapes``; no torchvision needed) at a small batch, and the demo's 1-D CNN
(``torchlars.demo.train.make_model``) at batch 8K. Every variant trains its own copy of the same
model on the same batch. Rounds are interleaved with a rotated order (as ``step_timing.py``
does); a round times ``--steps`` iterations per variant, forward+backward and step apart, and
takes their medians. Reported: medians over rounds with the spread, the step's share of the
iteration, and the iteration over the baseline's (``SGD(fused=True)``), round by round.

    python bench/bench_train_step.py                       # what bench/results/train_step_cpu.* holds
    python bench/bench_train_step.py --device cuda --out bench/results/train_step_cuda
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

import torch
from torch import nn

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from param_sets import resnet50_shapes  # noqa: E402
from step_timing import spread, synchronize  # noqa: E402

import torchlars  # noqa: E402
from torchlars import LARS, LARSSGD  # noqa: E402
from torchlars.demo.train import make_model as make_demo_cnn  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, downsample: bool) -> None:
        super().__init__()
        out = planes * 4
        self.layers = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out))
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                           if downsample else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layers(x) + self.downsample(x))


def resnet50(num_classes: int = 1000) -> nn.Module:
    blocks: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    inplanes = 64
    for stage, (planes, count) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            blocks.append(Bottleneck(inplanes, planes, stride, downsample=index == 0))
            inplanes = planes * 4
    blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, num_classes)]
    model = nn.Sequential(*blocks)
    assert [tuple(p.shape) for p in model.parameters()] == resnet50_shapes()
    return model


def models(image_size: int, resnet_batch: int, cnn_batch: int):
    """name -> (model factory, input batch, targets), the same for every variant."""
    generator = torch.Generator().manual_seed(0)
    return {
        "resnet50": (resnet50, torch.randn(resnet_batch, 3, image_size, image_size, generator=generator),
                     torch.randint(0, 1000, (resnet_batch,), generator=generator)),
        "demo_cnn": (make_demo_cnn, torch.randn(cnn_batch, 1, 40, generator=generator),
                     torch.randint(0, 10, (cnn_batch,), generator=generator)),
    }


def sgd(params, **options):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **options)


def larssgd(params, **options):
    return LARSSGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **options)


# name -> (label, optimizer factory)
VARIANTS = {
    "sgd_fused": ("SGD(fused=True) (baseline)", lambda p: sgd(p, fused=True)),
    "sgd_foreach": ("SGD(foreach=True)", lambda p: sgd(p, foreach=True)),
    "larssgd_fused": ("LARSSGD(fused=True)", lambda p: larssgd(p, fused=True)),
    "larssgd_foreach": ("LARSSGD(foreach=True)", lambda p: larssgd(p, foreach=True)),
    "lars_sgd_fused": ("LARS(SGD(fused=True))", lambda p: LARS(sgd(p, fused=True))),
    "lars_sgd_foreach": ("LARS(SGD(foreach=True))", lambda p: LARS(sgd(p, foreach=True))),
}
FUSED = {"larssgd_fused", "lars_sgd_fused"}


class Trainer:
    def __init__(self, variant: str, make_model, inputs, targets, device: str) -> None:
        torch.manual_seed(0)
        self.model = make_model().to(device)
        self.inputs, self.targets, self.device = inputs.to(device), targets.to(device), device
        _, make_optimizer = VARIANTS[variant]
        self.optimizer = make_optimizer(self.model.parameters())

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(self.model(self.inputs), self.targets).backward()

    def step(self) -> None:
        self.optimizer.step()

    def time_one(self) -> tuple[float, float]:
        synchronize(self.device)
        start = time.perf_counter()
        self.forward_backward()
        synchronize(self.device)
        middle = time.perf_counter()
        self.step()
        synchronize(self.device)
        return middle - start, time.perf_counter() - middle


def bench_model(name: str, model_spec, device: str, threads: int, chosen: list[str], args) -> list[dict]:
    torch.set_num_threads(threads)
    make_model, inputs, targets = model_spec
    trainers = {}
    for variant in chosen:
        trainers[variant] = Trainer(variant, make_model, inputs, targets, device)
        for _ in range(args.warmup):
            trainers[variant].forward_backward()
            trainers[variant].step()
    rounds: dict[str, dict[str, list[float]]] = {v: {"fwd_bwd": [], "step": [], "iteration": []} for v in chosen}
    for round_index in range(args.rounds):
        offset = round_index % len(chosen)
        for variant in chosen[offset:] + chosen[:offset]:
            times = [trainers[variant].time_one() for _ in range(args.steps)]
            fwd_bwd = statistics.median(t[0] for t in times)
            step = statistics.median(t[1] for t in times)
            iteration = statistics.median(t[0] + t[1] for t in times)
            for key, value in (("fwd_bwd", fwd_bwd), ("step", step), ("iteration", iteration)):
                rounds[variant][key].append(value)
        print(f"  {name} threads={threads} round {round_index + 1}/{args.rounds}", flush=True)
    baseline = rounds[chosen[0]]
    rows = []
    for variant in chosen:
        values = rounds[variant]
        rows.append({
            "model": name, "threads": threads, "variant": variant, "label": VARIANTS[variant][0],
            "fwd_bwd_s": spread(values["fwd_bwd"]), "step_s": spread(values["step"]),
            "iteration_s": spread(values["iteration"]),
            "step_share": spread([s / i for s, i in zip(values["step"], values["iteration"])]),
            "iteration_ratio": spread([i / b for i, b in zip(values["iteration"], baseline["iteration"])]),
            "step_ratio": spread([s / b for s, b in zip(values["step"], baseline["step"])]),
            "rounds": values,
        })
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Training step, {report['device']}", "", f"`{report['command']}`", "",
             f"{report['date']}; {report['machine']}; load average before/after: {report['load_before']} / "
             f"{report['load_after']}. {report['rounds']} interleaved rounds x {report['steps']} iterations; "
             "medians over rounds [IQR]; ratios round by round to SGD(fused=True).", ""]
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in report["results"]:
        groups.setdefault((row["model"], row["threads"]), []).append(row)
    for (model, threads), rows in groups.items():
        lines += [f"## {model} ({report['batches'][model]}), {threads} thread{'s' if threads > 1 else ''}", "",
                  "| optimizer | fwd+bwd ms | step ms | step's share | iteration ms | iteration vs baseline | "
                  "step vs baseline |", "|---|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            def ms(key):
                return f"{row[key]['median'] * 1e3:.1f}"

            def ratio(key):
                return f"{row[key]['median']:.3f}x [{row[key]['q1']:.3f}-{row[key]['q3']:.3f}]"

            lines.append(f"| {row['label']} | {ms('fwd_bwd_s')} | {ms('step_s')} | "
                         f"{row['step_share']['median'] * 100:.1f}% | {ms('iteration_s')} | "
                         f"{ratio('iteration_ratio')} | {ratio('step_ratio')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", nargs="+", choices=("resnet50", "demo_cnn"), default=["resnet50", "demo_cnn"])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), help="the baseline, sgd_fused, always runs")
    parser.add_argument("--threads", nargs="+", type=int, help="thread counts (default: torch's default, then 1)")
    parser.add_argument("--image-size", type=int, default=128, help="ResNet-50 input side (224 for ImageNet's)")
    parser.add_argument("--resnet-batch", type=int, default=4)
    parser.add_argument("--cnn-batch", type=int, default=8192, help="the demo's large batch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per variant per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, help="output prefix (default: bench/results/train_step_<device>)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    chosen = ["sgd_fused", *[v for v in (args.variants or VARIANTS) if v != "sgd_fused"]]
    if args.device != "cpu" and importlib.util.find_spec("triton") is None:
        # GPU tensors take fused=True with the Triton kernels only; without triton those
        # variants would be refused by name.
        chosen = [v for v in chosen if v not in FUSED]
    threads = args.threads or sorted({torch.get_num_threads(), 1}, reverse=True)
    out = args.out or BENCH_DIR / "results" / f"train_step_{args.device}"
    out.parent.mkdir(parents=True, exist_ok=True)

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    specs = models(args.image_size, args.resnet_batch, args.cnn_batch)
    results = []
    for name in args.models:
        for count in threads:
            results += bench_model(name, specs[name], args.device, count, chosen, args)
    report = {
        "device": args.device, "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"torch {torch.__version__}, torchlars {torchlars.__version__}, {os.cpu_count()} CPUs",
        "load_before": load_before, "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "batches": {"resnet50": f"batch {args.resnet_batch}, {args.image_size}x{args.image_size}",
                    "demo_cnn": f"batch {args.cnn_batch}"},
        "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "results": results,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out}.md, .json")


if __name__ == "__main__":
    main()
