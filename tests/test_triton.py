"""The Triton kernels of torchlars._triton (issue 16), on CPU tensors through Triton's interpreter.

With ``TRITON_INTERPRET=1`` and ``TORCHLARS_TRITON_ON_CPU=1`` CPU tensors take the path CUDA
tensors take: kernels, tables and bookkeeping. The interpreter runs numpy for every program, so
the tensors are small. The CUDA tests at the end run where a GPU is (scripts/gpu_run.sh).
"""

import copy
import importlib.util
import subprocess
import sys
import warnings

import pytest
import torch

import torchlars._dispatch
from torchlars import LARS, LARSSGD
from torchlars._functional import LARSSettings, MomentumSGD
from kernel_count import count_kernels
from lars_reference import SGD_OPTIONS, ReferenceLARS, reference_scaled_grad

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs `pip install triton`")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(6, 5), (5,), (3, 2, 2), (3,), (2100,)]  # the last spans two chunks of _triton.BLOCK


@pytest.fixture
def triton_module(monkeypatch):
    """torchlars._triton, run by Triton's interpreter on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TORCHLARS_TRITON_ON_CPU", "1")
    # The interpreter is chosen when the kernels are defined: at the module's first import.
    already_compiled = "torchlars._triton" in sys.modules
    module = importlib.import_module("torchlars._triton")
    if already_compiled and type(module._lars_sgd_kernel).__name__ != "InterpretedFunction":
        pytest.skip("torchlars._triton was imported for a GPU in this process; run these tests on their own")
    try:
        torch.library.wrap_triton(module._norms_kernel)
    except RuntimeError as error:  # torch 2.11's wrap_triton takes only @triton.jit functions
        pytest.skip(f"this torch's wrap_triton does not take Triton's interpreted kernels ({error})")
    return module


@pytest.fixture
def launches(triton_module, monkeypatch):
    """Calls of the launchers, by name: proof that a step took the Triton path."""
    calls = {"scale_gradients_": 0, "lars_sgd_": 0}
    for name in calls:
        launcher = getattr(triton_module, name)

        def counted(*args, _name=name, _launcher=launcher, **kwargs):
            calls[_name] += 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(triton_module, name, counted)
    return calls


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]
    if len(params) > 3:
        with torch.no_grad():
            params[3].zero_()  # a zero parameter norm: ratio 1
    return params


def set_grads(param_lists, step, in_place=False):
    generator = torch.Generator().manual_seed(100 + step)
    for index, params in enumerate(zip(*param_lists)):
        grad = torch.randn(params[0].shape, generator=generator).to(params[0].dtype)
        if index == 2 and step == 1:
            grad.zero_()  # a zero gradient norm: ratio 1
        for param in params:
            if in_place and param.grad is not None:
                param.grad.copy_(grad)
            else:
                param.grad = grad.clone()


def assert_close_to_scale(actual, expected, tolerance):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e.double(), rtol=tolerance, atol=tolerance * e.double().abs().max().item())


# ---------------------------------------------------------------------------------------
# Parity with the per-parameter reference


@needs_triton
@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize(
    "base_cls, base_kwargs",
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "maximize": True}),
        (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-2}),
    ],
    ids=["sgd", "sgd_maximize", "adam"],
)
def test_lars_over_a_foreach_base_matches_the_reference(launches, base_cls, base_kwargs, clip):
    params, reference_params = make_params(), make_params()
    optimizer = LARS(base_cls(params, foreach=True, **base_kwargs), trust_coef=0.02, clip=clip)
    reference = ReferenceLARS(base_cls, [{"params": reference_params}], base_kwargs, trust_coef=0.02, clip=clip)
    for step in range(3):
        set_grads([params, reference_params], step)
        optimizer.step()
        reference.step()
    assert launches["scale_gradients_"] == 3
    assert_close_to_scale(params, reference_params, 1e-6)


@needs_triton
@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("options", sorted(SGD_OPTIONS))
@pytest.mark.parametrize("fused", [None, True], ids=["fused_none", "fused"])
def test_larssgd_matches_the_reference(launches, options, clip, fused):
    params, reference_params = make_params(), make_params()
    optimizer = LARSSGD(params, lr=0.1, trust_coef=0.02, clip=clip, fused=fused, **SGD_OPTIONS[options])
    reference = ReferenceLARS(torch.optim.SGD, [{"params": reference_params}], {"lr": 0.1, **SGD_OPTIONS[options]},
                              trust_coef=0.02, clip=clip)
    for step in range(3):
        set_grads([params, reference_params], step)
        grads = [p.grad.clone() for p in params]
        optimizer.step()
        reference.step()
        for param, grad in zip(params, grads):
            assert torch.equal(param.grad, grad), "the caller's gradient is left as it is"
    assert launches["lars_sgd_"] == 3
    assert_close_to_scale(params, reference_params, 1e-6)


@needs_triton
def test_lars_of_fused_sgd_and_a_tensor_lr_match_the_reference(launches):
    params, reference_params = make_params(), make_params()
    options = {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}
    optimizer = LARS(torch.optim.SGD(params, lr=torch.tensor(0.1), fused=True, **options), trust_coef=0.02)
    reference = ReferenceLARS(torch.optim.SGD, [{"params": reference_params}], {"lr": 0.1, **options}, trust_coef=0.02)
    for step in range(3):
        set_grads([params, reference_params], step)
        optimizer.step()
        reference.step()
    assert launches["lars_sgd_"] == 3 and launches["scale_gradients_"] == 0
    assert_close_to_scale(params, reference_params, 1e-6)


@needs_triton
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_decayed_trust_ratio_takes_the_norm_of_the_decayed_gradient(triton_module, sign):
    params = make_params()
    grads = [torch.randn(p.shape) for p in params]
    weight_decay, eps, trust_coef = 0.1, 1e-8, 0.02
    expected = []
    for param, grad in zip(params, grads):
        decayed = (sign * grad.double() + weight_decay * param.detach().double())
        param_norm, decayed_norm = param.detach().double().norm(), decayed.norm()
        ratio = trust_coef * param_norm / (decayed_norm + eps) if param_norm > 0 and decayed_norm > 0 else 1.0
        expected.append((decayed * ratio).float())
    with torch.no_grad():
        signed = [sign * grad for grad in grads]
        ratios = triton_module.scale_gradients_(params, signed, LARSSettings(eps, trust_coef, False, "decayed"),
                                                weight_decay=weight_decay, lr=0.1)
    assert ratios.dtype == torch.float32 and ratios.shape == (len(params),)
    assert ratios[3] == 1.0, "the zero-norm rule"
    assert_close_to_scale(signed, expected, 1e-6)


@needs_triton
def test_the_decayed_update_matches_the_per_parameter_one(triton_module):
    params, reference_params = make_params(), make_params()
    grads = [torch.randn(p.shape) for p in params]
    settings = LARSSettings(eps=1e-8, trust_coef=0.02, clip=False, kind="decayed")
    sgd = MomentumSGD(lr=0.1, weight_decay=0.1, momentum=0.0, dampening=0.0, nesterov=False, maximize=False)
    with torch.no_grad():
        [(_, ratios)] = triton_module.lars_sgd_(params, grads, [], settings, sgd, first_step=False, grad_scale=None,
                                                found_inf=None)
        scaled = [g.clone() for g in grads]
        expected_ratios = triton_module.scale_gradients_(reference_params, scaled, settings, weight_decay=0.1, lr=0.1)
        for param, grad in zip(reference_params, scaled):
            param.sub_(0.1 * grad)
    torch.testing.assert_close(ratios, expected_ratios, rtol=0, atol=0)
    assert_close_to_scale(params, reference_params, 1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_compute_in_fp32_and_round_once(launches, dtype):
    # One step from the same half-precision weights, in fp32 by the reference: the kernel's
    # results are those rounded once, within the interpreter's one-ulp rounding.
    params = make_params(dtype)
    reference_params = [torch.nn.Parameter(p.detach().float()) for p in params]
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    optimizer = LARSSGD(params, trust_coef=0.02, **options)
    reference = ReferenceLARS(torch.optim.SGD, [{"params": reference_params}], options, trust_coef=0.02)
    set_grads([params], 0)
    for param, reference_param in zip(params, reference_params):
        reference_param.grad = param.grad.float()
    optimizer.step()
    reference.step()
    ulp = torch.finfo(dtype).eps
    for param, expected in zip(params, reference_params):
        torch.testing.assert_close(param.float(), expected.to(dtype).float(), rtol=ulp, atol=0)
        buffer = optimizer.state[param]["momentum_buffer"]
        expected_buffer = reference.base.state[expected]["momentum_buffer"]
        torch.testing.assert_close(buffer.float(), expected_buffer.to(dtype).float(), rtol=ulp, atol=0)
    assert launches["lars_sgd_"] == 1


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradients_are_scaled_in_fp32(triton_module, dtype):
    params = make_params(dtype)
    grads = [torch.randn(p.shape).to(dtype) for p in params]
    expected = [
        reference_scaled_grad(p.detach(), g, weight_decay=1e-2, lr=0.1, eps=1e-8, trust_coef=0.02, clip=False)
        for p, g in zip(params, grads)
    ]
    with torch.no_grad():
        triton_module.scale_gradients_(params, grads, LARSSettings(1e-8, 0.02), weight_decay=1e-2, lr=0.1)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad.float(), want.float(), rtol=torch.finfo(dtype).eps, atol=0)


# ---------------------------------------------------------------------------------------
# GradScaler


def _scaled_step(optimizer, scaler, params, grads):
    scaler.scale(torch.ones(()))  # what scaler.scale(loss) does first: set up the scale
    for param, grad in zip(params, grads):
        param.grad = grad * scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()


@needs_triton
@pytest.mark.parametrize("wrapper", [False, True], ids=["LARSSGD", "LARS"])
def test_grad_scaler_hands_its_scale_to_the_kernels(launches, wrapper):
    params, reference_params = make_params(), make_params()
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    if wrapper:
        optimizer = LARS(torch.optim.SGD(params, fused=True, **options), trust_coef=0.02)
    else:
        optimizer = LARSSGD(params, trust_coef=0.02, **options)
    assert optimizer._step_supports_amp_scaling
    reference = LARSSGD(reference_params, trust_coef=0.02, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(2):
        set_grads([reference_params], step)
        grads = [p.grad.clone() for p in reference_params]
        _scaled_step(optimizer, scaler, params, grads)
        reference.step()
        assert torch.equal(params[0].grad, grads[0] * 1024.0), "unscaled in the kernel, not in .grad"
    assert launches["lars_sgd_"] == 4
    assert_close_to_scale(params, reference_params, 1e-6)


@needs_triton
@pytest.mark.parametrize("first", [False, True], ids=["later_step", "first_step"])
def test_an_overflowing_step_changes_nothing_in_the_kernel(triton_module, first):
    params = make_params()
    buffers = [None] * len(params)
    settings = LARSSettings(eps=1e-8, trust_coef=0.02)
    sgd = MomentumSGD(lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)
    options = dict(grad_scale=torch.tensor(8.0))
    grads = [torch.randn(p.shape) for p in params]
    with torch.no_grad():
        if not first:
            torchlars._dispatch.lars_sgd(params, grads, buffers, settings, sgd, found_inf=torch.zeros(()), **options)
        weights = [p.detach().clone() for p in params]
        before = [None if b is None else b.clone() for b in buffers]
        grads[1][0] = float("inf")
        torchlars._dispatch.lars_sgd(params, grads, buffers, settings, sgd, found_inf=torch.ones(()), **options)
    for param, weight in zip(params, weights):
        assert torch.equal(param, weight)
    for buffer, old in zip(buffers, before):
        # A skipped first step cannot unset a buffer without a host sync: it leaves zeros.
        assert torch.equal(buffer, torch.zeros_like(buffer) if old is None else old)


@pytest.mark.parametrize("first", [False, True], ids=["later_step", "first_step"])
def test_the_foreach_path_restores_an_overflowing_step(first):
    # GradScaler hands found_inf only to a step whose parameters the fused kernels all take, but
    # a group added later (add_param_group) can bring the foreach path a found_inf: it must
    # change nothing then either.
    params = make_params()
    buffers = [None] * len(params)
    settings = LARSSettings(eps=1e-8, trust_coef=0.02, clip=False)
    sgd = MomentumSGD(lr=0.1, weight_decay=1e-2, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)
    options = dict(foreach=True, grad_scale=torch.tensor(8.0))
    with torch.no_grad():
        if not first:
            torchlars._dispatch.lars_sgd(params, [torch.randn(p.shape) for p in params], buffers, settings, sgd,
                                         found_inf=torch.zeros(()), **options)
        weights = [p.detach().clone() for p in params]
        before = [None if b is None else b.clone() for b in buffers]
        grads = [torch.randn(p.shape) for p in params]
        torchlars._dispatch.lars_sgd(params, grads, buffers, settings, sgd, found_inf=torch.ones(()), **options)
    for param, weight in zip(params, weights):
        assert torch.equal(param, weight)
    for buffer, old in zip(buffers, before):
        assert torch.equal(buffer, torch.zeros_like(buffer) if old is None else old)


@needs_triton
def test_grad_scaler_overflow_through_the_optimizer(launches):
    params = make_params()
    optimizer = LARSSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    _scaled_step(optimizer, scaler, params, [torch.randn(p.shape) for p in params])
    weights = [p.detach().clone() for p in params]
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
    grads = [torch.randn(p.shape) for p in params]
    grads[0][0, 0] = float("inf")
    _scaled_step(optimizer, scaler, params, grads)
    assert scaler.get_scale() == 4.0, "GradScaler saw the overflow"
    assert launches["lars_sgd_"] == 2, "the kernel, not the host, skipped the step"
    for param, weight, buffer in zip(params, weights, buffers):
        assert torch.equal(param, weight)
        assert torch.equal(optimizer.state[param]["momentum_buffer"], buffer)


# ---------------------------------------------------------------------------------------
# State dicts and tables


@needs_triton
def test_a_plain_sgd_loads_larssgds_state_and_back(launches):
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    params, resumed_params = make_params(), make_params()
    optimizer = LARSSGD(params, trust_coef=0.02, **options)
    for step in range(2):
        set_grads([params], step)
        optimizer.step()
    plain = torch.optim.SGD(copy.deepcopy(params), **options)
    plain.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # a loaded state may alias the saved tensors
    for param, plain_param in zip(params, plain.param_groups[0]["params"]):
        assert torch.equal(plain.state[plain_param]["momentum_buffer"], optimizer.state[param]["momentum_buffer"])
    with torch.no_grad():
        for resumed, param in zip(resumed_params, params):
            resumed.copy_(param)
    resumed_optimizer = LARSSGD(resumed_params, trust_coef=0.02, **options)
    resumed_optimizer.load_state_dict(copy.deepcopy(plain.state_dict()))
    set_grads([params, resumed_params], 2)
    optimizer.step()
    resumed_optimizer.step()
    for param, resumed in zip(params, resumed_params):
        assert torch.equal(param, resumed), "a resumed run continues bit for bit"


@needs_triton
def test_tables_are_built_once_and_rebuilt_when_the_tensors_change(triton_module):
    params, reference_params = make_params(), make_params()
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    optimizer = LARSSGD(params, trust_coef=0.02, **options)
    reference = ReferenceLARS(torch.optim.SGD, [{"params": reference_params}], options, trust_coef=0.02)

    def step(number):
        set_grads([params, reference_params], number, in_place=True)
        built = triton_module.tables_built
        optimizer.step()
        reference.step()
        assert_close_to_scale(params, reference_params, 1e-6)
        return triton_module.tables_built - built

    assert step(0) == 1  # the first step, with the buffers it creates
    assert step(1) == 0, "unchanged tensors: nothing uploaded"
    with torch.no_grad():  # a swapped parameter (new storage)
        params[0].data = params[0].data.clone()
    assert step(3) == 1
    assert step(4) == 0
    new, new_reference = make_params(shapes=[(4, 4)], seed=1)[0], make_params(shapes=[(4, 4)], seed=1)[0]
    optimizer.add_param_group({"params": [new]})
    reference.base.add_param_group({"params": [new_reference], "weight_decay": 0.0})  # LARS applies it
    reference.groups.append({"params": [new_reference]})
    params.append(new)
    reference_params.append(new_reference)
    assert step(5) == 1, "the new group's tables"
    assert step(6) == 0
    reference.base.load_state_dict(copy.deepcopy(reference.base.state_dict()))
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # new momentum buffers
    assert step(7) == 2


# ---------------------------------------------------------------------------------------
# Kernels per step, by the model of tests/kernel_count.py


def _kernels_per_step(make_optimizer, count):
    shapes = [(2 + index % 3, 1 + index % 2) for index in range(count)]  # shapes differ: no foreach pairs by luck
    params = make_params(shapes=shapes)
    optimizer = make_optimizer(params)
    for step in range(2):  # warm-up: momentum buffers, tables
        set_grads([params], step, in_place=True)
        optimizer.step()
    set_grads([params], 2, in_place=True)
    return count_kernels(optimizer.step)


@needs_triton
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: LARS(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)),
        lambda params: LARSSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4),
        lambda params: LARSSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, maximize=True, fused=True),
    ],
    ids=["LARS(SGD(foreach))", "LARSSGD", "LARSSGD(fused, maximize)"],
)
def test_the_kernel_count_does_not_grow_with_the_parameters(triton_module, make_optimizer):
    few, many = _kernels_per_step(make_optimizer, 40), _kernels_per_step(make_optimizer, 160)
    assert few.per_tensor_foreach == [] and many.per_tensor_foreach == []
    assert few.kernels == many.kernels, (few.ops, many.ops)
    assert any(op.startswith("torchlars_triton::") for op in few.ops)


def test_the_kernel_count_sees_a_per_tensor_foreach():
    # The model itself: the pre-Triton scaling multiplies gradients by 0-d ratios.
    grads, ratios = [torch.ones(3), torch.ones(2)], torch.ones(2).unbind(0)
    count = count_kernels(lambda: torch._foreach_mul_(grads, ratios))
    assert count.kernels == 2 and count.per_tensor_foreach == ["aten::_foreach_mul_"]
    assert count_kernels(lambda: torch._foreach_mul_(grads, 2.0)).kernels == 1


# ---------------------------------------------------------------------------------------
# Choosing the path


def test_import_torchlars_does_not_import_the_kernels():
    code = (
        "import sys, torch, torchlars\n"
        "params = [torch.nn.Parameter(torch.ones(3))]\n"
        "params[0].grad = torch.ones(3)\n"
        "torchlars.LARSSGD(params, lr=0.1).step()\n"
        "torchlars.LARS(torch.optim.SGD(params, lr=0.1)).step()\n"
        "assert 'torchlars._triton' not in sys.modules\n"
    )
    env = {key: value for key, value in __import__("os").environ.items() if key != "TORCHLARS_TRITON_ON_CPU"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_cuda_without_triton_warns_once_naming_the_install(monkeypatch):
    monkeypatch.setattr(torchlars._dispatch, "_TRITON_INSTALLED", False)
    monkeypatch.setattr(torchlars._dispatch, "_triton", None)
    monkeypatch.setattr(torchlars._dispatch, "_warned_no_triton", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            chosen = torchlars._dispatch.implementation(torch.device("cuda"), torch.float32, [], foreach=None, fused=None)
            assert chosen == "foreach"
    assert len(caught) == 1 and "pip install triton" in str(caught[0].message)


@needs_triton
def test_a_non_contiguous_parameter_keeps_the_foreach_path(launches):
    params = [torch.nn.Parameter(torch.randn(4, 3).t()), torch.nn.Parameter(torch.randn(5))]
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = LARSSGD(params, lr=0.1, momentum=0.9)
    reference = LARSSGD(reference_params, lr=0.1, momentum=0.9, foreach=True)
    set_grads([params, reference_params], 0)
    optimizer.step()
    reference.step()
    assert launches["lars_sgd_"] == 0
    assert_close_to_scale(params, reference_params, 1e-6)


# ---------------------------------------------------------------------------------------
# On a GPU (scripts/gpu_run.sh)


def _cuda_optimizer(fused=None):
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    optimizer = LARSSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, fused=fused)
    return params, optimizer


@needs_cuda
@needs_triton
def test_cuda_fused_none_takes_the_triton_kernels():
    params, optimizer = _cuda_optimizer()
    assert optimizer._step_supports_amp_scaling, "GradScaler hands grad_scale/found_inf"
    set_grads([params], 0)
    count = count_kernels(optimizer.step)
    assert "torchlars_triton::lars_sgd_" in count.ops and count.per_tensor_foreach == []


@needs_cuda
@needs_triton
@pytest.mark.parametrize("wrapper", [False, True], ids=["LARSSGD", "LARS"])
def test_cuda_step_never_syncs(wrapper):
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    if wrapper:
        optimizer = LARS(torch.optim.SGD(params, foreach=True, **options), trust_coef=0.02)
    else:
        optimizer = LARSSGD(params, trust_coef=0.02, **options)
    scaler = torch.amp.GradScaler("cuda", init_scale=8.0)
    for step in range(3):
        set_grads([params], step, in_place=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step() if wrapper else scaler.step(optimizer)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if not wrapper:
            scaler.update()


@needs_cuda
@needs_triton
def test_cuda_graph_replay_matches_eager():
    eager_params, eager = _cuda_optimizer()
    graph_params, graphed = _cuda_optimizer()
    for step in range(3):  # warm-up on a side stream, as CUDA graph capture wants
        set_grads([eager_params, graph_params], step, in_place=True)
        eager.step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graphed.step()
        torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for step in range(3, 6):
        set_grads([eager_params, graph_params], step, in_place=True)
        eager.step()
        graph.replay()
    torch.cuda.synchronize()
    for eager_param, graph_param in zip(eager_params, graph_params):
        assert torch.equal(eager_param, graph_param)


@needs_triton
@pytest.mark.parametrize("build", ["LARSSGD", "LARS_foreach_SGD"])
def test_a_compiled_step_calls_the_triton_operators(triton_module, build):
    # The tables are found by data pointers, which a trace cannot read: the step is one opaque
    # operator per bucket, which the compiled graph calls as it is.
    torch._dynamo.reset()
    params, eager_params = make_params(), make_params()

    def make(p):
        if build == "LARSSGD":
            return LARSSGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02)
        return LARS(torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=True), trust_coef=0.02)

    optimizer, eager = make(params), make(eager_params)
    ops: set[str] = set()

    def recording_backend(graph_module, example_inputs):
        ops.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    compiled_step = torch.compile(optimizer.step, backend=recording_backend)
    for step in range(3):
        set_grads([params, eager_params], step)
        compiled_step()
        eager.step()
    expected = "torchlars_triton.lars_sgd_step_" if build == "LARSSGD" else "torchlars_triton.scale_gradients_step_"
    assert any(op.startswith(expected) for op in ops), sorted(ops)
    assert_close_to_scale(params, eager_params, 1e-6)
    assert len(optimizer.trust_ratios()) == len(eager.trust_ratios()) == len(params)
    for (param, ratio), (eager_param, eager_ratio) in zip(optimizer.trust_ratios().items(), eager.trust_ratios().items()):
        torch.testing.assert_close(ratio, eager_ratio, rtol=1e-6, atol=0)
    torch._dynamo.reset()
