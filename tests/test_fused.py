"""The fused path: LARS(SGD(fused=True)) and LARSSGD(fused=True) on liblars's lars_sgd_ operator.

Same numbers as the torch._foreach_* path (1e-6 of each tensor's scale in fp32), after any
outside write of the parameters too, GradScaler's grad_scale/found_inf, and clear errors.
"""

import copy
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from lars_reference import SGD_OPTIONS

import _fused_resume_worker
import torchlars._kernels
from torchlars import LARS, LARSSGD
from torchlars_extension import import_extension

import_extension("torchlars.ops")

SHAPES = [(40, 30), (7,), (5, 4, 3), (9,), (300, 20)]


def make_params(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]
    with torch.no_grad():
        params[3].zero_()  # a zero parameter norm: ratio 1
    return params


def set_grads(param_lists, step):
    generator = torch.Generator().manual_seed(100 + step)
    for index, params in enumerate(zip(*param_lists)):
        grad = torch.randn(params[0].shape, generator=generator).to(params[0].dtype)
        if index == 2 and step == 1:
            grad.zero_()  # a zero gradient norm: ratio 1
        for param in params:
            param.grad = grad.clone()


def assert_close_to_scale(actual, expected, tolerance):
    """Every element within ``tolerance`` times the largest magnitude in its tensor."""
    for index, (a, e) in enumerate(zip(actual, expected)):
        scale = e.detach().abs().max().double()
        error = (a.detach().double() - e.detach().double()).abs().max()
        assert error <= tolerance * scale, f"tensor {index}: error {error:.3g}, scale {scale:.3g}"


# ---------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("options", sorted(SGD_OPTIONS))
def test_fused_matches_the_foreach_path_over_many_steps(options, clip):
    fused_params, wrapped_params, foreach_params = make_params(), make_params(), make_params()
    settings = dict(lr=0.1, trust_coef=0.02, clip=clip)
    fused = LARSSGD(fused_params, fused=True, **settings, **SGD_OPTIONS[options])
    wrapped = LARS(torch.optim.SGD(wrapped_params, lr=0.1, fused=True, **SGD_OPTIONS[options]), trust_coef=0.02, clip=clip)
    foreach = LARS(torch.optim.SGD(foreach_params, lr=0.1, foreach=True, **SGD_OPTIONS[options]), trust_coef=0.02, clip=clip)
    for step in range(30):
        set_grads([fused_params, wrapped_params, foreach_params], step)
        fused.step()
        wrapped.step()
        foreach.step()
    # The wrapper and the standalone class are one code path: bit for bit.
    for param, wrapped_param in zip(fused_params, wrapped_params):
        assert torch.equal(param, wrapped_param)
    assert_close_to_scale(fused_params, foreach_params, 1e-6)
    if SGD_OPTIONS[options].get("momentum"):
        assert_close_to_scale(
            [fused.state[p]["momentum_buffer"] for p in fused_params],
            [foreach.optim.state[p]["momentum_buffer"] for p in foreach_params],
            1e-6,
        )


@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("options", sorted(SGD_OPTIONS))
def test_fp64_stays_fp64(options, clip):
    # The fused kernel accumulates the norms and keeps the ratios of fp64 parameters in fp64,
    # as every other path: 15 steps agree with the foreach path to 1e-12 of the weights' scale
    # (with fp32 norms they were 1e-9 to 2e-8 apart).
    fused_params, wrapped_params, foreach_params = (make_params(torch.float64) for _ in range(3))
    fused = LARSSGD(fused_params, lr=0.1, trust_coef=0.02, clip=clip, fused=True, **SGD_OPTIONS[options])
    wrapped = LARS(torch.optim.SGD(wrapped_params, lr=0.1, fused=True, **SGD_OPTIONS[options]), trust_coef=0.02, clip=clip)
    foreach = LARS(torch.optim.SGD(foreach_params, lr=0.1, foreach=True, **SGD_OPTIONS[options]), trust_coef=0.02, clip=clip)
    for step in range(15):
        set_grads([fused_params, wrapped_params, foreach_params], step)
        fused.step()
        wrapped.step()
        foreach.step()
    assert_close_to_scale(fused_params, foreach_params, 1e-12)
    assert_close_to_scale(wrapped_params, foreach_params, 1e-12)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_other_dtypes(dtype, tolerance):
    # Norms are accumulated in fp32 for half types, which compute in fp32; in fp64 for fp64.
    fused_params, foreach_params = make_params(dtype), make_params(dtype)
    fused = LARSSGD(fused_params, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, fused=True)
    foreach = LARSSGD(foreach_params, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, foreach=True)
    for step in range(5):
        set_grads([fused_params, foreach_params], step)
        fused.step()
        foreach.step()
    assert all(p.dtype == dtype for p in fused_params)
    assert_close_to_scale(fused_params, foreach_params, tolerance)


def test_mixed_dtypes_and_parameters_without_grads():
    params = make_params()
    params[1] = torch.nn.Parameter(params[1].detach().double())
    reference_params = copy.deepcopy(params)
    fused = LARSSGD(params, lr=0.1, momentum=0.9, fused=True)
    foreach = LARSSGD(reference_params, lr=0.1, momentum=0.9, foreach=True)
    for step in range(3):
        set_grads([params, reference_params], step)
        if step == 0:  # parameter 2 has its first step later than the others
            params[2].grad = reference_params[2].grad = None
        fused.step()
        foreach.step()
    assert_close_to_scale(params, reference_params, 1e-6)


def test_fused_none_picks_the_fused_operator_on_the_cpu(monkeypatch):
    calls = []
    fused_lars_sgd = torchlars._kernels.fused_lars_sgd
    monkeypatch.setattr(torchlars._kernels, "fused_lars_sgd", lambda *a, **k: calls.append(1) or fused_lars_sgd(*a, **k))
    params = make_params()
    optimizer = LARSSGD(params, lr=0.1, momentum=0.9)
    assert optimizer._step_supports_amp_scaling
    set_grads([params], 0)
    optimizer.step()
    assert calls, "the fused operator did not step"
    assert not LARSSGD(make_params(), lr=0.1, foreach=True)._step_supports_amp_scaling
    assert not LARS(torch.optim.SGD(make_params(), lr=0.1, foreach=True))._step_supports_amp_scaling
    assert LARS(torch.optim.SGD(make_params(), lr=0.1, fused=True))._step_supports_amp_scaling


@pytest.mark.parametrize("build", ["LARSSGD_foreach", "LARSSGD_fused", "LARS_fused_SGD"])
def test_grads_are_left_as_the_callers(build):
    params = make_params()
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    if build == "LARS_fused_SGD":
        optimizer = LARS(torch.optim.SGD(params, fused=True, **options))
    else:
        optimizer = LARSSGD(params, foreach=build == "LARSSGD_foreach", fused=build == "LARSSGD_fused", **options)
    set_grads([params], 0)
    grads = [p.grad.clone() for p in params]
    optimizer.step()
    for param, grad in zip(params, grads):
        assert torch.equal(param.grad, grad)


def test_excluded_groups_step_with_the_base():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    reference_model = copy.deepcopy(model)
    groups = torchlars.exclude_bias_and_norm(model, 1e-2)
    optimizer = LARS(torch.optim.SGD(groups, lr=0.1, momentum=0.9, fused=True))
    calls = []
    optimizer.optim.register_step_pre_hook(lambda opt, args, kwargs: calls.append(len(opt.param_groups)))
    reference = LARS(torch.optim.SGD(torchlars.exclude_bias_and_norm(reference_model, 1e-2), lr=0.1, momentum=0.9, foreach=True))
    for step in range(3):
        set_grads([list(model.parameters()), list(reference_model.parameters())], step)
        optimizer.step()
        reference.step()
    assert calls == [1, 1, 1], "the base steps once per step, over the excluded group only"
    assert len(optimizer.param_groups) == 2
    assert_close_to_scale(list(model.parameters()), list(reference_model.parameters()), 1e-6)


def test_state_dict_loads_into_plain_sgd():
    params = make_params()
    optimizer = LARS(torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True))
    set_grads([params], 0)
    optimizer.step()
    plain = torch.optim.SGD([p.detach().clone().requires_grad_() for p in params], lr=0.1, momentum=0.9)
    plain.load_state_dict(optimizer.state_dict())
    for index, param in enumerate(params):
        assert torch.equal(plain.state_dict()["state"][index]["momentum_buffer"], optimizer.state[param]["momentum_buffer"])


# ---------------------------------------------------------------------------------------
# Outside writes of the parameters: the next step takes ||w|| from the weights as they are


def _fused_and_foreach(wrapper):
    params, reference_params = make_params(), make_params()

    def build(p, **path):
        if wrapper:
            return LARS(torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, **path), trust_coef=0.02)
        return LARSSGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, **path)

    return params, build(params, fused=True), reference_params, build(reference_params, foreach=True)


def _step_both(params, optimizer, reference_params, reference, step):
    set_grads([params, reference_params], step)
    optimizer.step()
    reference.step()


def _swap_in_ema(params, optimizer):
    ema = [p.detach() * 0.5 for p in params]
    for param, average in zip(params, ema):
        torch.utils.swap_tensors(param, torch.nn.Parameter(average))


def _in_place_edit(params, optimizer):
    with torch.no_grad():
        params[0].mul_(0.5)


def _module_load_state_dict(params, optimizer):
    module = torch.nn.Module()
    module.weight = params[0]
    module.load_state_dict({"weight": torch.full_like(params[0], 0.01)})


def _copy_under_no_grad(params, optimizer):  # what an EMA copy-back does
    with torch.no_grad():
        for param in params:
            param.copy_(param * 0.9)


def _parametrize(params, optimizer):
    class Scale(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

        def right_inverse(self, weight):
            return weight / 2

    module = torch.nn.Module()
    module.weight = params[0]
    torch.nn.utils.parametrize.register_parametrization(module, "weight", Scale())
    assert module.parametrizations.weight.original is params[0]  # set_ to the right inverse


def _replace_in_group(params, optimizer):
    replacement = torch.nn.Parameter(params[0].detach() * 3)
    optimizer.param_groups[0]["params"][0] = replacement
    params[0] = replacement


def _set_data(params, optimizer):
    params[0].data = params[0].detach() * 3


def _load_optimizer_state_dict(params, optimizer):
    optimizer.load_state_dict(optimizer.state_dict())


def _data_edit(params, optimizer):
    with torch.no_grad():
        params[0].data.mul_(3)  # unseen by the version counter


EDITS = {
    "in_place_edit": _in_place_edit,
    "module_load_state_dict": _module_load_state_dict,
    "ema_swap_tensors": _swap_in_ema,
    "ema_copy_under_no_grad": _copy_under_no_grad,
    "parametrization": _parametrize,
    "replaced_in_group": _replace_in_group,
    "set_data": _set_data,
    "optimizer_load_state_dict": _load_optimizer_state_dict,
    "data_edit": _data_edit,
}


@pytest.mark.parametrize("wrapper", [False, True], ids=["LARSSGD", "LARS"])
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_step_after_an_outside_write_uses_the_weights_as_they_are(edit, wrapper):
    params, optimizer, reference_params, reference = _fused_and_foreach(wrapper)
    for step in range(2):
        _step_both(params, optimizer, reference_params, reference, step)
    EDITS[edit](params, optimizer)
    EDITS[edit](reference_params, reference)
    _step_both(params, optimizer, reference_params, reference, 2)
    assert_close_to_scale(params, reference_params, 1e-6)


def test_checkpoint_resumed_in_a_new_process_continues_bit_for_bit(tmp_path):
    # The resumed runs, in a new process, start from the loaded weights and momentum buffers,
    # which must give the uninterrupted runs' bits.
    uninterrupted = {kind: _fused_resume_worker.train(kind, 0, _fused_resume_worker.STOP) for kind in _fused_resume_worker.KINDS}
    for kind in _fused_resume_worker.KINDS:
        torch.save({**_fused_resume_worker.train(kind, 0, 3), "step": 3}, tmp_path / f"{kind}_checkpoint.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    worker = pathlib.Path(_fused_resume_worker.__file__)
    subprocess.run([sys.executable, str(worker), str(tmp_path)], check=True, env=env, timeout=300)
    for kind, expected in uninterrupted.items():
        resumed = torch.load(tmp_path / f"{kind}_resumed.pt")
        halfway = torch.load(tmp_path / f"{kind}_checkpoint.pt")
        for name, value in expected["model"].items():
            assert torch.equal(resumed["model"][name], value), f"{kind}: {name}"
            assert not torch.equal(halfway["model"][name], value), f"{kind}: {name} did not move after the checkpoint"


# ---------------------------------------------------------------------------------------
# AMP


def _scaled_step(optimizer, scaler, params, grads):
    scaler.scale(torch.ones(()))  # what scaler.scale(loss) does first: set up the scale
    for param, grad in zip(params, grads):
        param.grad = grad * scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()


@pytest.mark.parametrize("wrapper", [False, True], ids=["LARSSGD", "LARS"])
def test_grad_scaler_unscales_inside_the_step(wrapper):
    params, reference_params = make_params(), make_params()
    if wrapper:
        optimizer = LARS(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, fused=True), trust_coef=0.02)
    else:
        optimizer = LARSSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, fused=True)
    reference = LARSSGD(reference_params, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(3):
        set_grads([reference_params], step)
        grads = [p.grad.clone() for p in reference_params]
        _scaled_step(optimizer, scaler, params, grads)
        reference.step()
        # The gradient the caller left is still the scaled one: unscaling happened in the kernel.
        assert torch.equal(params[0].grad, grads[0] * 1024.0)
    assert_close_to_scale(params, reference_params, 1e-6)


@pytest.mark.parametrize("wrapper", [False, True], ids=["LARSSGD", "LARS"])
@pytest.mark.parametrize("first", [False, True], ids=["later_step", "first_step"])
def test_an_overflowing_step_changes_nothing(first, wrapper):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    groups = torchlars.exclude_bias_and_norm(model, 1e-2)  # the excluded group is skipped too
    if wrapper:
        optimizer = LARS(torch.optim.SGD(groups, lr=0.1, momentum=0.9, dampening=0.1, fused=True))
    else:
        optimizer = LARSSGD(groups, lr=0.1, momentum=0.9, dampening=0.1, fused=True)
    params = list(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    generator = torch.Generator().manual_seed(0)
    if not first:
        _scaled_step(optimizer, scaler, params, [torch.randn(p.shape, generator=generator) for p in params])
    weights = [p.detach().clone() for p in params]
    buffers = [optimizer.state[p].get("momentum_buffer") for p in params]
    buffers = [None if b is None else b.clone() for b in buffers]
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    grads[1][0] = float("inf")
    scale = scaler.get_scale()
    _scaled_step(optimizer, scaler, params, grads)
    assert scaler.get_scale() == scale / 2, "GradScaler saw the overflow"
    for param, weight in zip(params, weights):
        assert torch.equal(param, weight)
    for param, buffer in zip(params, buffers):
        if buffer is None:
            assert "momentum_buffer" not in optimizer.state[param], "a skipped first step left a buffer"
        else:
            assert torch.equal(optimizer.state[param]["momentum_buffer"], buffer)
    if first:
        # The next step is still a first step: the buffer starts as that step's update.
        reference = copy.deepcopy(model)
        reference_optimizer = LARSSGD(torchlars.exclude_bias_and_norm(reference, 1e-2), lr=0.1, momentum=0.9,
                                      dampening=0.1, fused=True)
        clean = [torch.randn(p.shape, generator=generator) for p in params]
        _scaled_step(optimizer, scaler, params, clean)
        for param, grad in zip(reference.parameters(), clean):
            param.grad = grad.clone()
        reference_optimizer.step()
        assert_close_to_scale(params, list(reference.parameters()), 1e-6)


# ---------------------------------------------------------------------------------------
# Bad input and non-finite gradients


def test_nan_and_inf_gradients_without_a_scaler_behave_as_in_plain_sgd():
    params, foreach_params = make_params(), make_params()
    fused = LARSSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, fused=True)
    foreach = LARSSGD(foreach_params, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=True)
    set_grads([params, foreach_params], 0)
    for p in (params, foreach_params):
        p[0].grad[0, 0] = float("nan")
        p[2].grad[0, 0, 0] = float("inf")
    fused.step()
    foreach.step()
    for param, foreach_param in zip(params, foreach_params):
        assert torch.equal(param.isnan(), foreach_param.isnan())
    # The elements with a non-finite gradient turn NaN, where plain SGD turns them NaN or
    # -inf; every other element stays finite. (A NaN norm makes the ratio 1, an inf one 0.)
    nonfinite = [p.grad.isfinite().logical_not() for p in params]
    for param, bad in zip(params, nonfinite):
        assert torch.equal(param.isnan(), bad)
    plain = make_params()
    set_grads([plain], 0)
    plain[0].grad[0, 0], plain[2].grad[0, 0, 0] = float("nan"), float("inf")
    torch.optim.SGD(plain, lr=0.1, momentum=0.9, weight_decay=1e-2).step()
    for param, bad in zip(plain, nonfinite):
        assert torch.equal(param.isfinite().logical_not(), bad)


def _assert_refused(optimizer_or_factory, params, message):
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=message):
        optimizer = optimizer_or_factory()
        optimizer.step()
    for param, start in zip(params, before):
        assert torch.equal(param, start)


def test_fused_true_refuses_what_the_operator_cannot_step():
    params = make_params()
    set_grads([params], 0)
    meta = torch.nn.Parameter(torch.randn(3, device="meta"))
    _assert_refused(lambda: LARSSGD([*params, meta], lr=0.1, fused=True), params, r"`fused=True` steps CPU tensors.*parameter 5 of param group 0")
    integer = torch.nn.Parameter(torch.ones(3, dtype=torch.int32), requires_grad=False)
    _assert_refused(lambda: LARSSGD([*params, integer], lr=0.1, fused=True), params, r"`fused=True` steps floating-point.*torch.int32")
    complex_param = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    _assert_refused(lambda: LARSSGD([*params, complex_param], lr=0.1, fused=True), params, "complex64")


@pytest.mark.parametrize("wrapper", [False, True], ids=["LARSSGD", "LARS"])
def test_fused_sparse_gradients_are_refused_with_nothing_modified(wrapper):
    params = make_params()
    groups = [{"params": params[:3]}, {"params": params[3:]}]
    if wrapper:
        optimizer = LARS(torch.optim.SGD(groups, lr=0.1, fused=True))
    else:
        optimizer = LARSSGD(groups, lr=0.1, fused=True)
    set_grads([params], 0)
    params[4].grad = params[4].grad.to_sparse()
    _assert_refused(lambda: optimizer, params, r"sparse gradients.*parameter 1 of param group 1")


def test_fused_with_differentiable_is_refused_by_name():
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        LARS(torch.optim.SGD(make_params(), lr=0.1, fused=True, differentiable=True))


def _graph_ops(recorded):
    """A torch.compile backend that records the ops of the graphs it gets, then runs them."""

    def backend(graph_module, example_inputs):
        recorded.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    return backend


def test_compiled_step_calls_the_fused_operator():
    torch._dynamo.reset()
    params, eager_params = make_params(), make_params()
    optimizer = LARSSGD(params, lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-2, trust_coef=0.02)
    eager = LARSSGD(eager_params, lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-2, trust_coef=0.02, fused=True)
    ops: set[str] = set()
    compiled_step = torch.compile(optimizer.step, backend=_graph_ops(ops))
    for step in range(3):  # the first creates the momentum buffers
        set_grads([params, eager_params], step)
        compiled_step()
        eager.step()
    assert {"torchlars.lars_sgd_", "torchlars.lars_sgd_.default"} & ops, sorted(ops)
    for param, expected in zip(params, eager_params):
        assert torch.equal(param, expected)
    # The compiled step keeps its ratios too (telemetry), the eager step's.
    ratios, eager_ratios = optimizer.trust_ratios(), eager.trust_ratios()
    assert len(ratios) == len(params)
    for param, eager_param in zip(params, eager_params):
        assert torch.equal(ratios[param], eager_ratios[eager_param])
    torch._dynamo.reset()


# torch 2.11's dynamo cannot trace LARS(SGD(fused=True)) handing the base only its excluded groups.
OLD_DYNAMO = torch.__version__ < "2.13"


def _edit_between_steps(params, optimizer):
    with torch.no_grad():
        params[0].mul_(0.5)
        params[1].data.mul_(2.0)  # unseen by the version counter


@pytest.mark.parametrize("momentum", [0.9, 0.0], ids=["momentum", "no_momentum"])
@pytest.mark.parametrize("build", ["LARSSGD", "LARS_fused_SGD"])
@pytest.mark.parametrize("backend", ["inductor", "eager"])
def test_compiled_step_is_the_eager_step_through_an_edit(backend, build, momentum):
    # The compiled fused step gives the eager one's bits, also after a user's in-place edits
    # between two compiled steps.
    if build == "LARS_fused_SGD" and OLD_DYNAMO:
        pytest.skip("torch 2.11's dynamo cannot trace LARS(SGD(fused=True)) whole")
    torch._dynamo.reset()
    params, eager_params = make_params(), make_params()
    options = dict(lr=0.1, momentum=momentum, weight_decay=1e-2)
    if build == "LARSSGD":
        optimizer, eager = (LARSSGD(p, trust_coef=0.02, fused=True, **options) for p in (params, eager_params))
    else:
        optimizer, eager = (LARS(torch.optim.SGD(p, fused=True, **options), trust_coef=0.02)
                            for p in (params, eager_params))
    compiled_step = torch.compile(optimizer.step, backend=backend)
    for step in range(5):
        set_grads([params, eager_params], step)
        if step == 3:
            _edit_between_steps(params, optimizer)
            _edit_between_steps(eager_params, eager)
        compiled_step()
        eager.step()
        for param, expected in zip(params, eager_params):
            torch.testing.assert_close(param, expected, rtol=0, atol=0)
    torch._dynamo.reset()


def test_a_compiled_first_step_that_overflows_leaves_zero_buffers():
    # The compiled step cannot return on the host: the kernel skips, and the buffers it made stay
    # zeros (not uninitialised memory), so the next step starts from that step's update.
    torch._dynamo.reset()
    params, eager_params = make_params(), make_params()
    optimizer = LARSSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, fused=True)
    eager = LARSSGD(eager_params, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, fused=True)
    compiled_step = torch.compile(optimizer.step, backend="eager")
    weights = [p.detach().clone() for p in params]
    set_grads([params, eager_params], 0)
    for o in (optimizer, eager):
        o.grad_scale, o.found_inf = torch.tensor(1.0), torch.tensor(1.0)  # as GradScaler hands them
    compiled_step()
    eager.step()
    for param, weight in zip(params, weights):
        assert torch.equal(param, weight)
    for param in params:
        assert torch.equal(optimizer.state[param]["momentum_buffer"], torch.zeros_like(param))
    assert all(ratio.isnan() for ratio in optimizer.trust_ratios().values()), "a skipped step used no ratio"
    for o in (optimizer, eager):
        o.found_inf = torch.tensor(0.0)
    set_grads([params, eager_params], 1)
    compiled_step()
    eager.step()  # eager skipped on the host: this is its first step
    assert_close_to_scale(params, eager_params, 1e-6)
    torch._dynamo.reset()
