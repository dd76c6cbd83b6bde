"""LARS's numbers against the per-parameter reference of tests/lars_reference.py."""

import copy

import pytest
import torch

from lars_reference import ReferenceLARS, reference_scaled_grad
from torchlars import LARS, exclude_bias_and_norm

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.5}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}),
    "sgd-nesterov": (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9, "nesterov": True}),
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.5}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-1}),
    "nadam": (torch.optim.NAdam, {"lr": 1e-2}),
    "radam": (torch.optim.RAdam, {"lr": 1e-2}),
    "adamax": (torch.optim.Adamax, {"lr": 1e-2}),
    "adadelta": (torch.optim.Adadelta, {"lr": 1.0}),
    "asgd": (torch.optim.ASGD, {"lr": 1e-2}),
    "adafactor": (torch.optim.Adafactor, {"lr": 1e-2}),
    "rprop": (torch.optim.Rprop, {"lr": 1e-2}),
}


def make_params(dtype=torch.float32):
    shapes = [(16, 8), (16,), (4, 16), (4,), (3, 3, 5)]
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in shapes]
    with torch.no_grad():
        params[3].zero_()  # a zero-initialised bias: zero parameter norm
    return params


def set_grads(params_a, params_b, step):
    generator = torch.Generator().manual_seed(1000 + step)
    for index, (a, b) in enumerate(zip(params_a, params_b)):
        grad = torch.randn(a.shape, generator=generator, dtype=a.dtype).to(a.device)
        if index == 2 and step == 1:
            grad.zero_()  # a zero gradient: zero gradient norm
        a.grad, b.grad = grad.clone(), grad.clone()


def build_groups(params, *, exclude, weight_decay):
    if exclude:
        return [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True},
        ]
    return [{"params": params, "weight_decay": weight_decay}]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("exclude", [False, True], ids=["all", "exclude"])
def test_matches_reference_for_every_optimizer(name, clip, exclude):
    base_cls, base_kwargs = OPTIMIZERS[name]
    params = make_params(torch.float64)
    reference_params = copy.deepcopy(params)
    optimizer = LARS(
        base_cls(build_groups(params, exclude=exclude, weight_decay=1e-2), **base_kwargs),
        eps=1e-8,
        trust_coef=0.02,
        clip=clip,
    )
    reference = ReferenceLARS(
        base_cls,
        build_groups(reference_params, exclude=exclude, weight_decay=1e-2),
        base_kwargs,
        eps=1e-8,
        trust_coef=0.02,
        clip=clip,
    )
    initial = [p.detach().clone() for p in params]
    for step in range(4):
        set_grads(params, reference_params, step)
        optimizer.step()
        reference.step()
    for param, expected, start in zip(params, reference_params, initial):
        torch.testing.assert_close(param, expected, rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(p, s) for p, s in zip(params, initial))
    # The base's weight decay is back where the user put it.
    assert optimizer.param_groups[0]["weight_decay"] == 1e-2


# Every option of torch.optim's bases: LARS gives LARS-by-hand's numbers on that base
# (ReferenceLARS), or refuses the option by name (test_lars_api.py).
OPTION_VARIANTS = {
    "single-tensor": lambda kwargs: {**kwargs, "foreach": False},
    "foreach": lambda kwargs: {**kwargs, "foreach": True},
    "fused": lambda kwargs: {**kwargs, "fused": True},
    "maximize": lambda kwargs: {**kwargs, "maximize": True},
    "tensor-lr": lambda kwargs: {**kwargs, "lr": torch.tensor(kwargs["lr"], dtype=torch.float64)},
}


def _accepts(base_cls, kwargs):
    """Whether the base itself takes these options (on CPU float64 tensors)."""
    try:
        param = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
        param.grad = torch.ones(2, 2, dtype=torch.float64)
        base_cls([param], **kwargs).step()
    except (RuntimeError, ValueError, TypeError) as error:
        return error
    return None


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("variant", [*sorted(OPTION_VARIANTS), "tensor-weight-decay"])
@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
def test_every_base_option_matches_reference(name, variant, clip):
    base_cls, base_kwargs = OPTIMIZERS[name]
    if variant != "tensor-weight-decay":
        base_kwargs = OPTION_VARIANTS[variant](base_kwargs)
        refusal = _accepts(base_cls, base_kwargs)
        if refusal is not None:
            pytest.skip(f"{name} itself refuses {variant}: {refusal}")
    weight_decay = torch.tensor(1e-2, dtype=torch.float64) if variant == "tensor-weight-decay" else 1e-2
    params = make_params(torch.float64)
    reference_params = copy.deepcopy(params)
    optimizer = LARS(base_cls(build_groups(params, exclude=True, weight_decay=weight_decay), **base_kwargs),
                     trust_coef=0.02, clip=clip)
    reference = ReferenceLARS(base_cls, build_groups(reference_params, exclude=True, weight_decay=weight_decay),
                              base_kwargs, trust_coef=0.02, clip=clip)
    initial = [p.detach().clone() for p in params]
    for step in range(4):
        set_grads(params, reference_params, step)
        optimizer.step()
        reference.step()
    # liblars's fused LARS-SGD operator, which LARS(SGD(fused=True)) steps with, accumulates
    # the norms in fp32 (lars_sgd.py), even for these fp64 parameters.
    fused_sgd = variant == "fused" and base_cls is torch.optim.SGD
    for param, expected in zip(params, reference_params):
        tolerance = dict(rtol=1e-6, atol=1e-8) if fused_sgd else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(param, expected, **tolerance)
    assert any(not torch.equal(p, s) for p, s in zip(params, initial))
    # The options LARS takes over for the base's step are back where the user put them.
    assert optimizer.param_groups[0]["weight_decay"] is weight_decay
    assert optimizer.param_groups[0].get("maximize", False) == base_kwargs.get("maximize", False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturable=True needs CUDA tensors")
@pytest.mark.parametrize("name", ["adam", "adamw", "nadam", "radam", "adamax", "asgd", "rmsprop", "adadelta"])
def test_capturable_bases_on_cuda_match_reference(name):
    base_cls, base_kwargs = OPTIMIZERS[name]
    base_kwargs = {**base_kwargs, "capturable": True}
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(torch.float64)]
    reference_params = copy.deepcopy(params)
    optimizer = LARS(base_cls(build_groups(params, exclude=True, weight_decay=1e-2), **base_kwargs), trust_coef=0.02)
    reference = ReferenceLARS(base_cls, build_groups(reference_params, exclude=True, weight_decay=1e-2), base_kwargs,
                              trust_coef=0.02)
    for step in range(4):
        set_grads(params, reference_params, step)
        optimizer.step()
        reference.step()
    for param, expected in zip(params, reference_params):
        torch.testing.assert_close(param, expected, rtol=1e-10, atol=1e-12)


def test_maximize_decays_the_weights_as_torch_does():
    # The measurement: with a near-zero gradient, weight decay must shrink the weight
    # under maximize=True, as plain SGD does (10.25 -> 9.74), not grow it (main gave 11.27).
    weight = torch.nn.Parameter(torch.full((10, 10), 1.025))
    weight.grad = torch.full((10, 10), 1e-9)
    LARS(torch.optim.SGD([weight], lr=0.1, weight_decay=0.5, maximize=True), trust_coef=1.0).step()
    assert weight.norm() < 10.25


def test_scaled_gradient_is_written_into_grad():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    weight.grad = torch.tensor([[0.0, 2.0]])  # norm 2
    optimizer = LARS(torch.optim.SGD([weight], lr=0.0, weight_decay=0.1), eps=0.0, trust_coef=0.5)
    optimizer.step()
    ratio = 0.5 * 5.0 / (2.0 + 0.1 * 5.0)
    expected = (torch.tensor([[0.0, 2.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])) * ratio
    torch.testing.assert_close(weight.grad, expected)


def test_zero_norms_give_ratio_one():
    zero_param = torch.nn.Parameter(torch.zeros(3))
    zero_param.grad = torch.tensor([1.0, 2.0, 3.0])
    zero_grad = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    zero_grad.grad = torch.zeros(2)
    optimizer = LARS(torch.optim.SGD([zero_param, zero_grad], lr=0.1, weight_decay=0.5), trust_coef=1e-3)
    optimizer.step()
    # ratio 1: the gradient (plus weight decay) is used unscaled, as the base would.
    torch.testing.assert_close(zero_param.grad, torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(zero_param.detach(), torch.tensor([-0.1, -0.2, -0.3]))
    torch.testing.assert_close(zero_grad.grad, torch.tensor([0.5, 1.0]))


def test_clip_caps_the_ratio_at_one_over_lr():
    weight = torch.nn.Parameter(torch.full((4,), 10.0))
    weight.grad = torch.full((4,), 1e-3)
    lr = 0.1
    # Unclipped, trust_coef * 20 / 2e-3 = 10 would exceed 1 after dividing by lr.
    optimizer = LARS(torch.optim.SGD([weight], lr=lr), trust_coef=1e-3, eps=0.0, clip=True)
    optimizer.step()
    torch.testing.assert_close(weight.grad, torch.full((4,), 1e-3))
    torch.testing.assert_close(weight.detach(), torch.full((4,), 10.0 - lr * 1e-3))


def test_excluded_group_is_left_to_the_base_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    reference_model = copy.deepcopy(model)
    groups = exclude_bias_and_norm(model, weight_decay=1e-2)
    optimizer = LARS(torch.optim.SGD(groups, lr=0.1, momentum=0.9), trust_coef=1e-2)
    reference = ReferenceLARS(
        torch.optim.SGD, exclude_bias_and_norm(reference_model, weight_decay=1e-2), {"lr": 0.1, "momentum": 0.9},
        trust_coef=1e-2,
    )
    x = torch.randn(8, 5)
    for _ in range(3):
        for m in (model, reference_model):
            m.zero_grad()
            m(x).square().mean().backward()
        optimizer.step()
        reference.step()
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(param, expected)


def test_exclude_bias_and_norm_groups():
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    adapted, excluded = exclude_bias_and_norm(model, weight_decay=5e-4)
    assert adapted["weight_decay"] == 5e-4 and not adapted.get("lars_exclude", False)
    assert [p.shape for p in adapted["params"]] == [model[0].weight.shape, model[2].weight.shape]
    assert excluded == {"params": excluded["params"], "weight_decay": 0.0, "lars_exclude": True}
    assert {id(p) for p in excluded["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_accumulate_in_fp32(dtype):
    # ||g|| = 1000 * sqrt(10000) = 1e5: beyond fp16's range, fine in fp32.
    weight = torch.nn.Parameter(torch.full((100, 100), 2.0, dtype=dtype))
    weight.grad = torch.full((100, 100), 1000.0, dtype=dtype)
    optimizer = LARS(torch.optim.SGD([weight], lr=1.0), eps=0.0, trust_coef=1.0)
    optimizer.step()
    expected_ratio = 200.0 / 1e5
    torch.testing.assert_close(weight.grad.float(), torch.full((100, 100), 1000.0 * expected_ratio), rtol=1e-2, atol=0)
    assert weight.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2], ids=["no_decay", "decay"])
def test_half_precision_ratio_is_applied_in_fp32(dtype, weight_decay):
    # The precision LARS gives in fp16/bf16 (README): the ratio, from fp32 norms, is never
    # rounded to the gradient's dtype; the scaled gradient is g * r computed in fp32 and rounded
    # once. With weight decay, g + wd * w is first computed as torch.add computes it in the
    # gradient's dtype (as torch's own optimizers add their decay).
    generator = torch.Generator().manual_seed(5)
    weight = torch.nn.Parameter(torch.randn(64, 33, generator=generator).to(dtype))
    grad = torch.randn(64, 33, generator=generator).to(dtype)
    weight.grad = grad.clone()
    initial = weight.detach().clone()
    LARS(torch.optim.SGD([weight], lr=0.1, weight_decay=weight_decay), eps=1e-8, trust_coef=0.02).step()
    param_norm, grad_norm = torch._foreach_norm([initial, grad], 2, dtype=torch.float32)
    ratio = 0.02 * param_norm / (grad_norm + weight_decay * param_norm + 1e-8)
    decayed = torch.add(grad, initial, alpha=weight_decay)
    expected = (decayed.float() * ratio).to(dtype)
    assert torch.equal(weight.grad, expected)


def test_mixed_dtypes_in_one_group_match_reference():
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(3, 4, dtype=torch.bfloat16))]
    for p in params:
        p.grad = torch.randn_like(p)
    expected = [
        reference_scaled_grad(p.detach(), p.grad, weight_decay=1e-3, lr=0.1, eps=1e-8, trust_coef=1e-3, clip=False)
        for p in params
    ]
    LARS(torch.optim.SGD(params, lr=0.1, weight_decay=1e-3)).step()
    for param, grad in zip(params, expected):
        torch.testing.assert_close(param.grad, grad, rtol=1e-2 if param.dtype == torch.bfloat16 else 1e-6, atol=0)


def test_parameters_without_grad_are_skipped():
    used = torch.nn.Parameter(torch.ones(3))
    unused = torch.nn.Parameter(torch.ones(3))
    used.grad = torch.ones(3)
    LARS(torch.optim.SGD([used, unused], lr=0.1, momentum=0.9)).step()
    assert unused.grad is None
    torch.testing.assert_close(unused.detach(), torch.ones(3))
    assert not torch.equal(used.detach(), torch.ones(3))
