"""torchlars against timm's peers, timm.optim.Lars and timm.optim.Lamb, step for step.

Equality is asserted only for the settings where both compute the same maths; the others are
listed below with what differs. Skipped where timm is not installed (CI's torch 2.13 venv).

timm Lars (per parameter, with its group's lr, wd = weight_decay):
    r = trust_coeff ||w|| / (||g|| + wd ||w|| + eps), 1 unless both norms are > 0,
    r = min(r / lr, 1) if trust_clip, d = (g + wd w) r, then torch.optim.SGD's momentum,
    dampening and nesterov on d, and w -= lr d.
That is torchlars's trust_ratio="paper" around torch.optim.SGD (trust_coeff = trust_coef,
trust_clip = clip, same eps, same zero-norm rule, decay inside the scaled gradient, base steps
without decay), and LARSSGD's "paper" step. Where they differ:
- timm adapts a group only if its weight_decay != 0 or always_adapt=True; a group with
  weight_decay=0 and always_adapt=False is plain SGD. torchlars adapts every group except
  those with "lars_exclude": True, so timm's always_adapt=False with wd=0 groups for biases
  and norms is torchlars's exclude_bias_and_norm (asserted below), while timm with wd=0 and
  always_adapt=False everywhere is not LARS at all (torchlars has no switch for that).
- timm has no trust_ratio="decayed" (||g + wd w|| in the denominator) and no maximize.
- timm leaves p.grad as it was; LARS's foreach backend writes the scaled gradient into p.grad
  (LARSSGD leaves it). The parameters and momentum buffers are the same.

timm Lamb (max_grad_norm=None, decoupled_decay=False): Adam moments m, v with bias correction,
u = m_hat / (sqrt(v_hat) + eps) + wd w, r = ||w|| / ||u|| (1 unless both norms are > 0),
w -= lr r u. torch.optim.AdamW's step is -lr u with the same eps placement, so
LARS(AdamW(..., eps=eps, weight_decay=wd), trust_coef=1.0, eps=0.0, trust_ratio="update")
is the same maths. Where they differ:
- timm adapts only if weight_decay != 0 or always_adapt=True (with wd=0 and always_adapt=False
  it is plain Adam); torchlars always adapts.
- max_grad_norm (timm's default 1.0) divides every gradient by max(global norm / max_grad_norm, 1)
  before the moments; torchlars has no global clipping (torch.nn.utils.clip_grad_norm_ before
  the step is close but multiplies by min(max_norm / (norm + 1e-6), 1)).
- trust_clip caps timm's r at 1; torchlars's clip caps r / lr at 1 for every variant (the SPEC's
  LARC rule), so the two agree only at lr = 1.
- decoupled_decay=True shrinks w by lr wd outside the trust-scaled update; around AdamW the
  decay is part of the base's step, which torchlars scales as a whole.
- bias_correction=False, grad_averaging=False and caution have no torch.optim.AdamW equivalent.
"""

import copy

import pytest
import torch

from torchlars import LARS, LARSSGD, exclude_bias_and_norm

timm_optim = pytest.importorskip("timm.optim")


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    with torch.no_grad():
        model[2].bias.zero_()  # a zero norm: ratio 1 on both sides
    return model


def _backward(model, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    x = torch.randn(7, 6).to(next(model.parameters()).dtype)
    model(x).square().mean().backward()


def _assert_same_steps(ours, model, theirs, reference, steps=4):
    for step in range(steps):
        _backward(model, step)
        _backward(reference, step)
        ours.step()
        theirs.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
            if "momentum_buffer" in theirs.state[q]:
                torch.testing.assert_close(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"],
                                           rtol=1e-5, atol=1e-7)


# (torchlars SGD settings, timm Lars settings) that compute the same thing.
_LARS_SETTINGS = {
    "decay": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "no_decay_always_adapt": dict(lr=0.1, momentum=0.9, weight_decay=0.0, always_adapt=True),
    "no_momentum": dict(lr=0.2, momentum=0.0, weight_decay=5e-4),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "trust_coef_eps": dict(lr=0.05, momentum=0.8, weight_decay=1e-3, trust_coeff=0.02, eps=1e-3),
}


def _build(make, params, settings):
    settings = dict(settings)
    settings.pop("always_adapt", None)
    trust_coef, eps, clip = settings.pop("trust_coeff", 1e-3), settings.pop("eps", 1e-8), settings.pop("trust_clip", False)
    if make == "wrapper":
        return LARS(torch.optim.SGD(params, **settings), trust_coef=trust_coef, eps=eps, clip=clip)
    return LARSSGD(params, **settings, trust_coef=trust_coef, eps=eps, clip=clip, foreach=True)


@pytest.mark.parametrize("timm_foreach", [False, True])
@pytest.mark.parametrize("make", ["wrapper", "larssgd_foreach"])
@pytest.mark.parametrize("setting", list(_LARS_SETTINGS))
def test_paper_ratio_steps_like_timm_lars(setting, make, timm_foreach):
    settings = _LARS_SETTINGS[setting]
    model, reference = _model(), _model()
    ours = _build(make, model.parameters(), settings)
    theirs = timm_optim.Lars(reference.parameters(), **settings, foreach=timm_foreach)
    _assert_same_steps(ours, model, theirs, reference)


@pytest.mark.parametrize("timm_foreach", [False, True])
@pytest.mark.parametrize("make", ["wrapper", "larssgd_foreach"])
def test_clip_is_timm_trust_clip(make, timm_foreach):
    # trust_coef 0.02 at lr 0.1: some layers' ratios are clipped to 1, others are not.
    settings = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02, trust_clip=True)
    model, reference = _model(), _model()
    ours = _build(make, model.parameters(), settings)
    theirs = timm_optim.Lars(reference.parameters(), **settings, foreach=timm_foreach)
    _assert_same_steps(ours, model, theirs, reference)
    ratios = torch.stack(list(ours.trust_ratios().values()))
    assert (ratios == 1).any() and (ratios < 1).any(), ratios


@pytest.mark.parametrize("make", ["wrapper", "larssgd_foreach"])
def test_excluded_groups_are_timm_groups_without_decay_and_adaptation(make):
    wd = 1e-2
    model, reference = _model(), _model()
    ours = _build(make, exclude_bias_and_norm(model, wd), dict(lr=0.1, momentum=0.9))
    # timm leaves a group with weight_decay=0 to plain SGD unless always_adapt=True.
    weights = [p for p in reference.parameters() if p.ndim > 1]
    others = [p for p in reference.parameters() if p.ndim <= 1]
    theirs = timm_optim.Lars([{"params": weights, "weight_decay": wd}, {"params": others, "weight_decay": 0.0}],
                             lr=0.1, momentum=0.9, always_adapt=False)
    _assert_same_steps(ours, model, theirs, reference)


def test_timm_without_decay_or_always_adapt_is_not_lars():
    # The documented difference: timm Lars with weight_decay=0 and always_adapt=False is plain
    # SGD, which LARS on the same groups is not.
    model, reference = _model(), _model()
    ours = LARS(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    theirs = timm_optim.Lars(reference.parameters(), lr=0.1, momentum=0.9)
    plain = copy.deepcopy(reference)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        for m in (model, reference, plain):
            _backward(m, step)
        ours.step()
        theirs.step()
        sgd.step()
    for p, q, s in zip(model.parameters(), reference.parameters(), plain.parameters()):
        torch.testing.assert_close(q, s)
    assert any(not torch.allclose(p, q) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("timm_foreach", [False, True])
@pytest.mark.parametrize(
    "weight_decay, always_adapt",
    [(0.0, True), (0.05, True), (0.05, False)],  # with wd != 0 timm adapts whatever always_adapt says
)
def test_update_ratio_around_adamw_steps_like_timm_lamb(weight_decay, always_adapt, timm_foreach):
    lr, betas, eps = 1e-2, (0.9, 0.99), 1e-6
    model, reference = _model(), _model()
    ours = LARS(torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
                trust_coef=1.0, eps=0.0, trust_ratio="update")
    theirs = timm_optim.Lamb(reference.parameters(), lr=lr, bias_correction=True, betas=betas, eps=eps,
                             weight_decay=weight_decay, max_grad_norm=None, always_adapt=always_adapt,
                             foreach=timm_foreach)
    for step in range(4):
        _backward(model, step)
        _backward(reference, step)
        ours.step()
        theirs.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"],
                                       rtol=1e-5, atol=1e-7)


def test_update_ratio_clip_is_timm_lamb_trust_clip_only_at_lr_one():
    # torchlars caps r / lr at 1, timm's trust_clip caps r at 1: the same maths where lr = 1.
    # In fp64: steps as large as the weights cancel digits, which the two round differently in fp32.
    model, reference = _model().double(), _model().double()
    with torch.no_grad():  # large enough weights that the first layer's ratio ||w|| / ||u|| is above 1, clipped
        model[0].weight.mul_(10)
        reference[0].weight.mul_(10)
    ours = LARS(torch.optim.AdamW(model.parameters(), lr=1.0, eps=1e-6, weight_decay=0.05), trust_coef=1.0, eps=0.0,
                clip=True, trust_ratio="update")
    theirs = timm_optim.Lamb(reference.parameters(), lr=1.0, eps=1e-6, weight_decay=0.05, max_grad_norm=None,
                             trust_clip=True)
    ratios = []
    for step in range(3):
        _backward(model, step)
        _backward(reference, step)
        ours.step()
        theirs.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        ratios.append(ours.trust_ratios()[model[0].weight])
    assert all(r == 1 for r in ratios) and torch.stack(list(ours.trust_ratios().values())).min() < 1, ratios
