"""torchlars.LAMB: the numbers of its formula, of the "update" wrapper, of timm's Lamb and of AdamW
where they coincide, AdamW's state dict both ways, GradScaler, torch.compile, the meta device, and
what a transformers Trainer builds."""

import copy
import math

import pytest
import torch
from torch import nn

import torchlars
from torchlars import LAMB, LARS
from torchlars._functional import LAMBSettings
from torchlars.lamb import lamb

# What the functional lamb() takes for a LAMB group with the defaults (weight decay 0.01: adapted).
SETTINGS = LAMBSettings(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, trust_coef=1.0, trust_eps=0.0,
                        trust_clip=False, adapt=True, bias_correction=True, maximize=False)

# ---------------------------------------------------------------------------------------
# An independent reference: the formula of the SPEC, one parameter at a time, in Python floats
# for the scalars and fp64 for the tensors.


class ReferenceLAMB:
    def __init__(self, groups, *, max_grad_norm=None, **defaults):
        options = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, trust_coef=1.0, trust_eps=0.0,
                       trust_clip=False, always_adapt=False, bias_correction=True, maximize=False)
        options.update(defaults)
        self.groups = [{**options, **group, "params": [p.detach().double().clone() for p in group["params"]]}
                       for group in groups]
        self.max_grad_norm = max_grad_norm
        self.state = {}
        self.ratios = []

    def step(self, grads):
        """``grads``: one list per group, aligned with its params."""
        grads = [[g.double() for g in group_grads] for group_grads in grads]
        if self.max_grad_norm is not None:
            total = math.sqrt(sum(g.square().sum().item() for group_grads in grads for g in group_grads))
            clip = max(total / self.max_grad_norm, 1.0)
            grads = [[g / clip for g in group_grads] for group_grads in grads]
        self.ratios = []
        for group_index, (group, group_grads) in enumerate(zip(self.groups, grads)):
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            wd = group["weight_decay"]
            adapt = not group.get("lars_exclude", False) and (wd != 0 or group["always_adapt"])
            for index, (w, g) in enumerate(zip(group["params"], group_grads)):
                if group["maximize"]:
                    g = -g
                m, v, t = self.state.get((group_index, index), (torch.zeros_like(w), torch.zeros_like(w), 0))
                m = beta1 * m + (1 - beta1) * g
                v = beta2 * v + (1 - beta2) * g * g
                t += 1
                self.state[group_index, index] = (m, v, t)
                m_hat, v_hat = (m / (1 - beta1**t), v / (1 - beta2**t)) if group["bias_correction"] else (m, v)
                u = m_hat / (v_hat.sqrt() + group["eps"]) + wd * w
                r = 1.0
                if adapt:
                    w_norm, u_norm = w.norm().item(), u.norm().item()
                    if w_norm > 0 and u_norm > 0:
                        r = group["trust_coef"] * w_norm / (u_norm + group["trust_eps"])
                    if group["trust_clip"]:
                        r = min(r, 1.0)
                    self.ratios.append(r)
                group["params"][index] = w - lr * r * u


def _tensors(dtype, device="cpu"):
    """Parameters of several scales (ratios above and below 1) and a zero one (ratio 1)."""
    generator = torch.Generator().manual_seed(0)
    shapes_and_scales = [((6, 5), 1.0), ((5,), 0.1), ((4, 6), 5.0), ((3,), 0.0), ((2, 3, 2), 0.02)]
    return [(torch.randn(shape, generator=generator) * scale).to(device, dtype) for shape, scale in shapes_and_scales]


def _grads(params, step, scale=1.0):
    generator = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=generator) * scale).to(p.dtype) for p in params]


def _groups(params, layout):
    """Param groups over ``params``: one group, or decay / no-decay / excluded groups."""
    if layout == "one":
        return [{"params": params}]
    return [
        {"params": params[0:1] + params[2:3]},
        {"params": params[1:2] + params[3:4], "weight_decay": 0.0},
        {"params": params[4:5], "lars_exclude": True, "weight_decay": 0.05},
    ]


_OPTIONS = {
    "defaults": dict(),
    "lr_wd_betas_eps": dict(lr=0.02, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-4),
    "trust_coef_eps": dict(lr=0.01, trust_coef=0.3, trust_eps=0.5),
    "trust_clip": dict(lr=0.01, trust_clip=True),
    "always_adapt": dict(lr=0.01, always_adapt=True, weight_decay=0.0),
    "no_bias_correction": dict(lr=0.01, bias_correction=False),
    "max_grad_norm": dict(lr=0.01, max_grad_norm=0.5),
    "max_grad_norm_inactive": dict(lr=0.01, max_grad_norm=1e6),
    "maximize": dict(lr=0.01, maximize=True),
    "tensor_lr": dict(lr=torch.tensor(0.01), weight_decay=0.02),
}


def _run(options, layout, dtype, steps=3, grad_scale=1.0, **implementation):
    params = [nn.Parameter(p) for p in _tensors(dtype)]
    optimizer = LAMB(_groups(params, layout), **options, **implementation)
    reference = ReferenceLAMB(_groups(_tensors(torch.float64), layout), **options)
    for step in range(steps):
        grads = _grads(params, step, grad_scale)
        for p, g in zip(params, grads):
            p.grad = g.clone()  # a fused fp32/fp64 step leaves its update u there
        optimizer.step()
        by_group = [[g for p, g in zip(params, grads) if any(p is q for q in group["params"])]
                    for group in optimizer.param_groups]
        reference.step(by_group)
    actual = [p for group in optimizer.param_groups for p in group["params"]]
    expected = [p for group in reference.groups for p in group["params"]]
    ratios = [optimizer.trust_ratios()[p] for group in optimizer.param_groups if _adapted(group) for p in group["params"]]
    return optimizer, actual, expected, ratios, reference.ratios


def _adapted(group):
    return not group.get("lars_exclude", False) and (group["weight_decay"] != 0 or group["always_adapt"])


def _fused_op_installed():
    try:
        import torchlars.ops  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops.torchlars, "lamb_")


needs_fused = pytest.mark.skipif(not _fused_op_installed(), reason="torch.ops.torchlars.lamb_ is not installed")


IMPLEMENTATIONS = [
    pytest.param(dict(foreach=True), id="foreach"),
    pytest.param(dict(foreach=False), id="single"),
    pytest.param(dict(fused=True), id="fused", marks=needs_fused),
]

_TIGHT = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["one", "groups"])
@pytest.mark.parametrize("option", list(_OPTIONS))
def test_steps_like_the_formula(option, layout, dtype, implementation):
    _, actual, expected, ratios, expected_ratios = _run(_OPTIONS[option], layout, dtype, **implementation)
    for p, q in zip(actual, expected):
        torch.testing.assert_close(p.detach().double(), q, **_TIGHT[dtype])
    assert [r.dtype for r in ratios] == [torch.float32 if dtype == torch.float32 else torch.float64] * len(ratios)
    torch.testing.assert_close(torch.stack(ratios).double(), torch.tensor(expected_ratios, dtype=torch.float64),
                               **_TIGHT[dtype])


def test_trust_clip_caps_ratios_above_one_only():
    _, _, _, _, unclipped = _run(dict(lr=0.01), "one", torch.float64)
    _, _, _, ratios, _ = _run(dict(lr=0.01, trust_clip=True), "one", torch.float64)
    assert min(unclipped) < 1 < max(unclipped)  # the test covers both sides
    torch.testing.assert_close(torch.stack(ratios), torch.tensor(unclipped, dtype=torch.float64).clamp(max=1.0))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_step_like_the_formula_to_rounding(dtype, implementation):
    # lr 0.05 so that a step is several ulps of the weights; m and v are kept in dtype.
    _, actual, expected, ratios, expected_ratios = _run(dict(lr=0.05), "groups", dtype, steps=2, **implementation)
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    for p, q in zip(actual, expected):
        torch.testing.assert_close(p.detach().double(), q, rtol=2 * ulp, atol=0.05 * ulp * 4)
    assert all(r.dtype == torch.float32 for r in ratios)
    torch.testing.assert_close(torch.stack(ratios).double(), torch.tensor(expected_ratios, dtype=torch.float64),
                               rtol=4 * ulp, atol=0)


def test_foreach_and_single_tensor_agree():
    runs = [_run(_OPTIONS["lr_wd_betas_eps"], "groups", torch.float32, foreach=foreach) for foreach in (True, False)]
    (opt_a, params_a, *_), (opt_b, params_b, *_) = runs
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_a.state[p][key], opt_b.state[q][key], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("options", [dict(), dict(max_grad_norm=1.0, lr=torch.tensor(0.01), trust_clip=True)])
def test_a_foreach_step_dispatches_as_many_operators_for_64_parameters_as_for_4(options):
    from kernel_count import count_kernels

    def operators(count):
        generator = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(3 + i % 5, 2, generator=generator)) for i in range(count)]
        optimizer = LAMB(_groups(params, "one"), **options, foreach=True)
        for step in range(2):  # the first step makes the state, one tensor at a time
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            ops = count_kernels(optimizer.step).ops
        return ops

    assert operators(4) == operators(64)


def test_trust_ratios_are_those_of_adapted_parameters():
    params = [nn.Parameter(p) for p in _tensors(torch.float32)]
    groups = _groups(params, "groups")
    optimizer = LAMB(groups)
    assert optimizer.trust_ratios() == {}
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    optimizer.step()
    ratios = optimizer.trust_ratios()
    assert set(ratios) == set(groups[0]["params"])  # not the no-decay group nor the excluded one
    assert all(r.ndim == 0 and r.dtype == torch.float32 for r in ratios.values())


# ---------------------------------------------------------------------------------------
# The peers where the maths coincide


@pytest.mark.parametrize("options", [dict(lr=0.01, weight_decay=0.1, eps=1e-6),
                                     dict(lr=0.02, weight_decay=0.0, eps=1e-4, trust_coef=0.5, trust_eps=0.1,
                                          betas=(0.8, 0.95), maximize=True)])
def test_equals_lars_around_adamw_with_update_ratio(options):
    options = dict(options)
    trust = dict(trust_coef=options.pop("trust_coef", 1.0), eps=options.pop("trust_eps", 0.0))
    params = [nn.Parameter(p) for p in _tensors(torch.float64)]
    twins = [nn.Parameter(p) for p in _tensors(torch.float64)]
    # The wrapper adapts every group, whatever its weight decay: always_adapt.
    ours = LAMB(params, **options, trust_coef=trust["trust_coef"], trust_eps=trust["eps"], always_adapt=True)
    wrapper = LARS(torch.optim.AdamW(twins, **options), **trust, trust_ratio="update")
    for step in range(4):
        for p, q, g in zip(params, twins, _grads(params, step)):
            p.grad, q.grad = g, g.clone()
        ours.step()
        wrapper.step()
    # To rounding: the wrapper recovers u by subtracting weights, which cancels.
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.trust_ratios()[p], wrapper.trust_ratios()[q], rtol=1e-7, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("options", [dict(weight_decay=0.01), dict(weight_decay=0.05, trust_clip=True),
                                     dict(weight_decay=0.0, always_adapt=True), dict(weight_decay=0.0),
                                     dict(weight_decay=0.01, max_grad_norm=1.0)])
def test_equals_timm_lamb(options, foreach):
    timm_optim = pytest.importorskip("timm.optim")
    params = [nn.Parameter(p) for p in _tensors(torch.float32)]
    twins = [nn.Parameter(p) for p in _tensors(torch.float32)]
    ours = LAMB(params, lr=0.01, **options)
    theirs = timm_optim.Lamb(twins, lr=0.01, **{"max_grad_norm": None, **options}, foreach=foreach)
    for step in range(3):
        for p, q, g in zip(params, twins, _grads(params, step)):
            p.grad, q.grad = g, g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# AdamW's state dict, both ways


def _train(optimizer, params, steps):
    for step in steps:
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        optimizer.step()


def _adamw_groups(params):
    # AdamW's decay (0.1, decoupled) on two tensors, none on the others.
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def _lamb_as_adamw(params):
    """A LAMB that steps as AdamW: its decayed group excluded, the other without decay."""
    return LAMB([{"params": params[:2], "weight_decay": 0.1, "lars_exclude": True},
                 {"params": params[2:], "weight_decay": 0.0}], lr=0.01, eps=1e-6)


@pytest.mark.parametrize("first", ["adamw", "lamb"])
def test_adamw_and_lamb_load_each_others_state_dict_and_train_on_alike(first):
    make_adamw = lambda params: torch.optim.AdamW(_adamw_groups(params), lr=0.01, eps=1e-6)  # noqa: E731
    make_first, make_second = (make_adamw, _lamb_as_adamw) if first == "adamw" else (_lamb_as_adamw, make_adamw)
    params = [nn.Parameter(p) for p in _tensors(torch.float32)]
    uninterrupted = [nn.Parameter(p) for p in _tensors(torch.float32)]
    optimizer = make_first(params)
    _train(optimizer, params, range(3))
    state_dict = copy.deepcopy(optimizer.state_dict())
    assert all(set(state) == {"step", "exp_avg", "exp_avg_sq"} for state in state_dict["state"].values())
    assert all(state["step"].dtype == torch.float32 and state["step"].ndim == 0
               for state in state_dict["state"].values())
    resumed = make_second(params)
    resumed.load_state_dict(state_dict)
    _train(resumed, params, range(3, 6))
    _train(make_first(uninterrupted), uninterrupted, range(6))
    for p, q in zip(params, uninterrupted):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p in params:
        assert resumed.state[p]["step"].item() == 6


def test_an_adapted_lamb_state_dict_is_adamw_state():
    params = [nn.Parameter(p) for p in _tensors(torch.float32)]
    optimizer = LAMB(params, lr=0.01)
    _train(optimizer, params, range(2))
    adamw = torch.optim.AdamW([nn.Parameter(p) for p in _tensors(torch.float32)], lr=0.01)
    adamw.load_state_dict(optimizer.state_dict())
    for (index, state), p in zip(adamw.state_dict()["state"].items(), params):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], optimizer.state[p][key])


def test_lamb_settings_survive_its_own_state_dict():
    params = [nn.Parameter(p) for p in _tensors(torch.float32)]
    optimizer = LAMB(params, lr=0.01, trust_coef=0.5, trust_clip=True, always_adapt=True, max_grad_norm=0.5)
    _train(optimizer, params, range(2))
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    other = LAMB(twins, lr=0.01)
    other.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # torch loads the very tensors otherwise
    assert other.param_groups[0]["trust_coef"] == 0.5 and other.param_groups[0]["trust_clip"]
    _train(optimizer, params, range(2, 4))
    _train(other, twins, range(2, 4))
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# GradScaler, torch.compile, the meta device


def test_found_inf_changes_nothing():
    params = [nn.Parameter(p) for p in _tensors(torch.float32)]
    optimizer = LAMB(params, lr=0.01)
    _train(optimizer, params, range(2))
    before = copy.deepcopy((params, optimizer.state_dict()))
    for p, g in zip(params, _grads(params, 5)):
        p.grad = g
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    optimizer.step()
    for p, q in zip(params, before[0]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for state, old in zip(optimizer.state_dict()["state"].values(), before[1]["state"].values()):
        for key in state:
            torch.testing.assert_close(state[key], old[key], rtol=0, atol=0)


@pytest.mark.parametrize("foreach", [True, False])
def test_found_inf_on_the_device_path_restores_everything(foreach):
    # The path a GPU or compiled step takes: no early return, the step undone by tensor ops.
    params = _tensors(torch.float32)
    grads = [g.clone() for g in _grads(params, 0)]
    grads[0][0, 0] = float("inf")
    exp_avgs = [torch.rand_like(p) for p in params]
    exp_avg_sqs = [torch.rand_like(p) for p in params]
    steps = [torch.tensor(3.0) for _ in params]
    before = copy.deepcopy((params, exp_avgs, exp_avg_sqs, steps))
    lamb(params, grads, exp_avgs, exp_avg_sqs, steps, SETTINGS, lr=0.01, foreach=foreach,
         grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    for after, old in zip((params, exp_avgs, exp_avg_sqs, steps), before):
        for a, b in zip(after, old):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grad_scale_divides_the_gradients():
    scale = 1024.0
    stepped = []
    for grad_scale in (None, torch.tensor(scale)):
        params = [nn.Parameter(p) for p in _tensors(torch.float32)]
        optimizer = LAMB(params, lr=0.01, max_grad_norm=0.5)
        for step in range(2):
            for p, g in zip(params, _grads(params, step, 1.0 if grad_scale is None else scale)):
                p.grad = g
            optimizer.grad_scale, optimizer.found_inf = grad_scale, torch.tensor(0.0)
            optimizer.step()
        stepped.append(params)
    for p, q in zip(*stepped):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_torch_amp_grad_scaler_skips_an_overflowing_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = LAMB(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for overflow in (False, True):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(5, 4)).square().mean()).backward()
        if overflow:
            model.weight.grad[0, 0] = float("inf")
            before = copy.deepcopy((list(model.parameters()), optimizer.state_dict()))
        scaler.step(optimizer)
        scaler.update()
    for p, q in zip(model.parameters(), before[0]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert all(state["step"].item() == 1 for state in optimizer.state_dict()["state"].values())


def test_torch_amp_grad_scaler_steps_like_unscaled_gradients():
    # On the fused path GradScaler hands its scale to the step; elsewhere it unscales first.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    optimizer, plain = LAMB(model.parameters(), lr=0.01), LAMB(twin.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        x = torch.randn(5, 4)
        optimizer.zero_grad()
        plain.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        twin(x).square().mean().backward()
        scaler.step(optimizer)
        scaler.update()
        plain.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_closure_deepcopy_and_pickle():
    import pickle

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = LAMB(model.parameters(), lr=0.01)
    x = torch.randn(5, 4)

    def closure():
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    with torch.no_grad():
        loss_before = model(x).square().mean()
    torch.testing.assert_close(optimizer.step(closure).detach(), loss_before)
    assert set(optimizer.trust_ratios()) == {model.weight, model.bias}
    for copied in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert copied.trust_ratios() == {}
        copied_group, group = copied.param_groups[0], optimizer.param_groups[0]
        assert all(copied_group[name] == group[name] for name in optimizer.defaults)
        torch.testing.assert_close(copied.state_dict()["state"], optimizer.state_dict()["state"])


def test_step_on_the_meta_device_never_syncs():
    params = [nn.Parameter(p) for p in _tensors(torch.float32, "meta")]
    optimizer = LAMB(_groups(params, "groups"), lr=torch.tensor(0.01, device="meta"), max_grad_norm=1.0,
                     trust_clip=True, trust_eps=1e-3)
    for p in params:
        p.grad = torch.empty_like(p)
    optimizer.step()
    optimizer.grad_scale, optimizer.found_inf = torch.ones((), device="meta"), torch.zeros((), device="meta")
    optimizer.step()
    assert all(r.device.type == "meta" for r in optimizer.trust_ratios().values())
    assert all(optimizer.state[p]["step"].device.type == "meta" for p in params)


@pytest.mark.parametrize("implementation", [IMPLEMENTATIONS[0], IMPLEMENTATIONS[2]])
def test_compiled_step_is_one_graph_and_a_changed_tensor_lr_does_not_recompile(implementation):
    from torch._dynamo.utils import counters

    params = [nn.Parameter(p) for p in _tensors(torch.float32)]
    twins = [nn.Parameter(p) for p in _tensors(torch.float32)]
    settings = dict(lr=torch.tensor(0.01), max_grad_norm=1.0, trust_clip=True, **implementation)
    optimizer = LAMB(_groups(params, "groups"), **settings)
    eager = LAMB(_groups(twins, "groups"), **{**settings, "lr": torch.tensor(0.01)})

    @torch.compile(fullgraph=True)  # raises on any graph break
    def compiled_step():
        optimizer.step()

    torch._dynamo.reset()
    counters.clear()
    for step in range(4):
        for p, q, g in zip(params, twins, _grads(params, step)):
            p.grad, q.grad = g, g.clone()
        compiled_step()
        eager.step()
        for group, eager_group in zip(optimizer.param_groups, eager.param_groups):
            group["lr"].mul_(0.5)  # what an LR scheduler does to a tensor lr
            eager_group["lr"].mul_(0.5)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    for p, q in zip(params, twins):
        if p in optimizer.trust_ratios():
            torch.testing.assert_close(optimizer.trust_ratios()[p], eager.trust_ratios()[q])
    # The first call compiles; the second recompiles once the state exists; the later calls, with
    # a new lr each, reuse that graph.
    assert counters["stats"]["unique_graphs"] == 2


# ---------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"),
    (dict(lr=torch.tensor([0.1, 0.2])), "lr"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(-0.1, 0.999)), "betas"),
    (dict(eps=-1e-6), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(trust_coef=-1.0), "trust_coef"),
    (dict(trust_eps=-1.0), "trust_eps"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(fused=True, foreach=True), "fused=True"),
])
def test_bad_settings_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        LAMB([nn.Parameter(torch.ones(2))], **kwargs)


def test_a_group_max_grad_norm_is_refused():
    with pytest.raises(ValueError, match="max_grad_norm"):
        LAMB([{"params": [nn.Parameter(torch.ones(2))], "max_grad_norm": 1.0}])


@pytest.mark.parametrize("group_options", [{}, {"lars_exclude": True}, {"weight_decay": 0.0}])
def test_a_sparse_gradient_is_refused_by_position_and_nothing_changes(group_options):
    dense, sparse = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(4, 2))
    optimizer = LAMB([{"params": [dense]}, {"params": [dense.new_ones(1).requires_grad_(), sparse], **group_options}])
    dense.grad = torch.ones(3, 2)
    sparse.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 2), (4, 2))
    with pytest.raises(RuntimeError, match="parameter 1 of param group 1"):
        optimizer.step()
    assert torch.equal(dense, torch.ones(3, 2)) and len(optimizer.state) == 0


def test_fused_true_refuses_what_no_fused_kernel_steps_by_position():
    # Meta tensors: neither liblars's operator nor Triton steps them, installed or not.
    optimizer = LAMB([nn.Parameter(torch.ones(2))])
    with pytest.raises(RuntimeError, match="parameter 0 of param group 1.*fused=None or foreach=True"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(3, device="meta")),
                                              nn.Parameter(torch.ones(3, device="meta"))], "fused": True})
    assert len(optimizer.param_groups) == 1


def test_functional_fused_true_refuses_a_bucket_before_stepping_any():
    cpu = [torch.ones(2)]
    meta = [torch.ones(2, device="meta")]
    steps = [torch.zeros(()), torch.zeros((), device="meta")]
    with pytest.raises(RuntimeError, match="fused=True.* on meta"):
        lamb(cpu + meta, [torch.ones(2), torch.ones(2, device="meta")], [torch.zeros(2), torch.zeros(2, device="meta")],
             [torch.zeros(2), torch.zeros(2, device="meta")], steps, SETTINGS, lr=0.01, fused=True)
    assert torch.equal(cpu[0], torch.ones(2)) and steps[0].item() == 0


# ---------------------------------------------------------------------------------------
# What a transformers Trainer builds


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.LayerNorm = nn.LayerNorm(8)

    def forward(self, x):
        return self.LayerNorm(torch.tanh(self.dense(x)))


def _trainer_groups(model, weight_decay):
    """As transformers' Trainer.create_optimizer groups them: decay everything but biases and
    LayerNorm weights, with no "lars_exclude"."""
    no_decay = [name for name, _ in model.named_parameters() if name.endswith("bias") or "LayerNorm" in name]
    return [
        {"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0},
    ]


def test_trainer_style_groups_leave_biases_and_layer_norms_to_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block())
    decay, no_decay = _trainer_groups(model, 0.01)
    optimizer_cls, optimizer_kwargs = torchlars.LAMB, {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-6}
    optimizer = optimizer_cls([decay, no_decay], **optimizer_kwargs)  # how Trainer calls it
    twins = [nn.Parameter(p.detach().clone()) for p in no_decay["params"]]
    adamw = torch.optim.AdamW(twins, weight_decay=0.0, **optimizer_kwargs)
    for step in range(3):
        model.zero_grad()
        torch.manual_seed(step)
        model(torch.randn(4, 8)).square().mean().backward()
        for p, twin in zip(no_decay["params"], twins):
            twin.grad = p.grad.clone()
        optimizer.step()
        adamw.step()
    for p, twin in zip(no_decay["params"], twins):
        torch.testing.assert_close(p, twin, rtol=1e-6, atol=1e-7)
    assert set(optimizer.trust_ratios()) == set(decay["params"])


def test_a_transformers_trainer_steps_with_lamb(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs = torch.randint(0, 64, (8, 8))
    dataset = [{"input_ids": ids, "labels": int(ids.sum()) % 2} for ids in inputs]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                          weight_decay=0.01)  # Trainer's decay group takes this, not the kwargs'
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                   optimizer_cls_and_kwargs=(torchlars.LAMB, {"lr": 1e-3, "weight_decay": 0.01}))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torchlars.LAMB)
    lamb_optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    adapted = set(lamb_optimizer.trust_ratios())
    names = {p: name for name, p in model.named_parameters()}
    assert adapted and all(not names[p].endswith("bias") and "LayerNorm" not in names[p] for p in adapted)
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


# ---------------------------------------------------------------------------------------
# The fused operator as the default (liblars's torch.ops.torchlars.lamb_; skipped without it)


@needs_fused
def test_fused_default_and_found_inf_changes_nothing():
    params = [nn.Parameter(p) for p in _tensors(torch.float32)]
    optimizer = LAMB(params, lr=0.01)
    assert optimizer._step_supports_amp_scaling  # fused=None takes the operator on the CPU
    _train(optimizer, params, range(2))
    before = copy.deepcopy((params, optimizer.state_dict()))
    for p, g in zip(params, _grads(params, 5)):
        p.grad = g
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    compiled = torch.compile(optimizer.step, fullgraph=True)  # no early return when compiled: the kernel skips
    compiled()
    for p, q in zip(params, before[0]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for state, old in zip(optimizer.state_dict()["state"].values(), before[1]["state"].values()):
        for key in state:
            torch.testing.assert_close(state[key], old[key], rtol=0, atol=0)
