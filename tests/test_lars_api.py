"""LARS as a torch.optim.Optimizer: construction, errors, hooks, schedulers, state dicts."""

import collections
import copy
import functools
import io
import pathlib
import pickle
import subprocess
import sys

import pytest
import torch
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from lars_reference import ReferenceLARS
from torchlars import LARS
from torchlars_extension import import_extension


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def backward(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=generator)
    model.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    return loss


def make_lars(model, **kwargs):
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return LARS(base, **kwargs)


# --- construction and bad input ------------------------------------------------------------


def test_torchlars_0_1_2_call_is_unchanged():
    model = make_model()
    optimizer = LARS(torch.optim.SGD(model.parameters(), lr=0.1), eps=1e-8, trust_coef=0.001)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert (optimizer.eps, optimizer.trust_coef, optimizer.clip) == (1e-8, 0.001, False)
    optimizer = LARS(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), eps=1e-8, trust_coef=0.001, clip=True)
    assert optimizer.clip is True


def test_shares_the_base_optimizers_objects():
    base = torch.optim.SGD(make_model().parameters(), lr=0.1, momentum=0.9)
    optimizer = LARS(base)
    assert optimizer.param_groups is base.param_groups
    assert optimizer.state is base.state
    assert optimizer.defaults is base.defaults


@pytest.mark.parametrize("argument", ["eps", "trust_coef"])
def test_negative_settings_raise_value_error_naming_the_argument(argument):
    with pytest.raises(ValueError, match=argument):
        LARS(torch.optim.SGD(make_model().parameters(), lr=0.1), **{argument: -1e-3})


@pytest.mark.parametrize("not_an_optimizer", [None, [torch.zeros(1)], torch.nn.Linear(1, 1), "sgd"])
def test_non_optimizer_raises_type_error_naming_the_argument(not_an_optimizer):
    with pytest.raises(TypeError, match="optimizer"):
        LARS(not_an_optimizer)


def test_sparse_gradient_raises_naming_the_parameter_and_modifies_nothing():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Linear(4, 2)
    optimizer = LARS(torch.optim.SGD([{"params": dense.parameters()}, {"params": embedding.parameters()}], lr=0.1,
                                     weight_decay=1e-2))
    dense(embedding(torch.tensor([1, 2, 3]))).sum().backward()
    before = [p.detach().clone() for p in (*dense.parameters(), embedding.weight)]
    grads_before = [p.grad.clone() for p in dense.parameters()]
    with pytest.raises(RuntimeError, match=r"sparse gradients: parameter 0 of param group 1"):
        optimizer.step()
    for param, expected in zip((*dense.parameters(), embedding.weight), before):
        assert torch.equal(param.detach(), expected)
    for param, expected in zip(dense.parameters(), grads_before):
        assert torch.equal(param.grad, expected)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-2, 1e-2]


def _lars_by_hand(param, grad, *, lr, weight_decay, trust_coef, maximize):
    """One LARS step around SGD (no momentum), written out: differentiable by construction."""
    grad = -grad if maximize else grad
    ratio = trust_coef * param.norm() / (grad.norm() + weight_decay * param.norm() + 1e-8)
    return param - lr * (grad + weight_decay * param) * ratio


@pytest.mark.parametrize("maximize", [False, True])
def test_differentiable_base_steps_differentiably_like_lars_by_hand(maximize):
    settings = dict(lr=0.1, weight_decay=1e-2, trust_coef=0.02)

    def lars_step(param, grad):
        param = param.clone()  # torch.optim's differentiable steps update non-leaf tensors
        param.grad = grad
        base = torch.optim.SGD([param], lr=settings["lr"], weight_decay=settings["weight_decay"], maximize=maximize,
                               differentiable=True)
        LARS(base, trust_coef=settings["trust_coef"]).step()
        return param

    generator = torch.Generator().manual_seed(4)
    param = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(lars_step(param, grad), _lars_by_hand(param, grad, maximize=maximize, **settings))
    # The derivatives of the new parameter by the old one and by the gradient: autograd's
    # through LARS and SGD agree with finite differences.
    assert torch.autograd.gradcheck(lars_step, (param, grad))


def test_base_that_needs_a_closure_is_refused_by_name():
    with pytest.raises(TypeError, match=r"LARS cannot wrap LBFGS: its step needs a closure"):
        LARS(torch.optim.LBFGS(make_model().parameters()))


def test_fsdp1_flat_parameters_are_refused_pointing_to_fsdp2():
    # What FSDP1 marks its FlatParameter and, with use_orig_params=True, the views into it
    # with (tests/_distributed_worker.py runs the real FullyShardedDataParallel).
    flat, view = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(2, 3))
    flat._is_flat_param = True
    view._fsdp_flattened = True
    for param, kind in ((flat, "FlatParameter"), (view, "use_orig_params=True")):
        with pytest.raises(ValueError, match=rf"parameter 1 of param group 0: it is .*{kind}.*FSDP2"):
            LARS(torch.optim.SGD([torch.nn.Parameter(torch.ones(2)), param], lr=0.1))


# --- step -----------------------------------------------------------------------------------


def test_closure_runs_first_and_its_gradients_are_scaled():
    model = make_model()
    reference_model = copy.deepcopy(model)
    optimizer = make_lars(model)
    reference = make_lars(reference_model)
    backward(model, seed=1)  # stale gradients that the closure must replace

    def closure():
        return backward(model, seed=2)

    loss = optimizer.step(closure)
    backward(reference_model, seed=2)
    reference.step()
    assert torch.is_tensor(loss) and loss.requires_grad
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(param, expected)


def test_closure_gets_grad_enabled_inside_no_grad():
    model = make_model()
    optimizer = make_lars(model)
    with torch.no_grad():
        loss = optimizer.step(lambda: backward(model))
    assert loss.requires_grad


def test_weight_decay_restored_when_base_step_raises():
    class Exploding(torch.optim.SGD):
        def step(self, closure=None):
            assert all(group["weight_decay"] == 0.0 for group in self.param_groups)
            raise RuntimeError("boom")

    model = make_model()
    optimizer = LARS(Exploding(model.parameters(), lr=0.1, weight_decay=5e-4))
    backward(model)
    with pytest.raises(RuntimeError, match="boom"):
        optimizer.step()
    assert optimizer.param_groups[0]["weight_decay"] == 5e-4


def test_excluded_group_keeps_its_weight_decay_during_the_base_step():
    seen = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            seen.append([group["weight_decay"] for group in self.param_groups])
            return super().step(closure)

    model = make_model()
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = LARS(Recording([{"params": weights}, {"params": biases, "lars_exclude": True}], lr=0.1,
                               weight_decay=1e-2))
    backward(model)
    optimizer.step()
    assert seen == [[0.0, 1e-2]]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-2, 1e-2]


def test_base_without_weight_decay_option():
    model = make_model()
    optimizer = LARS(torch.optim.Rprop(model.parameters(), lr=0.01))
    backward(model)
    optimizer.step()
    assert "weight_decay" not in optimizer.param_groups[0]


def test_step_runs_on_meta_tensors_so_it_never_syncs():
    # Any .item(), bool(tensor) or alpha=<tensor> raises on the meta device.
    params = [torch.nn.Parameter(torch.empty(shape, device="meta", dtype=dtype))
              for shape, dtype in [((64, 32), torch.float32), ((32,), torch.float32), ((8, 8), torch.bfloat16)]]
    for param in params:
        param.grad = torch.empty_like(param)
    for clip in (False, True):
        for lr, weight_decay in ((0.1, 1e-4), (torch.tensor(0.1), torch.tensor(1e-4, device="meta"))):
            for maximize in (False, True):
                base = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:2], "lars_exclude": True},
                                        {"params": params[2:]}], lr=lr, momentum=0.9, maximize=maximize)
                for group in base.param_groups:  # after construction: SGD's own check would sync
                    if not group.get("lars_exclude", False):  # SGD itself would sync on an excluded one
                        group["weight_decay"] = weight_decay
                LARS(base, clip=clip).step()


class _CountOps(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(num_params, clip):
    params = [torch.nn.Parameter(torch.empty(16, 8, device="meta")) for _ in range(num_params)]
    for param in params:
        param.grad = torch.empty_like(param)
    # foreach=True: on the meta device SGD would otherwise pick its per-parameter loop.
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)
    optimizer = LARS(base, clip=clip)
    optimizer.step()  # the first step creates SGD's momentum buffers, one per parameter
    with _CountOps() as counter:
        optimizer.step()
    return counter.ops


@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
def test_operators_per_step_do_not_grow_with_the_number_of_parameters(clip):
    # Multi-tensor ops: the same operators whether the model has 4 parameters or 64, so on a
    # GPU the launches per step do not grow with the model's depth (torchlars 0.1.2 looped).
    few, many = _ops_per_step(4, clip), _ops_per_step(64, clip)
    assert many == few
    assert any("_foreach_norm" in op for op in few)


def test_zero_grad_and_add_param_group_reach_the_base():
    model = make_model()
    extra = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = make_lars(model)
    optimizer.add_param_group({"params": [extra], "lars_exclude": True, "lr": 0.01})
    assert optimizer.optim.param_groups[-1]["lars_exclude"] is True
    assert optimizer.param_groups[-1]["momentum"] == 0.9  # filled in from the base's defaults
    backward(model)
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


# --- hooks --------------------------------------------------------------------------------


def _compiled(step):
    return torch.compile(step, fullgraph=True)


STEP_MODES = {"eager": lambda step: step, "compiled": _compiled}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", sorted(STEP_MODES))
def test_each_hook_runs_once_per_step(mode, fresh_dynamo):
    model = make_model()
    optimizer = make_lars(model)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", type(opt).__name__)))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", type(opt).__name__)))
    optimizer.optim.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("base pre", type(opt).__name__)))
    optimizer.optim.register_step_post_hook(lambda opt, args, kwargs: calls.append(("base post", type(opt).__name__)))
    handles = [
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append(("global pre", type(opt).__name__))),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(("global post", type(opt).__name__))),
    ]
    step = STEP_MODES[mode](lambda: optimizer.step())
    try:
        backward(model)
        step()
    finally:
        for handle in handles:
            handle.remove()
    # The global hooks see the optimizer the user steps, once; the base's own hooks run around its step.
    assert calls == [("global pre", "LARS"), ("pre", "LARS"), ("base pre", "SGD"), ("base post", "SGD"),
                     ("post", "LARS"), ("global post", "LARS")]


@pytest.mark.parametrize("mode", sorted(STEP_MODES))
def test_pre_hook_return_values_are_honoured(mode, fresh_dynamo):
    model = make_model()
    reference_model = copy.deepcopy(model)
    optimizer = make_lars(model)
    reference = make_lars(reference_model)
    backward(reference_model, seed=2)
    fresh_grads = [p.grad.clone() for p in reference_model.parameters()]
    backward(model, seed=1)  # stale gradients that the hook's closure must replace
    base_closure_calls = []

    def closure():
        for param, grad in zip(model.parameters(), fresh_grads):
            param.grad.copy_(grad)

    # A LARS pre-hook that supplies the closure, and a base pre-hook that hands the base one.
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: ((opt,), {"closure": closure}))
    optimizer.optim.register_step_pre_hook(
        lambda opt, args, kwargs: ((opt,), {"closure": lambda: base_closure_calls.append("called")}))
    STEP_MODES[mode](lambda: optimizer.step())()
    reference.step()
    assert base_closure_calls == ["called"]
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)


def test_unknown_step_wrapping_falls_back_to_the_public_step_with_a_warning(monkeypatch):
    class RewrappedSGD(torch.optim.SGD):
        pass

    model = make_model()
    reference_model = copy.deepcopy(model)
    optimizer = LARS(RewrappedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))
    reference = make_lars(reference_model)
    # As if a torch release wrapped step without the layer LARS knows (its "hooked" mark).
    monkeypatch.setattr(RewrappedSGD, "step", RewrappedSGD.step.__wrapped__)
    backward(model)
    backward(reference_model)
    with pytest.warns(UserWarning, match="does not wrap step as torchlars knows it"):
        optimizer.step()
    reference.step()
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(param, expected)
    assert optimizer.param_groups[0]["weight_decay"] == 1e-3


def test_bad_pre_hook_return_value_is_refused_like_torch_refuses_it():
    model = make_model()
    optimizer = make_lars(model)
    optimizer.optim.register_step_pre_hook(lambda opt, args, kwargs: "not (args, kwargs)")
    backward(model)
    with pytest.raises(RuntimeError, match="new_args, new_kwargs"):
        optimizer.step()
    assert optimizer.param_groups[0]["weight_decay"] == 1e-3


def test_subclass_wrapper_of_step_is_kept(fresh_dynamo):
    calls = []

    def recorded(step):
        @functools.wraps(step)
        def wrapper(self, *args, **kwargs):
            calls.append("wrapper")
            return step(self, *args, **kwargs)
        return wrapper

    class RecordedSGD(torch.optim.SGD):
        @recorded
        def step(self, closure=None):
            return super().step(closure)

    model = make_model()
    optimizer = LARS(RecordedSGD(model.parameters(), lr=0.1, weight_decay=1e-3))
    backward(model)
    optimizer.step()
    torch.compile(optimizer.step)()
    assert calls == ["wrapper", "wrapper"]


def test_state_dict_hooks_run():
    optimizer = make_lars(make_model())
    optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": 1})
    loaded = []
    optimizer.register_load_state_dict_post_hook(lambda opt: loaded.append(opt))
    state_dict = optimizer.state_dict()
    assert state_dict["extra"] == 1
    optimizer.load_state_dict(state_dict)
    assert loaded == [optimizer]


# --- schedulers -------------------------------------------------------------------------------

SCHEDULERS = {
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda epoch: 0.9**epoch),
    "MultiplicativeLR": lambda opt: lr_scheduler.MultiplicativeLR(opt, lambda epoch: 0.9),
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=2),
    "MultiStepLR": lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[1, 3]),
    "ConstantLR": lambda opt: lr_scheduler.ConstantLR(opt),
    "LinearLR": lambda opt: lr_scheduler.LinearLR(opt),
    "ExponentialLR": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.9),
    "PolynomialLR": lambda opt: lr_scheduler.PolynomialLR(opt, total_iters=4, power=2.0),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=5),
    "CosineAnnealingWarmRestarts": lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2),
    "CyclicLR": lambda opt: lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt), lr_scheduler.ExponentialLR(opt, 0.9)], milestones=[2]),
    "ChainedScheduler": lambda opt: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(opt), lr_scheduler.ExponentialLR(opt, 0.9)]),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, patience=0),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_with_its_defaults_drives_lars_like_the_base(name):
    model = make_model()
    reference_model = copy.deepcopy(model)
    optimizer = make_lars(model)
    reference = make_lars(reference_model)
    scheduler = SCHEDULERS[name](optimizer)
    reference_scheduler = SCHEDULERS[name](reference.optim)
    lrs = []
    for step in range(5):
        for m, opt in ((model, optimizer), (reference_model, reference)):
            loss = backward(m, seed=step)
            opt.step()
        for sched in (scheduler, reference_scheduler):
            sched.step(loss.item()) if name == "ReduceLROnPlateau" else sched.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        assert lrs[-1] == reference.param_groups[0]["lr"]
    assert len(set(lrs)) > 1 or name == "ConstantLR" and lrs[-1] == 0.1
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(param, expected)


def test_scheduler_cycles_the_momentum_the_base_steps_with():
    # OneCycleLR sets lr and momentum on LARS's param groups; the base must step with them, as
    # LARS by hand around an SGD driven by the same schedule does.
    model = make_model()
    reference_model = copy.deepcopy(model)
    optimizer = make_lars(model)
    reference = ReferenceLARS(torch.optim.SGD, [{"params": list(reference_model.parameters()), "weight_decay": 1e-3}],
                              {"lr": 0.1, "momentum": 0.9})
    schedulers = [lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10) for opt in (optimizer, reference.base)]
    momenta = []
    for step in range(4):
        backward(model, seed=step)
        backward(reference_model, seed=step)
        optimizer.step()
        reference.step()
        for scheduler in schedulers:
            scheduler.step()
        momenta.append(optimizer.param_groups[0]["momentum"])
    assert len(set(momenta)) == 4
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)


# --- serialisation -------------------------------------------------------------------------------


def saved(state_dict):
    """The state dict as it comes back from disk (loading does not copy same-device tensors)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def train(model, optimizer, steps, first_seed=0):
    for seed in range(first_seed, first_seed + steps):
        backward(model, seed)
        optimizer.step()


def test_state_dict_loads_into_plain_base_and_back():
    model = make_model()
    optimizer = make_lars(model, eps=1e-6, trust_coef=0.01, clip=True)
    train(model, optimizer, 3)
    state_dict = saved(optimizer.state_dict())
    assert state_dict["lars"] == {"eps": 1e-6, "trust_coef": 0.01, "clip": True, "trust_ratio": "paper"}

    # LARS -> plain SGD: the base continues from the same momentum buffers.
    plain = torch.optim.SGD(model.parameters(), lr=0.5)
    plain.load_state_dict(state_dict)
    assert plain.param_groups[0]["momentum"] == 0.9
    for p in model.parameters():
        assert torch.equal(plain.state[p]["momentum_buffer"], optimizer.state[p]["momentum_buffer"])

    # plain SGD -> LARS: LARS keeps its own settings and continues identically.
    restored_model = copy.deepcopy(model)
    restored = LARS(torch.optim.SGD(restored_model.parameters(), lr=0.5), eps=1e-6, trust_coef=0.01, clip=True)
    restored.load_state_dict(saved(plain.state_dict()))
    train(model, optimizer, 2, first_seed=3)
    train(restored_model, restored, 2, first_seed=3)
    for param, expected in zip(restored_model.parameters(), model.parameters()):
        assert torch.equal(param, expected)


def test_lars_settings_survive_a_round_trip():
    model = make_model()
    optimizer = make_lars(model, eps=1e-5, trust_coef=0.02, clip=True)
    train(model, optimizer, 2)
    restored_model = copy.deepcopy(model)
    restored = make_lars(restored_model)  # default settings, overwritten by the load
    restored.load_state_dict(saved(optimizer.state_dict()))
    assert (restored.eps, restored.trust_coef, restored.clip) == (1e-5, 0.02, True)
    train(model, optimizer, 2, first_seed=2)
    train(restored_model, restored, 2, first_seed=2)
    for param, expected in zip(restored_model.parameters(), model.parameters()):
        assert torch.equal(param, expected)


def test_load_state_dict_rejects_bad_settings_before_changing_anything():
    optimizer = make_lars(make_model())
    state_dict = optimizer.state_dict()
    state_dict["lars"]["trust_coef"] = -1.0
    state_dict["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match="trust_coef"):
        optimizer.load_state_dict(state_dict)
    assert optimizer.trust_coef == 0.001 and optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda opt: pickle.loads(pickle.dumps(opt))],
                         ids=["deepcopy", "pickle"])
def test_deepcopy_and_pickle(clone):
    model = make_model()
    optimizer = make_lars(model, eps=1e-6, trust_coef=0.01, clip=True)
    train(model, optimizer, 2)
    copied = clone(optimizer)
    assert isinstance(copied, LARS)
    assert (copied.eps, copied.trust_coef, copied.clip) == (1e-6, 0.01, True)
    assert copied.param_groups is copied.optim.param_groups
    assert copied.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    copied_params = copied.param_groups[0]["params"]
    for p, q in zip(copied_params, model.parameters()):
        p.grad = torch.ones_like(p)
    copied.step()  # the clone steps on its own, with hooks working
    assert not torch.equal(copied_params[0], next(model.parameters()))


def test_repr_names_lars_and_the_base():
    text = repr(make_lars(make_model(), clip=True))
    assert text.startswith("LARS(") and "clip=True" in text and "SGD" in text


# --- mixed precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_scaler_with_autocast_on_cpu(dtype):
    model = make_model()
    reference_model = copy.deepcopy(model)
    optimizer = make_lars(model)
    reference = make_lars(reference_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 6)
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = model(x).square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        reference.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            reference_loss = reference_model(x).square().mean()
        reference_loss.backward()
        reference.step()
    assert scaler.get_scale() == 2.0**10  # no inf found, no skipped step
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_grad_scaler_skips_the_step_on_inf(fused):
    # Around a foreach SGD, GradScaler unscales and checks the gradients itself, and never calls
    # LARS.step on an overflow. Around a fused SGD, LARS takes grad_scale and found_inf as torch's
    # fused optimizers do: GradScaler calls LARS.step, which must change nothing.
    if fused:
        import_extension("torchlars.ops")
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3,
                           **({"fused": True} if fused else {"foreach": True}))
    optimizer = LARS(base)
    lars_steps = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: lars_steps.append(opt.found_inf.item()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(8, 6)).sum() * float("inf")
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert lars_steps == ([1.0] if fused else [])
    assert scaler.get_scale() == 2.0**9
    for param, expected in zip(model.parameters(), before):
        assert torch.equal(param, expected)
        assert "momentum_buffer" not in optimizer.state[param]
    assert optimizer.param_groups[0]["weight_decay"] == 1e-3


# --- robustness to torch's private names -------------------------------------------------------

_WITHOUT_PRIVATE_NAMES = r"""
import copy, sys, warnings
import torch
import torch.optim.optimizer as optimizer_module
import torch.utils._foreach_utils as foreach_utils

sys.path.insert(0, sys.argv[1])
from lars_reference import ReferenceLARS

# What a torch release that renamed these private names would look like to torchlars.
renamed = {name: getattr(optimizer_module, name) for name in
           ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks", "_use_grad_for_differentiable")}
for name in renamed:
    delattr(optimizer_module, name)
del foreach_utils._group_tensors_by_device_and_dtype
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from torchlars import LARS
assert any("_use_grad_for_differentiable" in str(w.message) for w in caught), [str(w.message) for w in caught]
# torch's own Optimizer.step wrapper still needs its global hook dicts.
optimizer_module._global_optimizer_pre_hooks = renamed["_global_optimizer_pre_hooks"]
optimizer_module._global_optimizer_post_hooks = renamed["_global_optimizer_post_hooks"]

torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(3, 8, dtype=torch.float64))]
reference_params = copy.deepcopy(params)
optimizer = LARS(torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=1e-2), trust_coef=0.02)
reference = ReferenceLARS(torch.optim.SGD, [{"params": reference_params, "weight_decay": 1e-2}],
                          {"lr": 0.5, "momentum": 0.9}, trust_coef=0.02)
compiled_step = torch.compile(optimizer.step)  # graph-broken around the base's update, still right
for step in range(3):
    for param, reference_param in zip(params, reference_params):
        param.grad = torch.randn_like(param)
        reference_param.grad = param.grad.clone()
    (compiled_step if step else optimizer.step)()
    reference.step()
for param, expected in zip(params, reference_params):
    torch.testing.assert_close(param, expected)
print("ok")
"""


def test_import_and_step_need_no_private_torch_name(tmp_path):
    # `import torchlars` must survive a torch release that renames a private name; the step
    # then still gives LARS's numbers (under torch.compile with a graph break, and a warning).
    tests_dir = str(pathlib.Path(__file__).parent)
    result = subprocess.run([sys.executable, "-c", _WITHOUT_PRIVATE_NAMES, tests_dir], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
