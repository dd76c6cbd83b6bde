"""liblars's custom operators, torch.ops.torchlars.lars_scale_gradients_ and lars_sgd_.

``lars_scale_gradients_`` must give the foreach path's numbers bit for bit (same ATen ops in
the same order) and pass opcheck; on a GPU the steps stay on the current stream without
synchronising.
"""


import pytest
import torch

import torchlars
from torchlars import LARS
from torchlars._dispatch import lars_scale_gradients_
from torchlars._functional import LARSSettings
from torchlars_extension import assert_same_bits_on_every_cpu_capability, import_extension

ops = import_extension("torchlars.ops")

SETTINGS = dict(weight_decay=1e-3, eps=1e-8, trust_coef=0.02)


def foreach_scale_gradients_(params, grads, *, lr, clip, weight_decay, eps, trust_coef):
    settings = LARSSettings(eps=eps, trust_coef=trust_coef, clip=clip)
    return lars_scale_gradients_(params, grads, settings, weight_decay=weight_decay, lr=lr)


def tensors(dtypes, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 4), (7,), (3, 2, 2), (1,)]
    params = [torch.randn(shape, generator=generator).to(device, dtype) for shape, dtype in zip(shapes, dtypes)]
    grads = [torch.randn(shape, generator=generator).to(device, dtype) for shape, dtype in zip(shapes, dtypes)]
    params[-1].zero_()  # a zero-norm parameter: ratio 1
    return params, grads


DTYPES = {
    "fp32": [torch.float32] * 4,
    "bf16": [torch.bfloat16] * 4,
    "mixed": [torch.float32, torch.bfloat16, torch.float64, torch.float16],
}


@pytest.mark.parametrize("lr", [0.1, torch.tensor(0.1)], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("dtypes", sorted(DTYPES))
def test_operator_gives_the_python_numbers(dtypes, clip, lr):
    params, grads = tensors(DTYPES[dtypes])
    python_grads = [grad.clone() for grad in grads]
    foreach_scale_gradients_(params, python_grads, lr=lr, clip=clip, **SETTINGS)
    ops.lars_scale_gradients_(params, grads, lr=lr, clip=clip, **SETTINGS)
    for grad, python_grad in zip(grads, python_grads):
        torch.testing.assert_close(grad, python_grad, rtol=0, atol=0)


@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("dtypes", sorted(DTYPES))
def test_opcheck(dtypes, clip):
    params, grads = tensors(DTYPES[dtypes])
    torch.library.opcheck(
        torch.ops.torchlars.lars_scale_gradients_.default,
        (params, grads),
        dict(lr=torch.tensor(0.5), clip=clip, **SETTINGS),
    )


def test_operator_refuses_mismatched_lists():
    params, grads = tensors(DTYPES["fp32"])
    with pytest.raises(RuntimeError, match="got 4 params but 3 grads"):
        ops.lars_scale_gradients_(params, grads[:3], lr=0.1, clip=False, **SETTINGS)
    with pytest.raises(RuntimeError, match=r"grads\[1\] .* does not match params\[1\]"):
        ops.lars_scale_gradients_(params, [grads[0], grads[2], grads[1], grads[3]], lr=0.1, clip=False, **SETTINGS)


def make_model(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model.to(device, dtype)


def set_grads(model, step):
    generator = torch.Generator().manual_seed(step)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)


def lars_over(model, base_cls, lr=0.01, clip=True, **options):
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    base = base_cls([{"params": weights, "weight_decay": 1e-3}, {"params": biases, "lars_exclude": True}], lr=lr, **options)
    return LARS(base, trust_coef=0.02, clip=clip)


# --- GPU: streams, no synchronisation, CUDA graphs ---------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("face", ["foreach", "torchlars_cpp", "lars_sgd"])
def test_gpu_step_runs_on_the_current_stream_without_sync(face):
    # The step runs on a side stream that is held back (torch.cuda._sleep) before it writes the
    # step's gradients. A kernel of the step put on any other stream would run at once, on the
    # last step's gradients, and give other numbers than the reference run on one stream; a
    # host sync would fail under sync debug mode "error".
    cpp = import_extension("torchlars.cpp") if face == "torchlars_cpp" else None

    def build():
        model = make_model(device="cuda")
        if face == "torchlars_cpp":
            return model, cpp.LARS(model.parameters(), "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, clip=True)
        if face == "lars_sgd":
            return model, torchlars.LARSSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, clip=True)
        return model, lars_over(model, torch.optim.SGD, lr=0.1, momentum=0.9)

    def gradients(model, step):
        generator = torch.Generator().manual_seed(step)
        return [torch.randn(p.shape, generator=generator).to(p.device) for p in model.parameters()]

    reference_model, reference = build()
    model, optimizer = build()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    for step in range(3):
        for param, grad in zip(reference_model.parameters(), gradients(reference_model, step)):
            param.grad = grad
        reference.step()
        grads = gradients(model, step)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(100_000_000)  # tens of milliseconds on any GPU
            for param, grad in zip(model.parameters(), grads):
                param.grad.copy_(grad)
            torch.cuda.set_sync_debug_mode("error")
            try:
                optimizer.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(param, expected, rtol=0, atol=0)


@cuda
def test_gpu_cuda_graph_replay_matches_eager():
    cpp = import_extension("torchlars.cpp")

    def build():
        model = make_model(device="cuda")
        optimizer = cpp.LARS(model.parameters(), "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, clip=True)
        return model, optimizer

    def load_grads(model, index):
        generator = torch.Generator().manual_seed(index)
        for param in model.parameters():
            param.grad.copy_(torch.randn(param.shape, generator=generator))

    eager_model, eager = build()
    graph_model, graphed = build()
    for model in (eager_model, graph_model):
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
    # Warm up on a side stream (state allocation), then capture one step.
    load_grads(eager_model, 0)
    load_grads(graph_model, 0)
    eager.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    # Capturing ran nothing: replay steps 1..3 and compare with eager.
    for index in range(1, 4):
        load_grads(eager_model, index)
        load_grads(graph_model, index)
        eager.step()
        graph.replay()
    torch.cuda.synchronize()
    for param, eager_param in zip(graph_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(param, eager_param, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_tensors_cut_into_cpu_blocks_give_the_unblocked_numbers(dtype):
    # Larger than a CPU block (2**18 elements), not a multiple of it, one of them
    # non-contiguous, with small tensors between them: blocks are filled across tensors.
    generator = torch.Generator().manual_seed(3)
    shapes = [(700, 1001), (3,), (1000, 300), (513, 517), (2,)]
    params = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    params[2] = params[2].t()  # non-contiguous: kept whole
    grads = [torch.randn(p.shape, generator=generator).to(dtype) for p in params]
    param_norms = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32))
    grad_norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
    ratios = SETTINGS["trust_coef"] * param_norms / (grad_norms + SETTINGS["weight_decay"] * param_norms + SETTINGS["eps"])
    # The ratio stays fp32: multiplied in fp32, rounded once.
    expected = [g.clone().add_(p, alpha=SETTINGS["weight_decay"]).mul_(r) for p, g, r in zip(params, grads, ratios)]
    for scale_gradients_ in (foreach_scale_gradients_, ops.lars_scale_gradients_):
        scaled = [grad.clone() for grad in grads]
        scale_gradients_(params, scaled, lr=0.1, clip=False, **SETTINGS)
        for grad, want in zip(scaled, expected):
            torch.testing.assert_close(grad, want, rtol=0, atol=0)


# --- The fused LARS + momentum-SGD operator: torchlars::lars_sgd_ ------------------------

# More than one chunk of the kernel (2**14 elements) and not a whole number of its 16 lanes;
# a zero parameter, whose trust ratio is 1.
FUSED_SHAPES = [(130, 129), (7,), (3, 2, 5), (4,)]
FUSED_LARS = dict(eps=1e-8, trust_coef=0.02)
SGD_OPTIONS = {
    "no_momentum": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
    "decay": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=1e-2),
    "momentum": dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-4),
    "dampening": dict(momentum=0.9, dampening=0.3, nesterov=False, weight_decay=1e-4),
    "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-4),
}


def fused_params(dtype=torch.float32, shapes=FUSED_SHAPES):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    params[-1].zero_()
    return params


def fused_grads(params, step):
    generator = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=generator) * 0.1).to(p.dtype) for p in params]


def fused_steps(params, steps, *, lr=0.1, options, maximize=False, clip=False):
    """`steps` steps of the operator on copies of `params`: (params, momentum buffers)."""
    params = [param.clone() for param in params]
    # Contents ignored on the first step, which sets the buffers as torch.optim.SGD does.
    buffers = [torch.full_like(param, float("nan")) for param in params] if options["momentum"] else []
    for step in range(steps):
        torch.ops.torchlars.lars_sgd_(
            params, fused_grads(params, step), buffers, lr=torch.tensor(lr), maximize=maximize,
            is_first_step=step == 0, clip=clip, **FUSED_LARS, **options,
        )
    return params, buffers


def foreach_steps(params, steps, *, lr=0.1, options, maximize=False, clip=False):
    """The same steps with LARS(torch.optim.SGD(foreach=True)): (params, momentum buffers)."""
    params = [param.clone().requires_grad_() for param in params]
    optimizer = LARS(torch.optim.SGD(params, lr=lr, foreach=True, **options), clip=clip, **FUSED_LARS)
    for step in range(steps):
        for param, grad in zip(params, fused_grads(params, step)):
            # LARS on a maximised objective is LARS on the negated loss (lars/fused.h).
            param.grad = -grad if maximize else grad
        optimizer.step()
    buffers = [optimizer.state[param]["momentum_buffer"] for param in params] if options["momentum"] else []
    return [param.detach() for param in params], buffers


def assert_relatively_close(actual, expected, rtol):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=rtol * e.abs().max().item())


@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("options", sorted(SGD_OPTIONS))
def test_fused_step_gives_the_foreach_numbers(options, maximize, clip):
    params = fused_params()
    fused, fused_buffers = fused_steps(params, 20, options=SGD_OPTIONS[options], maximize=maximize, clip=clip)
    foreach, foreach_buffers = foreach_steps(params, 20, options=SGD_OPTIONS[options], maximize=maximize, clip=clip)
    assert_relatively_close(fused, foreach, 1e-6)
    assert_relatively_close(fused_buffers, foreach_buffers, 1e-6)
    assert not torch.equal(fused[0], params[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_a_step_does_not_depend_on_the_thread_count(dtype):
    # The norms' partial sums are added in an order fixed by the tensors' sizes.
    params = fused_params(dtype, shapes=[(5 * 2**14 + 3,), (300, 7), (1,)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        stepped_on_one = fused_steps(params, 3, options=SGD_OPTIONS["momentum"])
        torch.set_num_threads(2)
        stepped_on_two = fused_steps(params, 3, options=SGD_OPTIONS["momentum"])
    finally:
        torch.set_num_threads(threads)
    for on_one, on_two in zip(stepped_on_one, stepped_on_two):
        torch.testing.assert_close(on_one, on_two, rtol=0, atol=0)


def test_bf16_step_does_its_arithmetic_in_fp32():
    # Reference: the fp32 step on the bf16 values, its weights and buffers rounded to bf16 after
    # every step, as the kernel stores them. Stepping in bf16 (rounding the scaled gradient and
    # every partial result) leaves a large share of the buffers off by an ulp or more.
    params = fused_params(torch.bfloat16)
    fused, fused_buffers = fused_steps(params, 3, options=SGD_OPTIONS["dampening"])
    reference = [param.float().requires_grad_() for param in params]
    optimizer = LARS(torch.optim.SGD(reference, lr=0.1, foreach=True, **SGD_OPTIONS["dampening"]), **FUSED_LARS)
    for step in range(3):
        for param, grad in zip(reference, fused_grads(params, step)):
            param.grad = grad.float()
        optimizer.step()
        with torch.no_grad():
            for param in reference:
                param.copy_(param.bfloat16())
                optimizer.state[param]["momentum_buffer"].copy_(optimizer.state[param]["momentum_buffer"].bfloat16())
    reference_buffers = [optimizer.state[param]["momentum_buffer"] for param in reference]
    for actual, expected in zip(fused + fused_buffers, reference + reference_buffers):
        expected = expected.detach().bfloat16()
        assert actual.dtype == torch.bfloat16
        # Only fp32 rounding differences, which rarely cross a bf16 rounding boundary (an ulp,
        # relative to the largest value where a momentum buffer cancels).
        torch.testing.assert_close(actual, expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())
        assert (actual == expected).float().mean() > 0.99


def test_grad_scale_unscales_inside_the_kernel_and_found_inf_skips_the_step():
    params = fused_params()
    options = dict(lr=torch.tensor(0.1), maximize=False, clip=False, **FUSED_LARS, **SGD_OPTIONS["momentum"])
    plain, scaled = [p.clone() for p in params], [p.clone() for p in params]
    plain_buffers, scaled_buffers = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    for step in range(3):
        grads = fused_grads(params, step)
        scaled_grads = [grad * 1024 for grad in grads]
        unchanged = [grad.clone() for grad in scaled_grads]
        torch.ops.torchlars.lars_sgd_(plain, grads, plain_buffers, is_first_step=step == 0, **options)
        torch.ops.torchlars.lars_sgd_(
            scaled, scaled_grads, scaled_buffers, is_first_step=step == 0,
            grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0), **options,
        )
        for grad, before in zip(scaled_grads, unchanged):
            torch.testing.assert_close(grad, before, rtol=0, atol=0)  # grads are read only
    for actual, expected in zip(scaled + scaled_buffers, plain + plain_buffers):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)  # a power of 2: exact

    # An overflow: nothing changes, not the weights nor the momentum.
    before = [t.clone() for t in scaled + scaled_buffers]
    overflowed = [torch.full_like(p, float("inf")) for p in params]
    torch.ops.torchlars.lars_sgd_(
        scaled, overflowed, scaled_buffers, is_first_step=False,
        grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0), **options,
    )
    for actual, expected in zip(scaled + scaled_buffers, before):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_fused_step_on_tensors_that_are_not_laid_out_alike():
    # A strided slice (not dense: updated through a copy, written back into its base) and a
    # channels-last weight with a contiguous gradient and buffer (copied into its layout).
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(40, 60, generator=generator)
    params = [base[:, ::2], torch.randn(8, 4, 3, 3, generator=generator).to(memory_format=torch.channels_last)]
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    buffers = [torch.randn(p.shape, generator=generator) for p in params]
    contiguous = [p.contiguous() for p in params]
    contiguous_buffers = [b.clone() for b in buffers]
    options = dict(lr=torch.tensor(0.1), maximize=False, clip=False, is_first_step=False, **FUSED_LARS, **SGD_OPTIONS["momentum"])
    torch.ops.torchlars.lars_sgd_(params, grads, buffers, **options)
    torch.ops.torchlars.lars_sgd_(contiguous, grads, contiguous_buffers, **options)
    assert_relatively_close(params + buffers, contiguous + contiguous_buffers, 1e-6)
    torch.testing.assert_close(base[:, ::2], contiguous[0], rtol=0, atol=0)
    assert params[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("amp", [False, True], ids=["no_scaler", "grad_scaler"])
@pytest.mark.parametrize("options", ["no_momentum", "nesterov"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_lars_sgd(dtype, options, amp):
    params = fused_params(dtype)
    buffers = [torch.zeros_like(p) for p in params] if SGD_OPTIONS[options]["momentum"] else []
    scaler = dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0)) if amp else {}
    torch.library.opcheck(
        torch.ops.torchlars.lars_sgd_.default,
        (params, fused_grads(params, 0), buffers),
        dict(lr=torch.tensor(0.1), maximize=False, is_first_step=False, clip=True, **FUSED_LARS, **SGD_OPTIONS[options], **scaler),
    )


def test_fused_step_runs_on_meta_tensors():
    params = [torch.empty(shape, device="meta") for shape in FUSED_SHAPES]
    torch.ops.torchlars.lars_sgd_(
        params, params, [torch.empty_like(p) for p in params], lr=torch.tensor(0.1), maximize=False,
        is_first_step=True, clip=False, **FUSED_LARS, **SGD_OPTIONS["momentum"],
    )


def _bad_inputs(params, grads, buffers):
    sparse = [g.clone() for g in grads]
    sparse[1] = sparse[1].to_sparse()
    unsupported = "the fused kernels step fp32, fp64, bf16 and fp16 tensors"
    return {
        "fewer grads": ((params, grads[:3], buffers), "got 4 params but 3 grads"),
        "fewer buffers": ((params, grads, buffers[:2]), "got 4 params but 2 momentum_buffers"),
        "grad shape": ((params, [grads[0], grads[2], grads[1], grads[3]], buffers),
                       r"grads\[1\] .* does not match params\[1\]"),
        "buffer dtype": ((params, grads, [buffers[0].double()] + buffers[1:]),
                         r"momentum_buffers\[0\] .* does not match params\[0\]"),
        "mixed dtypes": ((params[:1] + [params[1].double()] + params[2:], grads[:1] + [grads[1].double()] + grads[2:],
                          buffers[:1] + [buffers[1].double()] + buffers[2:]), r"params\[1\] has dtype Double"),
        "sparse grad": ((params, sparse, buffers), r"grads\[1\] is not dense"),
        "complex": (([p.to(torch.complex64) for p in params], [g.to(torch.complex64) for g in grads],
                     [b.to(torch.complex64) for b in buffers]), unsupported),
        "integer": (([p.long() for p in params], [g.long() for g in grads], [b.long() for b in buffers]), unsupported),
        "float8": (([p.to(torch.float8_e4m3fn) for p in params], [g.to(torch.float8_e4m3fn) for g in grads],
                    [b.to(torch.float8_e4m3fn) for b in buffers]), unsupported),
    }


@pytest.mark.parametrize("case", sorted(_bad_inputs(*[[torch.zeros(1)] * 4] * 3)))
def test_fused_step_refuses_bad_input_and_modifies_nothing(case):
    params = fused_params()
    grads = fused_grads(params, 0)
    buffers = [torch.ones_like(p) for p in params]
    args, message = _bad_inputs(params, grads, buffers)[case]
    before = [t.clone() for t in params + buffers]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.torchlars.lars_sgd_(
            *args, lr=torch.tensor(0.1), maximize=False, is_first_step=False, clip=False, **FUSED_LARS,
            **SGD_OPTIONS["momentum"],
        )
    for after, expected in zip(params + buffers, before):
        torch.testing.assert_close(after, expected, rtol=0, atol=0)


def _fused_steps_on(inputs):
    """Three fused steps in fp32, bf16 and fp64 from (params, grads, buffers): every result."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        params, grads, buffers = ([t.to(dtype) for t in tensors] for tensors in inputs)
        for _ in range(3):
            torch.ops.torchlars.lars_sgd_(
                params, grads, buffers, lr=torch.tensor(0.1), weight_decay=1e-3, momentum=0.9, dampening=0.1,
                nesterov=False, maximize=False, is_first_step=False, eps=1e-8, trust_coef=0.02, clip=False,
                grad_scale=torch.tensor(3.0))
        out += params + buffers
    return out


def test_every_cpu_capability_gives_the_same_bits(tmp_path):
    # liblars builds the kernel for the default, AVX2 and AVX-512 instruction sets and runs the
    # one torch runs (ATEN_CPU_CAPABILITY picks it). Same lanes, no fused multiply-adds: the
    # same numbers, so a run resumed on another machine continues as it would have.
    generator = torch.Generator().manual_seed(0)  # made here: torch.randn depends on the capability
    params = [torch.randn(shape, generator=generator) for shape in [(130, 129), (7,), (33,)]]
    inputs = [params, [torch.randn(p.shape, generator=generator) * 0.1 for p in params],
              [torch.randn(p.shape, generator=generator) for p in params]]
    assert_same_bits_on_every_cpu_capability(_fused_steps_on, inputs, tmp_path)


# --- trust_ratio="decayed" and the trust_ratios out argument ----------------------------

from lars_reference import reference_decayed_scaled_grad  # noqa: E402


@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_fused_decayed_step_matches_the_reference_and_writes_its_ratios(dtype, maximize):
    # The reference: the decayed gradient of each parameter (fp64 norms), then torch's SGD.
    options = SGD_OPTIONS["dampening"] | dict(weight_decay=1e-2)
    params = fused_params(dtype)
    fused = [param.clone() for param in params]
    buffers = [torch.empty_like(param) for param in params]
    reference = [param.clone().float().requires_grad_() for param in params]
    sgd = torch.optim.SGD(reference, lr=0.1, foreach=False, **(options | dict(weight_decay=0.0)))
    for step in range(3):
        grads = fused_grads(params, step)
        ratios = torch.full((len(params),), float("nan"))
        torch.ops.torchlars.lars_sgd_(
            fused, grads, buffers, lr=torch.tensor(0.1), maximize=maximize, is_first_step=step == 0, clip=False,
            trust_ratio="decayed", trust_ratios=ratios, **FUSED_LARS, **options,
        )
        expected_ratios = []
        for param, grad in zip(reference, grads):
            signed = -grad.float() if maximize else grad.float()
            param.grad = reference_decayed_scaled_grad(
                param.detach(), signed, weight_decay=options["weight_decay"], lr=0.1, clip=False, **FUSED_LARS)
            decayed = signed.double() + options["weight_decay"] * param.detach().double()
            expected_ratios.append(1.0 if param.detach().norm() == 0 else
                                   FUSED_LARS["trust_coef"] * param.detach().double().norm().item()
                                   / (decayed.norm().item() + FUSED_LARS["eps"]))
        sgd.step()
        if dtype != torch.bfloat16:
            torch.testing.assert_close(ratios.double(), torch.tensor(expected_ratios, dtype=torch.float64), rtol=1e-5, atol=0)
        if dtype == torch.bfloat16:  # the reference steps in fp32: round it as the kernel stores
            with torch.no_grad():
                for param in reference:
                    param.copy_(param.bfloat16())
    tolerance = dict(rtol=2**-7, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for actual, expected in zip(fused, reference):
        torch.testing.assert_close(actual.float(), expected.detach(), **tolerance)
    assert not torch.equal(fused[0], params[0])


def test_fused_paper_ratios_are_the_formula():
    params = fused_params()
    grads = fused_grads(params, 0)
    ratios = torch.empty(len(params))
    def norms(tensors):
        return torch.stack([tensor.double().norm() for tensor in tensors]).float()

    expected = trust_ratio_of(norms(params), norms(grads), 1e-4)
    torch.ops.torchlars.lars_sgd_(
        [p.clone() for p in params], grads, [torch.empty_like(p) for p in params], lr=torch.tensor(0.1),
        maximize=False, is_first_step=True, clip=False, trust_ratios=ratios, **FUSED_LARS, **SGD_OPTIONS["momentum"],
    )
    torch.testing.assert_close(ratios, expected, rtol=1e-6, atol=0)


def trust_ratio_of(param_norms, grad_norms, weight_decay):
    ratio = FUSED_LARS["trust_coef"] * param_norms / (grad_norms + weight_decay * param_norms + FUSED_LARS["eps"])
    return torch.where((param_norms > 0) & (grad_norms > 0), ratio, torch.ones_like(ratio))


@pytest.mark.parametrize("trust_ratio", ["paper", "decayed"])
@pytest.mark.parametrize("dtypes", sorted(DTYPES))
def test_operator_returns_the_ratios_it_used(dtypes, trust_ratio):
    params, grads = tensors(DTYPES[dtypes])
    scaled = [grad.clone() for grad in grads]
    ratios = ops.lars_scale_gradients_(params, scaled, lr=0.1, clip=False, trust_ratio=trust_ratio, **SETTINGS)
    assert ratios.dtype == torch.float32 and ratios.shape == (len(params),)
    for param, grad, got, ratio in zip(params, grads, scaled, ratios):
        tolerance = dict(rtol=1e-2, atol=1e-3) if param.dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-5, atol=1e-6)
        if trust_ratio == "decayed":
            want = reference_decayed_scaled_grad(param, grad, lr=0.1, clip=False, **SETTINGS)
            torch.testing.assert_close(got, want, **tolerance)
        # The ratio returned is the one the gradient was scaled with.
        torch.testing.assert_close(
            got.double(), ((grad.double() + SETTINGS["weight_decay"] * param.double()) * ratio.double()).to(got.dtype).double(),
            **tolerance)


def test_operator_refuses_update_and_unknown_variants():
    params, grads = tensors(DTYPES["fp32"])
    with pytest.raises(ValueError, match="trust_ratio='update' scales the base's update"):
        ops.lars_scale_gradients_(params, grads, lr=0.1, clip=False, trust_ratio="update", **SETTINGS)
    with pytest.raises(ValueError, match="trust_ratio must be 'paper', 'decayed' or 'update', got 'lamb'"):
        ops.lars_scale_gradients_(params, grads, lr=0.1, clip=False, trust_ratio="lamb", **SETTINGS)
    with pytest.raises(RuntimeError, match="trust_ratios must be a 1-D fp32 CPU tensor of 4 ratios"):
        torch.ops.torchlars.lars_sgd_(
            params, grads, [], lr=torch.tensor(0.1), maximize=False,
            is_first_step=True, clip=False, trust_ratios=torch.empty(3), **FUSED_LARS, **SGD_OPTIONS["no_momentum"])


@pytest.mark.parametrize("trust_ratio", ["paper", "decayed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_with_trust_ratio_and_trust_ratios(dtype, trust_ratio):
    params = fused_params(dtype)
    torch.library.opcheck(
        torch.ops.torchlars.lars_sgd_.default,
        (params, fused_grads(params, 0), [torch.zeros_like(p) for p in params]),
        dict(lr=torch.tensor(0.1), maximize=True, is_first_step=False, clip=True, trust_ratio=trust_ratio,
             trust_ratios=torch.empty(len(params)), **FUSED_LARS, **SGD_OPTIONS["nesterov"]),
    )
    params, grads = tensors([dtype] * 4)
    torch.library.opcheck(
        torch.ops.torchlars.lars_scale_gradients_.default,
        (params, grads),
        dict(lr=torch.tensor(0.5), clip=False, trust_ratio=trust_ratio, trust_ratios=torch.empty(4), **SETTINGS),
    )
