"""liblars's LAMB from Python: torchlars.cpp.LAMB (lars::LAMB) and torchlars.ops.lamb_ (the fused
operator) against a pure-torch per-parameter reference; opcheck; GradScaler's found_inf."""

import pytest
import torch

from torchlars._functional import LAMBSettings
from torchlars_extension import assert_same_bits_on_every_cpu_capability, import_extension


def step_lamb(implementation, params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, grad_scale=None,
              found_inf=None, **options):
    """``implementation.lamb_`` called with LAMB's options as keywords, made into its LAMBSettings."""
    return implementation.lamb_(params, grads, exp_avgs, exp_avg_sqs, state_steps, LAMBSettings(**options), lr=lr,
                                grad_scale=grad_scale, found_inf=found_inf)


cpp = import_extension("torchlars.cpp")
ops = import_extension("torchlars.ops")

# Several chunks of the kernel (2**14 elements), sizes that are no whole number of its lanes.
SHAPES = [(130, 129), (37,), (5, 3)]
OPTIONS = {
    "default": {},
    "trust_clip": dict(trust_clip=True),
    "no_bias_correction": dict(bias_correction=False),
    "maximize": dict(maximize=True),
    "trust_coef_and_eps": dict(trust_coef=0.5, trust_eps=1e-3, betas=(0.8, 0.99)),
    "no_decay": dict(weight_decay=0.0),
    "no_decay_always_adapt": dict(weight_decay=0.0, always_adapt=True),
    "max_grad_norm": dict(max_grad_norm=0.5),
}


def lamb_options(**overrides):
    options = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.02, trust_coef=1.0, trust_eps=0.0,
                   trust_clip=False, always_adapt=False, bias_correction=True, max_grad_norm=None, maximize=False)
    options.update(overrides)
    return options


def reference_lamb_step(params, grads, state, o):
    """One LAMB step (You et al., 2019, as timm's Lamb), per parameter, in fp64, in place."""
    divisor = 1.0
    if o["max_grad_norm"] is not None:
        global_norm = torch.stack([g.double().norm() for g in grads]).norm()
        divisor = torch.clamp(global_norm / o["max_grad_norm"], min=1.0)
    beta1, beta2 = o["betas"]
    adapt = o["weight_decay"] != 0 or o["always_adapt"]
    for w, g in zip(params, grads):
        s = state.setdefault(id(w), dict(step=0, m=torch.zeros_like(w, dtype=torch.float64),
                                         v=torch.zeros_like(w, dtype=torch.float64)))
        g = g.double() / divisor
        g = -g if o["maximize"] else g
        s["step"] += 1
        s["m"] = beta1 * s["m"] + (1 - beta1) * g
        s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
        bc1 = 1 - beta1 ** s["step"] if o["bias_correction"] else 1.0
        bc2 = 1 - beta2 ** s["step"] if o["bias_correction"] else 1.0
        w64 = w.double()
        u = (s["m"] / bc1) / ((s["v"] / bc2).sqrt() + o["eps"]) + o["weight_decay"] * w64
        w_norm, u_norm = w64.norm(), u.norm()
        r = o["trust_coef"] * w_norm / (u_norm + o["trust_eps"]) if w_norm > 0 and u_norm > 0 else 1.0
        r = min(float(r), 1.0) if o["trust_clip"] else float(r)
        with torch.no_grad():
            w.copy_(w64 - o["lr"] * (r if adapt else 1.0) * u)


def draw(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [(torch.randn(shape, generator=generator) * 3).to(dtype) for shape in SHAPES]  # ratios well away from 1
    grads = [[(torch.randn(shape, generator=generator) * 0.1).to(dtype) for shape in SHAPES] for _ in range(5)]
    return params, grads


def assert_close_to_scale(actual, expected, tolerance):
    for a, e in zip(actual, expected):
        error = (a.double() - e.double()).abs().max() / e.double().abs().max()
        assert error <= tolerance, f"relative error {float(error):.3g} > {tolerance}"


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-13), (torch.float32, 2e-6)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_cpp_lamb_matches_the_reference(name, dtype, tolerance):
    options = lamb_options(**OPTIONS[name])
    init, grads = draw(dtype)
    params = [p.clone() for p in init]
    reference = [p.double().clone() for p in init]
    optimizer = cpp.LAMB(params, **options)
    state = {}
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()  # a fused fp32/fp64 step leaves its update u there
        optimizer.step()
        reference_lamb_step(reference, step_grads, state, options)
    assert_close_to_scale(params, reference, tolerance)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-13), (torch.float32, 2e-6)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", sorted(set(OPTIONS) - {"max_grad_norm"}))
def test_operator_matches_the_reference(name, dtype, tolerance):
    options = lamb_options(**OPTIONS[name])
    init, grads = draw(dtype)
    params = [p.clone() for p in init]
    reference = [p.double().clone() for p in init]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    beta1, beta2 = options["betas"]
    state = {}
    for step_grads in grads:
        for step in steps:
            step += 1
        ratios = step_lamb(
            ops, params, [g.clone() for g in step_grads], exp_avgs, exp_avg_sqs, steps, lr=options["lr"], beta1=beta1, beta2=beta2,
            eps=options["eps"], weight_decay=options["weight_decay"], trust_coef=options["trust_coef"],
            trust_eps=options["trust_eps"], trust_clip=options["trust_clip"],
            adapt=options["weight_decay"] != 0 or options["always_adapt"],
            bias_correction=options["bias_correction"], maximize=options["maximize"],
        )
        reference_lamb_step(reference, step_grads, state, options)
    assert ratios.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ratios.shape == (len(params),)
    assert_close_to_scale(params, reference, tolerance)


def _one_step(params, grads, dtype, adapt=True):
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    ratios = step_lamb(
        ops, params, grads, exp_avgs, exp_avg_sqs, [torch.tensor(1.0) for _ in params], lr=0.01, beta1=0.9,
        beta2=0.999, eps=1e-6, weight_decay=0.02, trust_coef=1.0, trust_eps=0.0, trust_clip=False, adapt=adapt,
        bias_correction=True, maximize=False)
    return exp_avgs, exp_avg_sqs, ratios


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_an_adapted_step_leaves_its_update_in_the_gradients(dtype):
    # The documented scratch (lars/fused.h, as apex's FusedLAMB): u = m_hat / (sqrt(v_hat) + eps) + wd * w,
    # of the weights before the step, in the gradients' place.
    init, grads = draw(dtype)
    params = [p.clone() for p in init]
    given = [g.clone() for g in grads[0]]
    exp_avgs, exp_avg_sqs, _ = _one_step(params, given, dtype)
    for g, w, m, v in zip(given, init, exp_avgs, exp_avg_sqs):
        u = (m / 0.1) / ((v / 0.001).sqrt() + 1e-6) + 0.02 * w
        torch.testing.assert_close(g, u, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("dtype, adapt", [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False)],
                         ids=["bf16", "fp16", "fp32_not_adapted"])
def test_half_types_and_unadapted_steps_leave_the_gradients(dtype, adapt):
    init, grads = draw(dtype)
    given = [g.clone() for g in grads[0]]
    _one_step([p.clone() for p in init], given, dtype, adapt=adapt)
    for g, h in zip(given, grads[0]):
        torch.testing.assert_close(g, h, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_params_sharing_one_gradient_step_as_with_their_own(dtype):
    # Were u written over a gradient two params read, the second would step on the first's u.
    generator = torch.Generator().manual_seed(3)
    init = [(torch.randn(40, 30, generator=generator) * scale).to(dtype) for scale in (1.0, 3.0, 0.5)]
    shared = (torch.randn(40, 30, generator=generator) * 0.1).to(dtype)
    aliased = [p.clone() for p in init]
    own = [p.clone() for p in init]
    # Params 0 and 2 are given one tensor; param 1 a view into the same storage that overlaps it.
    flat = torch.cat([shared.flatten(), shared.flatten()[:600]])
    grads = [flat[:1200].view(40, 30), flat[600:].view(40, 30), flat[:1200].view(40, 30)]
    expected_grads = [g.clone() for g in grads]
    _, _, ratios = _one_step(aliased, grads, dtype)
    _, _, own_ratios = _one_step(own, expected_grads, dtype)
    torch.testing.assert_close(ratios, own_ratios, rtol=0, atol=0)
    for a, b in zip(aliased, own):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_in_one_flat_buffer_step_as_separate_ones():
    # Views that do not overlap (one flat buffer, as DDP's buckets): each keeps its own u.
    init, grads = draw(torch.float32)
    flat = torch.cat([g.flatten() for g in grads[0]])
    views, offset = [], 0
    for g in grads[0]:
        views.append(flat[offset:offset + g.numel()].view(g.shape))
        offset += g.numel()
    separate = [g.clone() for g in grads[0]]
    in_flat = [p.clone() for p in init]
    apart = [p.clone() for p in init]
    _one_step(in_flat, views, torch.float32)
    _one_step(apart, separate, torch.float32)
    for a, b in zip(in_flat + views, apart + separate):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpp_lamb_and_the_operator_agree_in_bf16():
    # Both go through the fused operator: the same bits.
    init, grads = draw(torch.bfloat16)
    through_class = [p.clone() for p in init]
    through_op = [p.clone() for p in init]
    optimizer = cpp.LAMB(through_class, lr=0.01, weight_decay=0.02)
    exp_avgs = [torch.zeros_like(p) for p in init]
    exp_avg_sqs = [torch.zeros_like(p) for p in init]
    steps = [torch.tensor(0.0) for _ in init]
    for step_grads in grads[:2]:
        for p, g in zip(through_class, step_grads):
            p.grad = g.clone()
        optimizer.step()
        for step in steps:
            step += 1
        step_lamb(ops, through_op, step_grads, exp_avgs, exp_avg_sqs, steps, lr=0.01, beta1=0.9, beta2=0.999,
                  eps=1e-6, weight_decay=0.02, trust_coef=1.0, trust_eps=0.0, trust_clip=False, adapt=True,
                  bias_correction=True, maximize=False)
    for a, b in zip(through_class, through_op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grad_scale_unscales_and_found_inf_skips():
    init, grads = draw(torch.float32)

    def run(scale, found_inf):
        params = [p.clone() for p in init]
        exp_avgs = [torch.full_like(p, 0.01) for p in params]
        exp_avg_sqs = [torch.full_like(p, 0.02) for p in params]
        ratios = step_lamb(
            ops, params, [g * scale for g in grads[0]], exp_avgs, exp_avg_sqs, [torch.tensor(2.0) for _ in params],
            lr=torch.tensor(0.01), beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.02, trust_coef=1.0,
            trust_eps=0.0, trust_clip=False, adapt=True, bias_correction=True, maximize=False,
            grad_scale=torch.tensor(float(scale)), found_inf=torch.tensor(float(found_inf)))
        return params + exp_avgs + exp_avg_sqs, ratios

    unscaled, _ = run(1.0, False)
    scaled, _ = run(1024.0, False)
    assert_close_to_scale(scaled, unscaled, 1e-6)
    skipped, ratios = run(1024.0, True)
    assert torch.isnan(ratios).all()
    for after, p in zip(skipped[: len(init)], init):
        torch.testing.assert_close(after, p, rtol=0, atol=0)
    for after in skipped[len(init):]:
        assert torch.all((after == 0.01) | (after == 0.02))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("amp", [False, True], ids=["no_scaler", "grad_scaler"])
def test_opcheck_lamb(dtype, amp):
    init, grads = draw(dtype)
    scaler = dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0)) if amp else {}
    torch.library.opcheck(
        torch.ops.torchlars.lamb_.default,
        (init, grads[0], [torch.zeros_like(p) for p in init], [torch.zeros_like(p) for p in init],
         [torch.tensor(1.0) for _ in init]),
        dict(lr=torch.tensor(0.01), beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.02, trust_coef=1.0,
             trust_eps=0.0, trust_clip=True, adapt=True, bias_correction=True, maximize=False, **scaler),
    )


def test_operator_compiles_to_one_graph():
    init, grads = draw(torch.float32)
    eager = [p.clone() for p in init]
    compiled = [p.clone() for p in init]

    def step(params, exp_avgs, exp_avg_sqs, steps, lr):
        return step_lamb(ops, params, [g.clone() for g in grads[0]], exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=0.9, beta2=0.999,
                         eps=1e-6, weight_decay=0.02, trust_coef=1.0, trust_eps=0.0, trust_clip=False, adapt=True,
                         bias_correction=True, maximize=False)

    def state():
        return [torch.zeros_like(p) for p in init], [torch.zeros_like(p) for p in init], [torch.tensor(1.0) for _ in init]

    eager_ratios = step(eager, *state(), torch.tensor(0.01))
    compiled_ratios = torch.compile(step, fullgraph=True, backend="eager")(compiled, *state(), torch.tensor(0.01))
    torch.testing.assert_close(compiled_ratios, eager_ratios, rtol=0, atol=0)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpp_lamb_records_ratios_of_adapted_groups_only():
    init, grads = draw(torch.float32)
    params = [p.clone() for p in init]
    optimizer = cpp.LAMB([{"params": params[:1]}, {"params": params[1:], "lars_exclude": True}], lr=0.01)
    for p, g in zip(params, grads[0]):
        p.grad = g
    optimizer.step()
    ratios = optimizer.trust_ratios()
    assert list(ratios) == params[:1]
    assert ratios[params[0]].dtype == torch.float32 and ratios[params[0]].dim() == 0
    assert optimizer.param_groups[1]["lars_exclude"] is True
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(lr=-1.0), ValueError, "lr must be non-negative"),
        (dict(betas=(1.0, 0.9)), ValueError, r"betas must be in \[0, 1\)"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be positive"),
        (dict(trust_clip=1), TypeError, "`trust_clip`"),
        (dict(betas=0.9), TypeError, "`betas`"),
    ],
)
def test_cpp_lamb_refuses_bad_options_by_name(options, error, message):
    with pytest.raises(error, match=message):
        cpp.LAMB([torch.zeros(2)], **options)


def _lamb_steps_on(inputs):
    """Three operator steps in fp32, bf16 and fp64 from (params, grads): every result."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        params, grads = ([t.to(dtype, copy=True) for t in tensors] for tensors in inputs)
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        for step in range(1, 4):
            ratios = step_lamb(
                ops, params, [g.clone() for g in grads], exp_avgs, exp_avg_sqs, [torch.tensor(float(step)) for _ in params], lr=0.01,
                beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.02, trust_coef=1.0, trust_eps=0.0, trust_clip=False,
                adapt=True, bias_correction=True, maximize=False, grad_scale=torch.tensor(3.0))
        out += params + exp_avgs + exp_avg_sqs + [ratios]
    return out


def test_every_cpu_capability_gives_the_same_bits(tmp_path):
    # As the LARS kernel (tests/test_ops.py): the default, AVX2 and AVX-512 builds of the loops
    # sum in the same lanes without fused multiply-adds, so they give the same numbers.
    generator = torch.Generator().manual_seed(0)  # made here: torch.randn depends on the capability
    params = [torch.randn(shape, generator=generator) * 3 for shape in SHAPES]
    inputs = [params, [torch.randn(p.shape, generator=generator) * 0.1 for p in params]]
    assert_same_bits_on_every_cpu_capability(_lamb_steps_on, inputs, tmp_path)


def test_a_step_does_not_depend_on_the_thread_count():
    # The norms' partial sums are added in an order fixed by the sizes; each chunk's u is kept
    # in its own place of the gradient whichever thread makes it.
    inputs = [[torch.randn(shape) * 3 for shape in SHAPES + [(5 * 2**14 + 3,)]]]
    inputs.append([torch.randn(p.shape) * 0.1 for p in inputs[0]])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _lamb_steps_on(inputs)
        torch.set_num_threads(2)
        two = _lamb_steps_on(inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
