"""The Triton kernels of torchlars._triton (issues 16, 23, 24), on CPU tensors through Triton's interpreter.

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

import torchlars
import torchlars._dispatch
import torchlars._functional
from torchlars import LARS, LARSSGD
from torchlars._functional import LAMBSettings, LARSSettings, MomentumSGD
from kernel_count import count_kernels
from lars_reference import SGD_OPTIONS, ReferenceLARS, reference_scaled_grad


def step_lamb(implementation, params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, grad_scale=None,
              found_inf=None, **options):
    """``implementation.lamb_`` called with LAMB's options as keywords, made into its LAMBSettings."""
    return implementation.lamb_(params, grads, exp_avgs, exp_avg_sqs, state_steps, LAMBSettings(**options), lr=lr,
                                grad_scale=grad_scale, found_inf=found_inf)

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
def test_tables_are_built_once_per_sizes_and_only_addresses_are_refreshed(triton_module):
    params, reference_params = make_params(), make_params()
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    optimizer = LARSSGD(params, trust_coef=0.02, **options)
    reference = ReferenceLARS(torch.optim.SGD, [{"params": reference_params}], options, trust_coef=0.02)

    def step(number, in_place=True):
        set_grads([params, reference_params], number, in_place=in_place)
        built, uploads = triton_module.chunk_tables_built, triton_module.address_uploads
        optimizer.step()
        reference.step()
        assert_close_to_scale(params, reference_params, 1e-6)
        return triton_module.chunk_tables_built - built, triton_module.address_uploads - uploads

    first = step(0)
    assert first[1] == 1 and first[0] <= 1  # the first step's addresses (its sizes may be cached already)
    assert step(1) == (0, 0), "unchanged tensors: nothing built, nothing uploaded"
    assert step(2, in_place=False) == (0, 1), "new gradients: one upload of addresses, no table"
    assert step(3, in_place=False) == (0, 1)
    with torch.no_grad():  # a swapped parameter (new storage): new address tables, the same chunk table
        params[0].data = params[0].data.clone()
    assert step(4) == (0, 1)
    assert step(5) == (0, 0)
    new, new_reference = make_params(shapes=[(4, 4)], seed=1)[0], make_params(shapes=[(4, 4)], seed=1)[0]
    optimizer.add_param_group({"params": [new]})
    reference.base.add_param_group({"params": [new_reference], "weight_decay": 0.0})  # LARS applies it
    reference.groups.append({"params": [new_reference]})
    params.append(new)
    reference_params.append(new_reference)
    built, uploads = step(6)
    assert uploads == 1 and built <= 1, "the new group's tables (its sizes may be cached)"
    assert step(7) == (0, 0)
    reference.base.load_state_dict(copy.deepcopy(reference.base.state_dict()))
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # new momentum buffers
    assert step(8) == (0, 2)


@needs_triton
def test_an_eager_step_bumps_the_version_of_what_it_wrote(triton_module):
    # Called without its custom operator in eager code, a step still tells autograd what it modified.
    params, grads = make_params(), [torch.randn(shape) for shape in SHAPES]
    buffers = [torch.zeros(shape) for shape in SHAPES]
    before = [t._version for t in (*params, *grads, *buffers)]
    with torch.no_grad():
        sgd = MomentumSGD(lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False)
        triton_module.lars_sgd_(params, grads, buffers, LARSSettings(1e-8, 0.02), sgd, first_step=False,
                                grad_scale=None, found_inf=None)
    after = [t._version for t in (*params, *grads, *buffers)]
    n = len(params)
    assert all(a > b for a, b in zip(after[:n] + after[2 * n:], before[:n] + before[2 * n:])), "params and buffers"
    assert after[n:2 * n] == before[n:2 * n], "the gradients are only read"


@needs_triton
def test_chunk_tables_are_built_without_a_loop_per_chunk_and_right(triton_module):
    numels = (1, 2048, 2049, 5000, 3)
    table = triton_module.ChunkTable(numels, torch.device("cpu"))
    chunks = [-(-n // triton_module.BLOCK) for n in numels]
    assert table.num_chunks == sum(chunks)
    assert table.numels.tolist() == list(numels)
    assert table.first_chunk.tolist() == [0, 1, 2, 4, 7, 8]
    assert table.chunk_tensor.tolist() == [i for i, c in enumerate(chunks) for _ in range(c)]
    assert table.chunk_index.tolist() == [j for c in chunks for j in range(c)]


@needs_triton
def test_unaligned_tensors_take_the_unaligned_kernels_with_the_same_numbers(triton_module):
    aligned = make_params()
    storage = [torch.empty(p.numel() + 1) for p in aligned]
    unaligned = [s[1:].view(p.shape) for s, p in zip(storage, aligned)]  # 4 bytes past an aligned address
    for u, a in zip(unaligned, aligned):
        u.copy_(a.detach())
    grads = [torch.randn(p.shape) for p in aligned]
    unaligned_grads = [g.clone() for g in grads]
    settings = dict(weight_decay=1e-2, lr=0.1)
    with torch.no_grad():
        ratios = triton_module.scale_gradients_(aligned, grads, LARSSettings(1e-8, 0.02), **settings)
        assert triton_module.tables_for(aligned, grads, job="scale_gradients")[1].aligned
        unaligned_ratios = triton_module.scale_gradients_(unaligned, unaligned_grads, LARSSettings(1e-8, 0.02),
                                                          **settings)
        assert not triton_module.tables_for(unaligned, unaligned_grads, job="scale_gradients")[1].aligned
    torch.testing.assert_close(unaligned_ratios, ratios, rtol=0, atol=0)
    for u, a in zip(unaligned_grads, grads):
        torch.testing.assert_close(u, a, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Scalars: both kinds of lr and weight decay, and tensors on the wrong device


@needs_triton
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("weight_decay_kind", ["float", "tensor"])
@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
def test_lr_and_weight_decay_as_numbers_or_tensors_give_the_same_step(triton_module, lr_kind, weight_decay_kind, clip):
    lr, weight_decay = 0.1, 1e-2
    as_kind = lambda value, kind: torch.tensor(value) if kind == "tensor" else value  # noqa: E731
    settings = dict(eps=1e-8, trust_coef=0.02, clip=clip)
    params, grads = make_params(), [torch.randn(shape) for shape in SHAPES]
    expected = [reference_scaled_grad(p.detach(), g, weight_decay=weight_decay, lr=lr, **settings)
                for p, g in zip(params, grads)]
    with torch.no_grad():
        triton_module.scale_gradients_(params, grads, LARSSettings(**settings),
                                       weight_decay=as_kind(weight_decay, weight_decay_kind), lr=as_kind(lr, lr_kind))
    assert_close_to_scale(grads, expected, 1e-6)
    step_params, reference_params = make_params(), make_params()
    optimizer = LARSSGD(step_params, lr=as_kind(lr, lr_kind), momentum=0.9, weight_decay=weight_decay, **settings)
    reference = ReferenceLARS(torch.optim.SGD, [{"params": reference_params}], {"lr": lr, "momentum": 0.9,
                              "weight_decay": weight_decay}, **settings)
    for step in range(2):
        set_grads([step_params, reference_params], step)
        optimizer.step()
        reference.step()
    assert_close_to_scale(step_params, reference_params, 1e-6)


class _Launches:
    """The kernels a step launched, with their arguments: what reached the device."""

    def __init__(self, module, monkeypatch):
        self.calls = []
        launch = module._launch

        def recorded(kernel, grid, *args, **constexprs):
            self.calls.append((kernel, args))
            return launch(kernel, grid, *args, **constexprs)

        monkeypatch.setattr(module, "_launch", recorded)

    def tensors(self):
        return [arg for _, args in self.calls for arg in args if isinstance(arg, torch.Tensor)]


@needs_triton
@pytest.mark.parametrize("entry", ["scale_gradients_", "lars_sgd_"])
def test_a_cpu_scalar_of_a_gpu_step_is_read_on_the_host_and_never_reaches_a_kernel(triton_module, monkeypatch, entry):
    # The interpreter has only CPU tensors: the launch logic is told the parameters are on a GPU.
    monkeypatch.setattr(triton_module, "_device_of", lambda tensors: torch.device("cuda", 0))
    launched = _Launches(triton_module, monkeypatch)
    params, grads = make_params(), [torch.randn(shape) for shape in SHAPES]
    weight_decay, lr = torch.tensor(1e-2), torch.tensor(0.1, dtype=torch.float64)
    settings = dict(eps=1e-8, trust_coef=0.02, clip=True)
    expected = [reference_scaled_grad(p.detach(), g, weight_decay=1e-2, lr=0.1, **settings)
                for p, g in zip(params, grads)]
    with torch.no_grad():
        if entry == "scale_gradients_":
            triton_module.scale_gradients_(params, grads, LARSSettings(**settings), weight_decay=weight_decay, lr=lr)
            assert_close_to_scale(grads, expected, 1e-6)
        else:
            sgd = MomentumSGD(lr=lr, weight_decay=weight_decay, momentum=0.9, dampening=0.0, nesterov=False,
                              maximize=False)
            buffers = [torch.zeros_like(p) for p in params]
            triton_module.lars_sgd_(params, grads, buffers, LARSSettings(**settings), sgd, first_step=True,
                                    grad_scale=None, found_inf=None)
    assert launched.calls, "the step went through the Triton operators"
    handed = launched.tensors()
    assert not any(t is weight_decay or t is lr for t in handed), "a CPU scalar reached a kernel of a GPU step"


@needs_triton
def test_a_scalar_on_another_device_is_refused_by_name_and_nothing_changes(triton_module, monkeypatch):
    monkeypatch.setattr(triton_module, "_device_of", lambda tensors: torch.device("cuda", 0))
    params, grads = make_params(), [torch.randn(shape) for shape in SHAPES]
    before = [g.clone() for g in grads]
    elsewhere = torch.empty((), device="meta")  # neither the step's device nor the host
    with torch.no_grad():
        with pytest.raises(ValueError, match="`weight_decay` is a tensor on meta"):
            triton_module.scale_gradients_(params, grads, LARSSettings(1e-8, 0.02), weight_decay=elsewhere, lr=0.1)
        with pytest.raises(ValueError, match="`lr` is a tensor on meta"):
            triton_module.scale_gradients_(params, grads, LARSSettings(1e-8, 0.02), weight_decay=0.0, lr=elsewhere)
    for grad, old in zip(grads, before):
        assert torch.equal(grad, old)


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
        lambda params: torchlars.LAMB(params, lr=0.01, weight_decay=0.01),
    ],
    ids=["LARS(SGD(foreach))", "LARSSGD", "LARSSGD(fused, maximize)", "LAMB"],
)
def test_the_kernel_count_does_not_grow_with_the_parameters(triton_module, make_optimizer):
    few, many = _kernels_per_step(make_optimizer, 40), _kernels_per_step(make_optimizer, 160)
    assert few.per_tensor_foreach == [] and many.per_tensor_foreach == []
    assert few.kernels == many.kernels, (few.ops, many.ops)
    assert any(op.startswith("torchlars_triton::") for op in few.ops)


@needs_triton
@pytest.mark.parametrize("count", [40, 160])
def test_a_larssgd_step_is_at_most_four_kernels(triton_module, count):
    for options in ({}, {"fused": True, "maximize": True}, {"nesterov": True}):
        step = _kernels_per_step(lambda p: LARSSGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, **options), count)
        assert step.kernels <= 4, step.ops


@needs_triton
@pytest.mark.parametrize("count", [40, 160])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_lars_adds_at_most_four_kernels_to_its_base_step(triton_module, count, fused):
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, **({"fused": True} if fused else {"foreach": True}))
    lars = _kernels_per_step(lambda p: LARS(torch.optim.SGD(p, **options)), count)
    base = _kernels_per_step(lambda p: torch.optim.SGD(p, **{**options, "weight_decay": 0.0}), count)
    if fused:  # LARS(SGD(fused=True)) steps with the LARS-momentum kernels instead of the base's
        assert lars.kernels <= 4, lars.ops
    else:
        assert lars.kernels - base.kernels <= 4, (lars.ops, base.ops)


@needs_triton
def test_the_update_ratio_adds_a_constant_number_of_kernels_to_its_base_step(triton_module):
    # The copy of the weights before the base's step, the three kernels of the scaling, and the
    # upload of the copies' addresses, new every step here. (The base, torch's foreach AdamW,
    # launches more kernels for more parameters on its own.)
    def added(count):
        options = dict(lr=0.01, weight_decay=0.01, foreach=True)
        lars = _kernels_per_step(lambda p: LARS(torch.optim.AdamW(p, **options), trust_coef=1.0, eps=0.0,
                                                trust_ratio="update"), count)
        return lars.kernels - _kernels_per_step(lambda p: torch.optim.AdamW(p, **options), count).kernels

    assert added(40) == added(160) <= 5


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


def _gpu_triton():
    """torchlars._triton compiled for the GPU (not the interpreter's, which another test may have imported)."""
    module = importlib.import_module("torchlars._triton")
    if type(module._lars_sgd_kernel).__name__ == "InterpretedFunction":
        pytest.skip("torchlars._triton was imported for the interpreter in this process; run the CUDA tests alone")
    return module


@needs_cuda
@needs_triton
def test_cuda_steps_take_the_aligned_kernels_and_at_most_four_launches():
    from torch.profiler import ProfilerActivity, profile

    module = _gpu_triton()
    params, optimizer = _cuda_optimizer()
    for step in range(2):
        set_grads([params], step, in_place=True)
        optimizer.step()
    grads = [p.grad for p in params]
    buffers = [optimizer.state[p]["momentum_buffer"] for p in params]
    assert module.tables_for(params, grads, buffers, job="lars_sgd")[1].aligned
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        optimizer.step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) <= 4, kernels


@needs_cuda
@needs_triton
def test_cuda_scaling_reads_a_cpu_weight_decay_tensor_on_the_host():
    module = _gpu_triton()
    params = [p.detach().cuda() for p in make_params()]
    grads = [torch.randn(p.shape, device="cuda") for p in params]
    settings = dict(lr=0.1, eps=1e-8, trust_coef=0.02, clip=True)
    expected = [reference_scaled_grad(p, g, weight_decay=1e-2, **settings) for p, g in zip(params, grads)]
    module.scale_gradients_(params, grads, weight_decay=torch.tensor(1e-2), **{**settings, "lr": torch.tensor(0.1)})
    assert_close_to_scale(grads, expected, 1e-5)


@needs_cuda
@needs_triton
def test_cuda_lamb_matches_the_reference_never_syncs_and_replays_in_a_graph():
    module = _gpu_triton()
    params, exp_avgs, exp_avg_sqs, steps = [[t.cuda() for t in ts] for ts in _lamb_state()]
    graph_state = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs, steps)]
    grads = [torch.randn(p.shape, device="cuda") for p in params]

    def step(state):
        torch._foreach_add_(state[3], 1.0)
        return step_lamb(module, state[0], grads, state[1], state[2], state[3], **LAMB_DEFAULTS)

    eager = [params, exp_avgs, exp_avg_sqs, steps]
    expected = [reference_lamb_step(p, g, m, v, 1, **LAMB_DEFAULTS) for p, g, m, v in zip(params, grads, exp_avgs,
                                                                                           exp_avg_sqs)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(eager)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_close_to_scale(params, [e[0] for e in expected], 1e-5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(graph_state)  # warm-up: the tables
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graph_state)
    for _ in range(2):
        step(eager)
        graph.replay()
    torch.cuda.synchronize()
    for eager_param, graph_param in zip(params, graph_state[0]):
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


# ---------------------------------------------------------------------------------------
# LAMB (issue 23): two passes on the same tables, against a per-parameter reference


LAMB_OPTIONS = {
    "default": {},
    "no_bias_correction": {"bias_correction": False},
    "trust_clip": {"trust_clip": True, "trust_coef": 5.0},
    "not_adapted": {"adapt": False},
    "maximize": {"maximize": True},
    "tensor_lr": {"lr": torch.tensor(0.01)},
    "grad_scale": {"grad_scale": torch.tensor(8.0)},
    "zero_decay_trust_eps": {"weight_decay": 0.0, "trust_eps": 1e-3},
}
LAMB_DEFAULTS = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, trust_coef=1.0, trust_eps=0.0,
                     trust_clip=False, adapt=True, bias_correction=True, maximize=False)


def reference_lamb_step(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay, trust_coef,
                        trust_eps, trust_clip, adapt, bias_correction, maximize, grad_scale=None):
    """One LAMB step of one parameter in fp64, from the formula (You et al., 2019; timm's Lamb)."""
    w, g = param.double(), grad.double()
    if grad_scale is not None:
        g = g / float(grad_scale)
    if maximize:
        g = -g
    m = beta1 * exp_avg.double() + (1 - beta1) * g
    v = beta2 * exp_avg_sq.double() + (1 - beta2) * g * g
    bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if bias_correction else (1.0, 1.0)
    u = (m / bc1) / ((v / bc2).sqrt() + eps) + weight_decay * w
    w_norm, u_norm = w.norm().item(), u.norm().item()
    ratio = trust_coef * w_norm / (u_norm + trust_eps) if w_norm > 0 and u_norm > 0 else 1.0
    if trust_clip:
        ratio = min(ratio, 1.0)
    if not adapt:
        ratio = 1.0
    return w - float(lr) * ratio * u, m, v, ratio


def _lamb_state(dtype=torch.float32, shapes=SHAPES):
    params = [p.detach() for p in make_params(dtype, shapes)]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    return params, exp_avgs, exp_avg_sqs, steps


@needs_triton
@pytest.mark.parametrize("options", sorted(LAMB_OPTIONS))
def test_lamb_matches_the_per_parameter_reference(triton_module, options):
    # Every step from the kernel's own state: the fp32 kernel against the fp64 formula, step by step.
    settings = {**LAMB_DEFAULTS, **LAMB_OPTIONS[options]}
    params, exp_avgs, exp_avg_sqs, steps = _lamb_state()
    for number in range(3):
        generator = torch.Generator().manual_seed(100 + number)
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        if number == 1:
            grads[2].zero_()
        for step in steps:
            step += 1
        expected = [reference_lamb_step(p, g, m, v, s.item(), **settings)
                    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps)]
        ratios = step_lamb(triton_module, params, grads, exp_avgs, exp_avg_sqs, steps, **settings)
        torch.testing.assert_close(ratios.double(), torch.tensor([e[3] for e in expected], dtype=torch.float64),
                                   rtol=1e-6, atol=0)
        if number == 0:
            assert ratios[3] == 1.0, "the zero-norm rule: a zero parameter is not adapted"
        assert_close_to_scale(params, [e[0] for e in expected], 1e-6)
        assert_close_to_scale(exp_avgs, [e[1] for e in expected], 1e-6)
        assert_close_to_scale(exp_avg_sqs, [e[2] for e in expected], 1e-6)


@needs_triton
def test_lamb_in_bf16_computes_in_fp32_and_rounds_once(triton_module):
    # The interpreter rounds fp32 -> bf16 toward zero (a GPU to nearest): within one ulp either way.
    params, exp_avgs, exp_avg_sqs, steps = _lamb_state(torch.bfloat16)
    grads = [torch.randn(p.shape).to(torch.bfloat16) for p in params]
    for step in steps:
        step += 1
    expected = [reference_lamb_step(p, g, m, v, 1, **LAMB_DEFAULTS) for p, g, m, v in zip(params, grads, exp_avgs,
                                                                                           exp_avg_sqs)]
    step_lamb(triton_module, params, grads, exp_avgs, exp_avg_sqs, steps, **LAMB_DEFAULTS)
    ulp = torch.finfo(torch.bfloat16).eps
    for param, exp_avg, exp_avg_sq, (w, m, v, _) in zip(params, exp_avgs, exp_avg_sqs, expected):
        torch.testing.assert_close(exp_avg.double(), m, rtol=ulp, atol=0)
        torch.testing.assert_close(exp_avg_sq.double(), v, rtol=ulp, atol=0)
        # u is recomputed from the rounded moments: w is within two ulps of the weights' scale.
        torch.testing.assert_close(param.double(), w, rtol=0, atol=2 * ulp * w.abs().max().item())


@needs_triton
def test_an_overflowing_lamb_step_changes_nothing(triton_module):
    params, exp_avgs, exp_avg_sqs, steps = _lamb_state()
    grads = [torch.randn(p.shape) for p in params]
    for step in steps:
        step += 1
    step_lamb(triton_module, params, grads, exp_avgs, exp_avg_sqs, steps, **LAMB_DEFAULTS, found_inf=torch.zeros(()))
    before = [[t.clone() for t in tensors] for tensors in (params, exp_avgs, exp_avg_sqs)]
    grads[1][0] = float("inf")
    step_lamb(triton_module, params, grads, exp_avgs, exp_avg_sqs, steps, **LAMB_DEFAULTS, found_inf=torch.ones(()),
                        grad_scale=torch.tensor(4.0))
    for tensors, old in zip((params, exp_avgs, exp_avg_sqs), before):
        for tensor, kept in zip(tensors, old):
            assert torch.equal(tensor, kept)


@needs_triton
def test_lamb_refuses_step_counts_the_kernels_cannot_read(triton_module):
    params, exp_avgs, exp_avg_sqs, steps = _lamb_state()
    steps[0] = torch.tensor(1.0, dtype=torch.float64)
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match="`state_steps` must be one-element float32 tensors"):
        step_lamb(triton_module, params, [torch.ones_like(p) for p in params], exp_avgs, exp_avg_sqs, steps,
                            **LAMB_DEFAULTS)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@needs_triton
@pytest.mark.parametrize("count", [40, 160])
def test_a_lamb_step_is_three_kernels(triton_module, count):
    shapes = [(2 + index % 3, 1 + index % 2) for index in range(count)]
    params, exp_avgs, exp_avg_sqs, steps = _lamb_state(shapes=shapes)
    grads = [torch.ones_like(p) for p in params]
    step_lamb(triton_module, params, grads, exp_avgs, exp_avg_sqs, steps, **LAMB_DEFAULTS)  # warm-up: the tables
    step = count_kernels(
        lambda: step_lamb(triton_module, params, grads, exp_avgs, exp_avg_sqs, steps, **LAMB_DEFAULTS)
    )
    assert step.kernels == 3, step.ops


@needs_triton
def test_a_compiled_function_calls_the_lamb_operator(triton_module):
    torch._dynamo.reset()
    params, exp_avgs, exp_avg_sqs, steps = _lamb_state()
    eager = _lamb_state()
    ops: set[str] = set()

    def recording_backend(graph_module, example_inputs):
        ops.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        torch._foreach_add_(steps, 1)
        return step_lamb(triton_module, params, grads, exp_avgs, exp_avg_sqs, steps, **LAMB_DEFAULTS)

    compiled = torch.compile(step, backend=recording_backend)
    for number in range(2):
        grads = [torch.randn(p.shape) for p in params]
        compiled(params, grads, exp_avgs, exp_avg_sqs, steps)
        step(*eager[:1], grads, *eager[1:])
    assert any(op.startswith("torchlars_triton.lamb_step_") for op in ops), sorted(ops)
    for param, eager_param in zip(params, eager[0]):
        torch.testing.assert_close(param, eager_param, rtol=0, atol=0)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------
# The "update" trust ratio of LARS(any base) in one launch


@needs_triton
@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_scale_update_matches_the_foreach_update_scaling(triton_module, clip, lr_kind):
    lr = torch.tensor(0.05) if lr_kind == "tensor" else 0.05
    before = [p.detach() for p in make_params()]
    after = [b - 0.05 * torch.randn(b.shape) for b in before]
    after[2] = before[2].clone()  # a step of zero: ratio 1
    expected = [a.clone() for a in after]
    settings = LARSSettings(eps=1e-9, trust_coef=0.5, clip=clip, kind="update")
    expected_ratios = torchlars._functional.multi_tensor_lars_update_(expected, [b.clone() for b in before], settings,
                                                                      lr=lr)
    ratios = triton_module.scale_update_(after, before, settings, lr=lr)
    torch.testing.assert_close(ratios, expected_ratios, rtol=1e-6, atol=0)
    assert ratios[2] == 1.0
    assert_close_to_scale(after, expected, 1e-6)
    assert count_kernels(lambda: triton_module.scale_update_(after, before, settings, lr=lr)).kernels == 3
