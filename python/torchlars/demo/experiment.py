"""The whole demo: a small-batch SGD baseline, then SGD, LARS and LAMB at each large batch size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from concurrent.futures import ProcessPoolExecutor
import json
import multiprocessing
import os
from pathlib import Path
import time

import torch

from torchlars.demo.data import default_data_dir, load_mnist1d
from torchlars.demo.report import format_table, save_plot
from torchlars.demo.train import RunResult, RunSpec, train_run

__all__ = ["DemoConfig", "DemoResult", "run"]


@dataclass
class DemoConfig:
    """Everything the demo does; the defaults are the committed CPU run."""

    batch_sizes: tuple[int, ...] = (8192, 16384)
    baseline_batch_size: int = 512
    epochs: int = 20  # 120 steps at 16K: enough for LARS to come within 1-2 points of the baseline
    seeds: tuple[int, ...] = (0,)
    # SGD: `baseline_lr` at the baseline batch, scaled linearly with the batch size (Goyal et al.).
    baseline_lr: float = 0.2
    # LARS(SGD): the base LR multiplies trust_coef * ||w|| / ||g|| (biases and norms get it as
    # is). Swept over {2, 5, 10} x trust_coef {1e-3, 1e-2} at each batch size: 5 and 1e-2 won
    # (the log is in docs/demo.md).
    lars_lr: float = 5.0
    trust_coef: float = 0.01
    # LAMB: torchlars.LAMB (trust_coef=1, trust_eps=0), biases and norms excluded as for LARS. The LR was swept over 0.005-0.16 at 8K: 0.08 won (the log is in
    # docs/demo.md).
    lamb: bool = False  # the LAMB rows (--lamb, --full): 2 more runs, off to keep the default short
    lamb_lr: float = 0.08
    lamb_weight_decay: float = 0.01
    lamb_betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 2.0  # every optimizer at large batch; then poly(2) decay to 0
    weight_decay: float = 5e-4
    momentum: float = 0.9
    num_train: int = 100_000
    num_test: int = 10_000
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    threads: int | None = None  # per run, CPU only; None: half the available cores, 1 to 4
    workers: int | None = None  # runs trained at once; None: available cores / threads (1 on a GPU)
    data_dir: Path = field(default_factory=default_data_dir)
    out_dir: Path = Path(".")
    name: str = ""  # output file stem; "" means demo_<device type>
    progress: bool = True

    def specs(self) -> list[RunSpec]:
        """The runs, in table order."""
        specs = [RunSpec("sgd", self.baseline_batch_size, self.baseline_lr, 0.0, "SGD, poly(2)")]
        for batch_size in self.batch_sizes:
            scale = batch_size / self.baseline_batch_size
            sgd_policy = "SGD, linear scaling, warm-up + poly(2)"
            lars_policy = f"LARS (η={self.trust_coef:g}), warm-up + poly(2)"
            specs.append(RunSpec("sgd", batch_size, self.baseline_lr * scale, self.warmup_epochs, sgd_policy))
            specs.append(
                RunSpec("lars", batch_size, self.lars_lr, self.warmup_epochs, lars_policy, self.trust_coef)
            )
            if self.lamb:
                lamb_policy = f"LAMB (AdamW, wd={self.lamb_weight_decay:g}), warm-up + poly(2)"
                specs.append(RunSpec("lamb", batch_size, self.lamb_lr, self.warmup_epochs, lamb_policy, 1.0,
                                     self.lamb_weight_decay, tuple(self.lamb_betas)))
        return specs


@dataclass
class DemoResult:
    results: list[RunResult]
    table: str
    table_path: Path
    plot_path: Path
    seconds: float


def run(config: DemoConfig) -> DemoResult:
    """Train every run of ``config``, then write ``<name>.md``, ``.png`` and ``.json``."""
    start = time.perf_counter()
    device = torch.device(config.device)
    load_mnist1d(config.num_train, config.num_test, config.data_dir)  # generated once, before any worker
    jobs = [(index, spec, seed) for index, spec in enumerate(config.specs(), 1) for seed in config.seeds]
    workers = min(len(jobs), config.workers or _default_workers(device))
    if workers == 1:
        results = [_train_job(config, job, progress=config.progress) for job in jobs]
    else:
        # One single-threaded process per core: the runs are independent, and unlike intra-op
        # threads, processes lose nothing when another program takes a core for a while.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_train_job, config, job, progress=False) for job in jobs]
            results = [future.result() for future in futures]
    table = format_table(results, epochs=config.epochs, num_train=config.num_train)
    stem = config.name or f"demo_{device.type}"
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path, plot_path = out_dir / f"{stem}.md", out_dir / f"{stem}.png"
    seconds = time.perf_counter() - start
    title = (
        f"MNIST-1D ({config.num_train // 1000}k train), 1-D CNN with BatchNorm, {config.epochs} epochs, "
        f"{len(config.seeds)} seed{'s' if len(config.seeds) > 1 else ''}, {device.type}"
    )
    table_path.write_text(f"{title}\n\n{table}\n")
    save_plot(results, plot_path, baseline_batch_size=config.baseline_batch_size, title=title)
    (out_dir / f"{stem}.json").write_text(json.dumps(_to_json(config, results, seconds), indent=1) + "\n")
    return DemoResult(results, table, table_path, plot_path, seconds)


def _train_job(config: DemoConfig, job: tuple[int, RunSpec, int], *, progress: bool) -> RunResult:
    index, spec, seed = job
    device = torch.device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(config.threads or _default_threads())
    data = [t.to(device) for t in load_mnist1d(config.num_train, config.num_test, config.data_dir)]
    label = f"[{index}/{len(config.specs())}] {spec.optimizer.upper():4} B={spec.batch_size:<6} seed={seed}"
    result = train_run(
        spec,
        data,
        epochs=config.epochs,
        seed=seed,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        device=device,
        progress=progress,
        desc=label,
    )
    if config.progress:
        print(f"{label}: best test top-1 {100 * result.best_test_acc:.1f}% ({result.seconds:.0f} s)", flush=True)
    return result


def _default_workers(device: torch.device) -> int:
    if device.type != "cpu":
        return 1
    return max(1, len(os.sched_getaffinity(0)) // _default_threads())


def _default_threads() -> int:
    # The kernels are tiny: more threads only add synchronisation, and threads that spin while
    # another process holds their core slow everything down (5x on a busy 2-core machine).
    return max(1, min(4, len(os.sched_getaffinity(0)) // 2))


def _to_json(config: DemoConfig, results: list[RunResult], seconds: float) -> dict:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    runs = [
        {**asdict(result.spec), "seed": result.seed, "test_acc": result.test_acc,
         "train_loss": result.train_loss, "seconds": round(result.seconds, 1),
         **({"trust_ratios": result.trust_ratios} if result.trust_ratios else {})}
        for result in results
    ]
    return {"config": settings, "seconds": round(seconds, 1), "runs": runs}
