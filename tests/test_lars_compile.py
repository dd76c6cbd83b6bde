"""LARS under torch.compile: one graph, eager's numbers, no recompilation when the LR changes."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from torchlars import LARS

BASES = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, weight_decay=1e-3),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=1e-2),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))


def set_grads(model, step):
    generator = torch.Generator().manual_seed(step)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)


@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("name", sorted(BASES))
def test_compiled_step_is_one_graph_with_eager_numbers(name, clip):
    model = make_model()
    eager_model = copy.deepcopy(model)
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    optimizer = LARS(BASES[name]([{"params": weights}, {"params": biases, "lars_exclude": True}], torch.tensor(0.01)),
                     trust_coef=0.02, clip=clip)
    eager_weights = [p for p in eager_model.parameters() if p.ndim > 1]
    eager_biases = [p for p in eager_model.parameters() if p.ndim == 1]
    eager = LARS(BASES[name]([{"params": eager_weights}, {"params": eager_biases, "lars_exclude": True}],
                             torch.tensor(0.01)), trust_coef=0.02, clip=clip)

    @torch.compile(fullgraph=True)  # raises on any graph break
    def compiled_step():
        optimizer.step()

    for step in range(4):
        set_grads(model, step)
        set_grads(eager_model, step)
        compiled_step()
        eager.step()
        for group, eager_group in zip(optimizer.param_groups, eager.param_groups):
            group["lr"].mul_(0.5)  # what a scheduler does to a tensor lr
            eager_group["lr"].mul_(0.5)
    for param, expected in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6)
    assert optimizer.param_groups[0]["weight_decay"] == eager.param_groups[0]["weight_decay"]
    # The first call compiles; the second recompiles once the base has created its state; the
    # later calls, with a new lr each, reuse that graph.
    assert counters["stats"]["unique_graphs"] == 2


def test_scheduler_changing_a_tensor_lr_causes_no_recompilation():
    model = make_model()
    optimizer = LARS(torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-4),
                     clip=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20)

    @torch.compile  # LR schedulers wrap optimizer.step with code dynamo skips on purpose
    def step():
        optimizer.step()

    lrs = []
    graphs_after_second_step = None
    for index in range(6):
        set_grads(model, index)
        step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"].item())
        if index == 1:
            graphs_after_second_step = counters["stats"]["unique_graphs"]
    assert len(set(lrs)) == len(lrs)
    assert graphs_after_second_step >= 1
    assert counters["stats"]["unique_graphs"] == graphs_after_second_step


def test_other_bases_run_under_compile():
    model = make_model()
    eager_model = copy.deepcopy(model)
    optimizer = LARS(torch.optim.RMSprop(model.parameters(), lr=0.01, weight_decay=1e-3))
    eager = LARS(torch.optim.RMSprop(eager_model.parameters(), lr=0.01, weight_decay=1e-3))
    compiled_step = torch.compile(optimizer.step)
    for step in range(2):
        set_grads(model, step)
        set_grads(eager_model, step)
        compiled_step()
        eager.step()
    for param, expected in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6)


def _odd_params():
    """Parameters that make the compiled CPU norms (rows of 4096 elements) take every branch:
    whole rows plus a tail, a non-contiguous parameter, one under a row, and a bf16 one."""
    generator = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(70, 130, generator=generator),  # 2 rows of 4096 and a tail of 908
        torch.randn(130, 64, generator=generator).t(),  # exactly 2 rows, not contiguous
        torch.randn(5, generator=generator),  # tail only
        torch.randn(90, 100, generator=generator).to(torch.bfloat16),  # norms accumulated in fp32
    ]
    return [torch.nn.Parameter(t) for t in tensors]


def test_compiled_norms_of_large_strided_and_half_tensors_match_eager():
    params = _odd_params()
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    generator = torch.Generator().manual_seed(4)
    for param, eager_param in zip(params, eager_params):
        param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        eager_param.grad = param.grad.clone()
    optimizer = LARS(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2), trust_coef=0.02)
    eager = LARS(torch.optim.SGD(eager_params, lr=0.1, momentum=0.9, weight_decay=1e-2), trust_coef=0.02)

    torch.compile(optimizer.step, fullgraph=True)()
    eager.step()
    for param, eager_param in zip(params, eager_params):
        # The written-back gradient carries the trust ratio, so a wrong norm shows here.
        tolerance = dict(rtol=1e-2, atol=1e-5) if param.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(param.grad, eager_param.grad, **tolerance)
        torch.testing.assert_close(param, eager_param, **tolerance)


@pytest.mark.parametrize("index", range(4))
def test_row_blocked_sum_of_squares_is_the_exact_sum_to_float_rounding(index):
    from torchlars._foreach import _row_blocked_sum_of_squares

    tensor = _odd_params()[index].detach()
    dtype = torch.float32 if tensor.dtype == torch.bfloat16 else None
    exact = tensor.double().square().sum()
    total = _row_blocked_sum_of_squares(tensor, dtype)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("base_cls", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_maximize_and_tensor_weight_decay_compile_into_one_graph(base_cls):
    model = make_model()
    eager_model = copy.deepcopy(model)
    options = dict(lr=torch.tensor(0.01), weight_decay=torch.tensor(1e-2), maximize=True)
    optimizer = LARS(base_cls(model.parameters(), **options), trust_coef=0.02)
    eager = LARS(base_cls(eager_model.parameters(), **options), trust_coef=0.02)
    compiled_step = torch.compile(optimizer.step, fullgraph=True)
    for step in range(3):
        set_grads(model, step)
        set_grads(eager_model, step)
        compiled_step()
        eager.step()
    for param, expected in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6)
    assert optimizer.param_groups[0]["maximize"] is True
