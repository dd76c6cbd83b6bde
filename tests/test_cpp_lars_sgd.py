"""torchlars.cpp.LARSSGD (lars::LARSSGD through pybind11): parity with torchlars.LARSSGD, refusals.

Parity: torchlars.LARSSGD (foreach=True, and fused=True) and torchlars.cpp.LARSSGD start from
the same parameters, get the same gradients for 3 steps, and must end with the same
parameters and trust ratios. fp32: the adapted parameters of the fused paths (Python's
fused=True and the C++ class) go through the same liblars operator, to the bit; the foreach
path sums its norms in another order, and the excluded group steps as torch.optim.SGD (its
foreach or fused kernel) in Python and as libtorch's SGD in C++: within rtol 1e-6. bf16:
within a bf16 rounding step or two.
"""

import itertools

import pytest
import torch

from torchlars import LARSSGD
from torchlars_extension import import_extension

cpp = import_extension("torchlars.cpp")

SHAPES = [(6, 5), (5,), (4, 3), (3,)]
MOMENTUM = {
    "sgd": {},
    "momentum": {"momentum": 0.9},
    "dampening": {"momentum": 0.9, "dampening": 0.3},
    "nesterov": {"momentum": 0.9, "nesterov": True},
}
# Every combination of the options, by name.
COMBINATIONS = [
    dict(momentum=m, maximize=maximize, weight_decay=wd, clip=clip, trust_ratio=variant)
    for m, maximize, wd, clip, variant in itertools.product(
        sorted(MOMENTUM), [False, True], [0.0, 1e-2], [False, True], ["paper", "decayed"]
    )
]


def combination_id(c):
    return "-".join(
        [c["momentum"], "max" if c["maximize"] else "min", f"wd{c['weight_decay']}", "larc" if c["clip"] else "lars", c["trust_ratio"]]
    )


def options_of(combination):
    return dict(
        lr=0.1,
        **MOMENTUM[combination["momentum"]],
        maximize=combination["maximize"],
        weight_decay=combination["weight_decay"],
        clip=combination["clip"],
        trust_ratio=combination["trust_ratio"],
        trust_coef=0.02,
        eps=1e-7,
    )


def make_params(dtype):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]
    with torch.no_grad():
        params[1].zero_()  # a zero parameter norm: ratio 1
    return params


def groups_of(params):
    # The last parameter in a group stepped as plain SGD, with a weight decay of its own.
    return [{"params": params[:3]}, {"params": params[3:], "lars_exclude": True, "weight_decay": 1e-3}]


def set_grads(param_lists, step):
    generator = torch.Generator().manual_seed(100 + step)
    for index, params in enumerate(zip(*param_lists)):
        grad = torch.randn(params[0].shape, generator=generator)
        if index == 0:
            grad *= 0.01  # small gradients: clip clips their ratio
        if index == 2 and step == 1:
            grad.zero_()  # a zero gradient norm: ratio 1
        for param in params:
            param.grad = grad.to(param.dtype)


def run_both(python_path, combination, dtype, steps=3):
    params, cpp_params = make_params(dtype), make_params(dtype)
    options = options_of(combination)
    python = LARSSGD(groups_of(params), **options, **{python_path: True})
    ours = cpp.LARSSGD(groups_of(cpp_params), **options)
    for step in range(steps):
        set_grads([params, cpp_params], step)
        python.step()
        ours.step()
    return params, cpp_params, python, ours


@pytest.mark.parametrize("python_path", ["foreach", "fused"])
@pytest.mark.parametrize("combination", COMBINATIONS, ids=combination_id)
def test_fp32_parity(combination, python_path):
    params, cpp_params, python, ours = run_both(python_path, combination, torch.float32)
    for index, (expected, actual) in enumerate(zip(params, cpp_params)):
        if python_path == "fused" and index < 3:  # the adapted ones: the same operator
            assert torch.equal(actual, expected), f"parameter {index}"
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7, msg=f"parameter {index}")
    expected_ratios = python.trust_ratios()
    actual_ratios = ours.trust_ratios()
    # The adapted parameters only, in order.
    assert [id(p) for p in actual_ratios] == [id(p) for p in cpp_params[:3]]
    assert [id(p) for p in expected_ratios] == [id(p) for p in params[:3]]
    for expected_param, actual_param in zip(params[:3], cpp_params[:3]):
        torch.testing.assert_close(actual_ratios[actual_param], expected_ratios[expected_param], rtol=1e-6, atol=0)


@pytest.mark.parametrize("python_path", ["foreach", "fused"])
@pytest.mark.parametrize(
    "combination", [c for c in COMBINATIONS if c["weight_decay"] and c["momentum"] != "sgd"], ids=combination_id
)
def test_bf16_parity(combination, python_path):
    params, cpp_params, _, _ = run_both(python_path, combination, torch.bfloat16)
    for index, (expected, actual) in enumerate(zip(params, cpp_params)):
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=2e-3, msg=f"parameter {index}")


def test_steps_change_every_parameter_with_a_gradient():
    # The guard of the parity tests: they compare parameters that moved.
    params = make_params(torch.float32)
    start = [p.detach().clone() for p in params]
    optimizer = cpp.LARSSGD(groups_of(params), lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02)
    set_grads([params], 0)
    optimizer.step()
    for index, (param, before) in enumerate(zip(params, start)):
        assert not torch.equal(param, before), f"parameter {index}"


def test_param_groups_read_every_option():
    params = make_params(torch.float32)
    optimizer = cpp.LARSSGD(groups_of(params), lr=0.2, momentum=0.9, trust_ratio="decayed", clip=True)
    first, second = optimizer.param_groups
    assert [p is q for p, q in zip(first["params"], params[:3])] == [True] * 3
    assert first == {
        "params": first["params"],
        "lr": 0.2,
        "momentum": 0.9,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
        "eps": 1e-8,
        "trust_coef": 1e-3,
        "clip": True,
        "trust_ratio": "decayed",
        "lars_exclude": False,
    }
    assert second["lars_exclude"] is True and second["weight_decay"] == 1e-3 and second["lr"] == 0.2


def test_step_evaluates_the_closure_first_and_returns_its_loss():
    param = torch.nn.Parameter(torch.randn(4))
    before = param.detach().clone()
    optimizer = cpp.LARSSGD([param], lr=0.1, trust_coef=0.02)

    def closure():
        optimizer.zero_grad()
        loss = (param * param).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    torch.testing.assert_close(loss, (before * before).sum())
    assert torch.equal(param.grad, 2 * before)
    assert not torch.equal(param.detach(), before)
    optimizer.zero_grad()
    assert param.grad is None


def test_trust_ratios_empty_before_the_first_step():
    assert cpp.LARSSGD(make_params(torch.float32), lr=0.1).trust_ratios() == {}


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(lr=-0.1), ValueError, "lr must be non-negative"),
        (dict(lr=0.1, momentum=-0.5), ValueError, "momentum must be non-negative"),
        (dict(lr=0.1, weight_decay=-1e-4), ValueError, "weight_decay must be non-negative"),
        (dict(lr=0.1, eps=-1.0), ValueError, "eps must be non-negative"),
        (dict(lr=0.1, trust_coef=float("nan")), ValueError, "trust_coef must be non-negative"),
        (dict(lr=0.1, nesterov=True), ValueError, "nesterov needs a positive momentum"),
        (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "dampening 0"),
        (dict(lr=0.1, trust_ratio="update"), ValueError, 'got "update"'),
        (dict(lr=0.1, trust_ratio="papers"), ValueError, "papers"),
        (dict(lr=0.1, clip=1), TypeError, "`clip`"),
        (dict(lr="0.1"), TypeError, "`lr`"),
        (dict(lr=0.1, trust_ratio=None), TypeError, "`trust_ratio`"),
    ],
)
def test_bad_options_are_refused_by_name(options, error, message):
    with pytest.raises(error, match=message):
        cpp.LARSSGD(make_params(torch.float32), **options)


def test_bad_group_options_are_refused_naming_the_group():
    params = make_params(torch.float32)
    with pytest.raises(ValueError, match="param group 1.*eps must be non-negative"):
        cpp.LARSSGD([{"params": params[:2]}, {"params": params[2:], "eps": -1.0}], lr=0.1)
    with pytest.raises(TypeError, match="unknown option.*'betas'.*param group 0"):
        cpp.LARSSGD([{"params": params, "betas": (0.9, 0.99)}], lr=0.1)
    with pytest.raises(TypeError, match="'lars_exclude' of param group 0 must be a bool"):
        cpp.LARSSGD([{"params": params, "lars_exclude": 1}], lr=0.1)
    with pytest.raises(ValueError, match="torchlars.cpp.LARSSGD: `params` is empty"):
        cpp.LARSSGD([], lr=0.1)


def test_sparse_gradients_are_refused_with_nothing_changed():
    dense, sparse = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4, 2))
    optimizer = cpp.LARSSGD([dense, sparse], lr=0.1, momentum=0.9)
    dense.grad = torch.randn(3, 2)
    sparse.grad = torch.randn(4, 2).to_sparse()
    before = dense.detach().clone()
    with pytest.raises(ValueError, match="sparse gradients: parameter 1 of param group 0"):
        optimizer.step()
    assert torch.equal(dense.detach(), before)


def test_fp64_stays_fp64_over_15_steps():
    # lars::LARSSGD's fused operator keeps fp64 norms and ratios: it agrees with
    # LARS(torch.optim.SGD(foreach=True)) to 1e-12 of the weights' scale.
    from torchlars import LARS

    combination = dict(momentum="nesterov", maximize=False, weight_decay=1e-2, clip=False, trust_ratio="paper")
    options = options_of(combination)
    cpp_params, python_params = make_params(torch.float64), make_params(torch.float64)
    optimizer = cpp.LARSSGD(cpp_params, **options)
    sgd_options = {k: options[k] for k in ("lr", "momentum", "nesterov", "weight_decay")}
    reference = LARS(torch.optim.SGD(python_params, foreach=True, **sgd_options), eps=options["eps"],
                     trust_coef=options["trust_coef"])
    for step in range(15):
        set_grads([cpp_params, python_params], step)
        optimizer.step()
        reference.step()
    for actual, expected in zip(cpp_params, python_params):
        scale = expected.detach().abs().max()
        assert (actual.detach() - expected.detach()).abs().max() <= 1e-12 * scale
