"""docs/recipes.md runs as written: every ```python block there builds an optimizer and a
scheduler that train a small model, with a warm-up; and examples/log_trust_ratios.py logs ratios."""

import importlib.util
import math
from pathlib import Path
import re
import warnings

import pytest
import torch

import torchlars

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "docs" / "recipes.md"
EXAMPLE = ROOT / "examples" / "log_trust_ratios.py"
EXPECTED_RECIPES = ["ResNet-50", "SimCLR", "BYOL", "Barlow Twins", "VICReg", "MoCo v3", "LAMB"]


def _python_blocks():
    """(heading of the section it is in, code) for every ```python block of the page."""
    heading, blocks, code = "(top)", [], None
    for line in RECIPES.read_text(encoding="utf-8").splitlines():
        if code is not None:
            if line.startswith("```"):
                blocks.append((heading, "\n".join(code)))
                code = None
            else:
                code.append(line)
        elif line.startswith("```python"):
            code = []
        elif line.startswith("## "):
            heading = line[3:].strip()
    assert code is None, "docs/recipes.md: a ```python block is not closed"
    return blocks


BLOCKS = _python_blocks()


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 8),
        torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 3),
    )


def test_the_page_has_every_recipe_each_with_one_block():
    headings = [heading for heading, _ in BLOCKS]
    assert len(headings) >= len(EXPECTED_RECIPES)
    for name in EXPECTED_RECIPES:
        assert sum(heading.startswith(name) for heading in headings) == 1, f"docs/recipes.md: no (or several) {name} recipe blocks"
    section_headings = re.findall(r"^## (.+)$", RECIPES.read_text(encoding="utf-8"), flags=re.M)
    for name in EXPECTED_RECIPES:
        assert any(heading.startswith(name) for heading in section_headings)


@pytest.mark.parametrize("heading, code", BLOCKS, ids=[heading for heading, _ in BLOCKS])
def test_recipe_block_trains_with_a_warm_up(heading, code):
    model = _tiny_model()
    namespace = {"model": model, "steps_per_epoch": 2, "__name__": "recipe"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a block users copy must not warn
        exec(compile(code, f"docs/recipes.md [{heading}]", "exec"), namespace)
        optimizer, scheduler, total_steps = namespace["optimizer"], namespace["scheduler"], namespace["total_steps"]
        assert isinstance(optimizer, (torchlars.LARS, torchlars.LARSSGD, torchlars.LAMB))
        assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
        assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}

        before = [p.detach().clone() for p in model.parameters()]
        lrs = []
        torch.manual_seed(1)
        for _ in range(3):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
        for (name, p), p0 in zip(model.named_parameters(), before):
            assert torch.isfinite(p).all(), f"{heading}: {name} is not finite"
            assert not torch.equal(p, p0), f"{heading}: {name} did not change"
        ratios = torchlars.named_trust_ratios(optimizer, model)
        assert ratios, f"{heading}: no parameter was adapted"
        assert all(math.isfinite(float(r)) and float(r) > 0 for r in ratios.values())
        # The weights of the linear and conv layers are adapted; biases and norms are left out.
        assert {name for name, p in model.named_parameters() if p.ndim > 1} == set(ratios)

        for _ in range(3, total_steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
    peak = max(lrs)
    top = lrs.index(peak)
    assert lrs[0] < peak, f"{heading}: no warm-up (first lr {lrs[0]}, peak {peak})"
    assert all(a <= b * (1 + 1e-12) for a, b in zip(lrs[:top], lrs[1 : top + 1])), f"{heading}: the warm-up is not increasing"
    assert lrs[-1] < 0.1 * peak, f"{heading}: the learning rate does not decay (last {lrs[-1]}, peak {peak})"


def _load_example():
    spec = importlib.util.spec_from_file_location("log_trust_ratios", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_log_trust_ratios_example_reads_the_ratios(tmp_path, capsys):
    example = _load_example()
    logged = example.main(str(tmp_path), steps=6, every=3)
    assert [step for step, _ in logged] == [3, 6]
    model_names = {name for name, p in example.make_model().named_parameters() if p.ndim > 1}
    for _, ratios in logged:
        assert set(ratios) == model_names
        assert all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in ratios.values())
    out = capsys.readouterr().out
    if importlib.util.find_spec("tensorboard") is None:
        assert "tensorboard is not installed" in out
    else:
        assert any(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard event file written"


def test_log_trust_ratios_example_lightning_module():
    example = _load_example()
    module_class = example.lightning_module_class()
    if module_class is None:
        pytest.skip("lightning is not installed")
    module = module_class(log_every=1)
    L = example.lightning_package()
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    logged = {name for name in trainer.callback_metrics if name.startswith("trust_ratio/")}
    assert logged == {f"trust_ratio/model.{name}" for name, p in example.make_model().named_parameters() if p.ndim > 1}
