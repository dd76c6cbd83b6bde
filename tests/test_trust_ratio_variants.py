"""The trust-ratio variants ("paper", "decayed", "update") and the trust-ratio telemetry, against
references written here from the formulas of the recipes (SPEC "Trust-ratio variants")."""

import copy
import warnings

import pytest
import torch

import torchlars
from torchlars import LARS, LARSSGD, exclude_bias_and_norm, named_trust_ratios


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _backward(model, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    model(torch.randn(7, 6)).square().mean().backward()


def _decayed_reference_step(params, buffers, *, lr, momentum, weight_decay, trust_coef, eps, first) -> None:
    """SimCLR/BYOL/optax.lars: r = tc ||w|| / (||g + wd w|| + eps), r = 1 if a norm is 0; then
    momentum SGD on d = r (g + wd w). One parameter at a time, in fp64."""
    for i, p in enumerate(params):
        w, g = p.detach().double(), p.grad.double()
        d = g + weight_decay * w
        wn, dn = w.norm(), d.norm()
        r = trust_coef * wn / (dn + eps) if wn > 0 and dn > 0 else torch.tensor(1.0, dtype=torch.float64)
        d = d * r
        buffers[i] = d.clone() if first else momentum * buffers[i] + d
        with torch.no_grad():
            p.copy_((w - lr * buffers[i]).to(p.dtype))


@pytest.mark.parametrize("make", ["wrapper", "larssgd_foreach", "larssgd_fused"])
@pytest.mark.parametrize("exclude", [False, True])
def test_decayed_ratio_is_the_self_supervised_recipes(make, exclude):
    model, reference = _model(), _model()
    lr, momentum, wd, tc, eps = 0.5, 0.9, 1e-2, 1e-2, 0.0
    groups = exclude_bias_and_norm(model, wd) if exclude else [{"params": list(model.parameters()), "weight_decay": wd}]
    if make == "wrapper":
        optimizer = LARS(torch.optim.SGD(groups, lr=lr, momentum=momentum), trust_coef=tc, eps=eps, trust_ratio="decayed")
    else:
        if make == "larssgd_fused":
            pytest.importorskip("torchlars._C")
        optimizer = LARSSGD(groups, lr=lr, momentum=momentum, trust_coef=tc, eps=eps, trust_ratio="decayed",
                            fused=make == "larssgd_fused", foreach=None if make == "larssgd_fused" else True)
    ref_params = list(reference.parameters())
    adapted = [p.ndim > 1 or not exclude for p in ref_params]
    buffers = [None] * len(ref_params)
    for step in range(3):
        _backward(model, step)
        _backward(reference, step)
        optimizer.step()
        # Adapted parameters by the reference; excluded ones are plain momentum SGD without decay.
        for i, (p, a) in enumerate(zip(ref_params, adapted)):
            if a:
                one = [buffers[i]]
                _decayed_reference_step([p], one, lr=lr, momentum=momentum, weight_decay=wd, trust_coef=tc,
                                        eps=eps, first=step == 0)
                buffers[i] = one[0]
            else:
                g = p.grad.double()
                buffers[i] = g.clone() if step == 0 else momentum * buffers[i] + g
                with torch.no_grad():
                    p.copy_(p.double() - lr * buffers[i])
        for p, q in zip(model.parameters(), ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    telemetry = named_trust_ratios(optimizer, model)
    assert set(telemetry) == {name for (name, p), a in zip(model.named_parameters(), adapted) if a}


def test_decayed_and_paper_differ_only_where_weight_decay_acts():
    ratios = {}
    for variant in ("paper", "decayed"):
        for wd in (0.0, 1e-1):
            model = _model()
            optimizer = LARS(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=wd), trust_ratio=variant)
            _backward(model, 0)
            optimizer.step()
            ratios[variant, wd] = torch.stack(list(optimizer.trust_ratios().values()))
    torch.testing.assert_close(ratios["paper", 0.0], ratios["decayed", 0.0])
    assert not torch.allclose(ratios["paper", 0.1], ratios["decayed", 0.1])


class _LambReference:
    """LAMB (You et al., 2019) as timm's Lamb(max_grad_norm=None, always_adapt=True) computes it:
    Adam moments with bias correction, decoupled weight decay inside the update, then the update
    scaled by ||w|| / ||update|| (1 when either is 0). Written from the paper, in fp64."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        self.params, self.lr, self.betas, self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.m = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        self.v = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        self.t = 0
        self.ratios = []

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        self.ratios = []
        for p, m, v in zip(self.params, self.m, self.v):
            g, w = p.grad.double(), p.detach().double()
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            update = (m / (1 - b1**self.t)) / ((v / (1 - b2**self.t)).sqrt() + self.eps) + self.wd * w
            wn, un = w.norm(), update.norm()
            r = wn / un if wn > 0 and un > 0 else torch.tensor(1.0, dtype=torch.float64)
            self.ratios.append(float(r))
            with torch.no_grad():
                p.copy_(w - self.lr * r * update)


@pytest.mark.parametrize("lr_as_tensor", [False, True])
def test_update_ratio_around_adamw_is_lamb(lr_as_tensor):
    model, reference = _model(), _model()
    lr, betas, eps, wd = 1e-2, (0.9, 0.999), 1e-6, 1e-2
    base = torch.optim.AdamW(model.parameters(), lr=torch.tensor(lr) if lr_as_tensor else lr, betas=betas, eps=eps,
                             weight_decay=wd)
    optimizer = LARS(base, trust_coef=1.0, eps=0.0, trust_ratio="update")
    lamb = _LambReference(list(reference.parameters()), lr, betas, eps, wd)
    for step in range(4):
        _backward(model, step)
        _backward(reference, step)
        optimizer.step()
        lamb.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            torch.stack(list(optimizer.trust_ratios().values())).double(), torch.tensor(lamb.ratios, dtype=torch.float64),
            rtol=1e-4, atol=1e-7,
        )


def test_update_ratio_leaves_excluded_groups_and_state_to_the_base():
    model = _model()
    base = torch.optim.AdamW(exclude_bias_and_norm(model, 1e-2), lr=1e-2)
    optimizer = LARS(base, trust_coef=1.0, eps=0.0, trust_ratio="update")
    twin = copy.deepcopy(model)
    plain = torch.optim.AdamW(exclude_bias_and_norm(twin, 1e-2), lr=1e-2)
    _backward(model, 0)
    _backward(twin, 0)
    optimizer.step()
    plain.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.ndim <= 1:
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        else:
            assert not torch.equal(p, q), name
    assert set(named_trust_ratios(optimizer, model)) == {"0.weight", "2.weight"}
    # The state dict is the base's own: a plain AdamW loads it, and continues.
    state = optimizer.state_dict()
    assert state["lars"]["trust_ratio"] == "update"
    plain.load_state_dict(state)


def test_update_ratio_with_clip_is_capped_at_one():
    model = _model()
    optimizer = LARS(torch.optim.AdamW(model.parameters(), lr=1e-3), trust_coef=1.0, eps=0.0, clip=True,
                     trust_ratio="update")
    _backward(model, 0)
    optimizer.step()
    ratios = torch.stack(list(optimizer.trust_ratios().values()))
    assert (ratios <= 1).all()


def test_trust_ratios_are_the_ratios_the_paper_step_used():
    model = _model()
    optimizer = LARS(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-2), trust_coef=1e-2)
    assert optimizer.trust_ratios() == {}
    _backward(model, 0)
    before = {p: (p.detach().clone(), p.grad.clone()) for p in model.parameters()}
    optimizer.step()
    ratios = optimizer.trust_ratios()
    for p, (w, g) in before.items():
        expected = 1e-2 * w.norm() / (g.norm() + 1e-2 * w.norm() + 1e-8)
        assert ratios[p].dtype == torch.float32 and ratios[p].ndim == 0
        torch.testing.assert_close(ratios[p], expected)
        # The foreach path writes the scaled gradient: (g + wd w) * r, the ratio kept.
        torch.testing.assert_close(p.grad, (g + 1e-2 * w) * ratios[p])


def test_trust_ratios_skip_parameters_without_gradient():
    model = _model()
    optimizer = LARSSGD(model.parameters(), lr=0.1, foreach=True)
    model(torch.randn(2, 6)).sum().backward()
    model[2].bias.grad = None
    optimizer.step()
    assert set(named_trust_ratios(optimizer, model)) == {"0.weight", "0.bias", "2.weight"}


def test_trust_ratios_on_meta_parameters_need_no_sync():
    params = [torch.nn.Parameter(torch.empty(4, 3, device="meta")) for _ in range(3)]
    for p in params:
        p.grad = torch.empty_like(p)
    for optimizer in (
        LARS(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True), trust_ratio="decayed"),
        # (torch's own Adam reads its step count with .item() off CUDA; a momentum SGD base does not.)
        LARS(torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True),
             trust_coef=1.0, eps=0.0, trust_ratio="update"),
    ):
        optimizer.step()
        assert all(r.device.type == "meta" for r in optimizer.trust_ratios().values())


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda p: LARS(torch.optim.SGD(p, lr=0.1), trust_ratio="lamb"), "trust_ratio"),
        (lambda p: LARSSGD(p, lr=0.1, trust_ratio="update"), "trust_ratio"),
    ],
)
def test_meaningless_combinations_are_refused_by_name(build, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        build(model.parameters())


def test_adaptive_base_warns_once_naming_update_and_can_be_silenced():
    model = _model()
    with pytest.warns(UserWarning, match="trust_ratio='update'"):
        LARS(torch.optim.Adam(model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LARS(torch.optim.SGD(model.parameters(), lr=0.1))  # momentum SGD: no warning
        LARS(torch.optim.Adam(model.parameters()), trust_coef=1.0, trust_ratio="update")
        warnings.filterwarnings("ignore", message="LARS: a .* base divides")
        LARS(torch.optim.Adam(model.parameters()))


def test_trust_ratio_survives_a_state_dict_round_trip():
    model = _model()
    optimizer = LARS(torch.optim.SGD(model.parameters(), lr=0.1), trust_ratio="decayed")
    _backward(model, 0)
    optimizer.step()
    other = LARS(torch.optim.SGD(model.parameters(), lr=0.1))
    other.load_state_dict(optimizer.state_dict())
    assert other.trust_ratio == "decayed"
    assert copy.deepcopy(optimizer).trust_ratio == "decayed"


def test_update_ratio_compiles_without_graph_break():
    model = _model()
    optimizer = LARS(torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), foreach=False), trust_coef=1.0,
                     eps=0.0, trust_ratio="update")
    _backward(model, 0)
    optimizer.step()  # the state exists before compiling, as torch's compiled-optimizer recipe does
    expected = copy.deepcopy((model, optimizer))

    @torch.compile(fullgraph=True)
    def step():
        optimizer.step()

    _backward(model, 1)
    _backward(expected[0], 1)
    step()
    expected[1].step()
    for p, q in zip(model.parameters(), expected[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert len(optimizer.trust_ratios()) == 4


def test_torchlars_exports_named_trust_ratios():
    assert torchlars.named_trust_ratios is named_trust_ratios


class _AcceleratedOptimizer(torch.optim.Optimizer):
    """A stand-in for accelerate's AcceleratedOptimizer, what a transformers Trainer hands its
    callbacks: an Optimizer that keeps the real one in ``.optimizer`` and has no trust_ratios()."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, closure=None):
        return self.optimizer.step(closure)


@pytest.mark.parametrize("depth", [1, 2])
def test_named_trust_ratios_follows_wrappers_to_the_optimizer(depth):
    model = _model()
    optimizer = LARSSGD(exclude_bias_and_norm(model, 1e-2), lr=0.1, momentum=0.9)
    wrapped = optimizer
    for _ in range(depth):
        wrapped = _AcceleratedOptimizer(wrapped)
    _backward(model, 0)
    wrapped.step()
    ratios = named_trust_ratios(wrapped, model)
    assert set(ratios) == {"0.weight", "2.weight"}
    direct = optimizer.trust_ratios()
    assert all(torch.equal(ratios[name], direct[param]) for name, param in model.named_parameters() if name in ratios)


def test_named_trust_ratios_of_a_wrapper_around_no_torchlars_optimizer_names_it():
    model = _model()
    wrapped = _AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"_AcceleratedOptimizer has no trust_ratios\(\) and wraps no optimizer"):
        named_trust_ratios(wrapped, model)
