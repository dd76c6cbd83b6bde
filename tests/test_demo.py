"""The large-batch demo, in a tiny configuration: it learns and writes its table and plot."""

import json
import math

import pytest

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import torch  # noqa: E402

from torchlars.demo import DemoConfig, main, run  # noqa: E402
from torchlars.demo.cli import parse_args  # noqa: E402
from torchlars.demo.data import load_mnist1d  # noqa: E402
from torchlars.demo.train import make_model  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_DATA = dict(num_train=2000, num_test=500)  # generated in about a second


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mnist1d")


def test_tiny_demo_trains_above_chance_and_writes_its_plot(data_dir, tmp_path):
    config = DemoConfig(
        batch_sizes=(512,),
        baseline_batch_size=64,
        epochs=4,
        lamb=True,
        **TINY_DATA,
        device="cpu",
        threads=1,
        workers=1,
        data_dir=data_dir,
        out_dir=tmp_path,
        name="tiny",
        progress=False,
    )
    result = run(config)

    runs = [(r.spec.optimizer, r.spec.batch_size) for r in result.results]
    assert runs == [("sgd", 64), ("sgd", 512), ("lars", 512), ("lamb", 512)]
    assert all(len(r.test_acc) == config.epochs for r in result.results)
    baseline, _, lars, _ = result.results
    assert baseline.best_test_acc > 0.3, f"chance is 0.1 with 10 classes; got {baseline.test_acc}"
    # Seeds 0-2 reach 0.46-0.54 in these 12 steps; linearly scaled SGD 0.28-0.35.
    assert lars.best_test_acc > 0.4, f"LARS at batch 512 (12 steps) did not learn: {lars.test_acc}"
    assert result.plot_path == tmp_path / "tiny.png"
    assert result.plot_path.read_bytes().startswith(PNG_SIGNATURE)
    table_rows = [line for line in result.table_path.read_text().splitlines() if line.startswith("| ")]
    assert len(table_rows) == 1 + len(runs)  # the header, then one row per run
    assert (tmp_path / "tiny.json").exists()
    assert list(data_dir.glob("mnist1d_*.npz")), "the generated data set is cached"


def test_command_line_trains_in_worker_processes_with_the_same_results(data_dir, tmp_path, capsys):
    argv = ["--batch-sizes", "256", "--baseline-batch-size", "128", "--epochs", "1", "--lars-lr", "5", "--lamb",
            "--num-train", str(TINY_DATA["num_train"]), "--num-test", str(TINY_DATA["num_test"]),
            "--device", "cpu", "--threads", "1", "--workers", "2", "--no-progress",
            "--data-dir", str(data_dir), "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    assert "| Batch | LR policy |" in capsys.readouterr().out
    assert (tmp_path / "demo_cpu.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "demo_cpu.md").exists()

    in_workers = json.loads((tmp_path / "demo_cpu.json").read_text())["runs"]
    serial = run(DemoConfig(batch_sizes=(256,), baseline_batch_size=128, epochs=1, lars_lr=5.0, lamb=True, **TINY_DATA,
                            device="cpu", threads=1, workers=1, data_dir=data_dir, out_dir=tmp_path / "serial",
                            progress=False))
    assert [(r["optimizer"], r["batch_size"]) for r in in_workers] == [
        ("sgd", 128), ("sgd", 256), ("lars", 256), ("lamb", 256)]
    assert [r["test_acc"] for r in in_workers] == [r.test_acc for r in serial.results]


def test_lars_and_lamb_runs_record_every_adapted_layers_trust_ratio_once_per_epoch(data_dir, tmp_path):
    config = DemoConfig(batch_sizes=(256,), baseline_batch_size=128, epochs=3, lamb=True, **TINY_DATA, device="cpu", threads=1,
                        workers=1, data_dir=data_dir, out_dir=tmp_path, name="ratios", progress=False)
    result = run(config)

    # Biases and BatchNorm parameters are excluded from the trust ratio: the conv and linear weights remain.
    adapted = [name for name, param in make_model().named_parameters() if param.ndim > 1]
    assert len(adapted) == 4
    by_optimizer = {r.spec.optimizer: r for r in result.results if r.spec.batch_size == 256}
    assert by_optimizer["sgd"].trust_ratios == {}
    for optimizer in ("lars", "lamb"):
        ratios = by_optimizer[optimizer].trust_ratios
        assert list(ratios) == adapted, optimizer  # in depth order, as the plot colours them
        for name, per_epoch in ratios.items():
            assert len(per_epoch) == config.epochs, (optimizer, name)
            assert all(math.isfinite(r) and r > 0 for r in per_epoch), (optimizer, name, per_epoch)
    lamb = by_optimizer["lamb"]
    assert lamb.spec.lr == config.lamb_lr and lamb.spec.weight_decay == config.lamb_weight_decay
    # 21 steps, 14 of them warm-up: seeds 0-2 go from 2.24-2.28 to 1.20-1.40, and 47-59% test top-1.
    assert lamb.train_loss == sorted(lamb.train_loss, reverse=True), f"LAMB did not train: {lamb.train_loss}"
    assert lamb.train_loss[-1] < 0.8 * lamb.train_loss[0], f"LAMB did not train: {lamb.train_loss}"
    assert lamb.best_test_acc > 0.3, f"chance is 0.1; LAMB got {lamb.test_acc}"
    saved = {r["optimizer"]: r for r in json.loads((tmp_path / "ratios.json").read_text())["runs"] if r["batch_size"] == 256}
    assert saved["lamb"]["trust_ratios"] == lamb.trust_ratios
    assert "trust_ratios" not in saved["sgd"]


def test_lamb_rows_are_in_full_and_with_lamb_but_not_in_the_default():
    def optimizers(argv):
        return {spec.optimizer for spec in parse_args(argv).specs()}

    assert optimizers([]) == {"sgd", "lars"}
    assert optimizers(["--lamb"]) == optimizers(["--full"]) == {"sgd", "lars", "lamb"}
    assert optimizers(["--full", "--no-lamb"]) == {"sgd", "lars"}
    lamb = [spec for spec in parse_args(["--lamb", "--lamb-lr", "0.03"]).specs() if spec.optimizer == "lamb"]
    assert [spec.batch_size for spec in lamb] == list(DemoConfig().batch_sizes)
    assert all(spec.lr == 0.03 and spec.trust_coef == 1.0 for spec in lamb)


def test_export_data_writes_the_data_set_for_libtorch_and_trains_nothing(data_dir, tmp_path):
    path = tmp_path / "mnist1d.pt"
    argv = ["--export-data", str(path), "--num-train", str(TINY_DATA["num_train"]),
            "--num-test", str(TINY_DATA["num_test"]), "--data-dir", str(data_dir), "--out-dir", str(tmp_path)]
    assert main(argv) == 0

    exported = torch.load(path)  # weights_only: plain tensors, as torch::jit::pickle_load reads them
    expected = load_mnist1d(TINY_DATA["num_train"], TINY_DATA["num_test"], data_dir)
    assert list(exported) == ["x_train", "y_train", "x_test", "y_test"]
    for key, tensor in zip(exported, expected):
        assert torch.equal(exported[key], tensor), key
    assert exported["x_train"].shape == (TINY_DATA["num_train"], 1, 40)
    assert list(tmp_path.iterdir()) == [path], "exporting trains nothing and writes no results"
