"""torch.ops.torchlars.lars_scale_gradients_ (liblars's custom operator) and LARS(backend="cpp").

The "cpp" backend must give the "foreach" backend's numbers bit for bit (same ATen ops in
the same order), trace under torch.compile through its fake implementation, run on meta
tensors, and on a GPU stay on the current stream without synchronising.
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from torchlars import LARS
from torchlars._functional import lars_scale_gradients_
from torchlars_extension import import_extension

ops = import_extension("torchlars.ops")

SETTINGS = dict(weight_decay=1e-3, eps=1e-8, trust_coef=0.02)


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
    lars_scale_gradients_(params, python_grads, lr=lr, clip=clip, backend="foreach", **SETTINGS)
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


def lars_over(model, base_cls, backend, lr=0.01, clip=True, **options):
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    base = base_cls([{"params": weights, "weight_decay": 1e-3}, {"params": biases, "lars_exclude": True}], lr=lr, **options)
    return LARS(base, trust_coef=0.02, clip=clip, backend=backend)


BASES = {
    "sgd": (torch.optim.SGD, dict(momentum=0.9)),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("name", sorted(BASES))
def test_cpp_backend_gives_the_foreach_numbers(name, clip, dtype):
    base_cls, options = BASES[name]
    model = make_model(dtype)
    twin = copy.deepcopy(model)
    cpp_lars = lars_over(model, base_cls, "cpp", clip=clip, **options)
    foreach_lars = lars_over(twin, base_cls, "foreach", clip=clip, **options)
    for step in range(3):
        set_grads(model, step)
        set_grads(twin, step)
        cpp_lars.step()
        foreach_lars.step()
    for param, twin_param in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(param, twin_param, rtol=0, atol=0)


def test_backend_is_validated():
    base = torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=0.1)
    with pytest.raises(ValueError, match="`backend` must be 'foreach' or 'cpp', got 'cuda'"):
        LARS(base, backend="cuda")


def test_cpp_backend_runs_on_meta_tensors():
    model = make_model().to("meta")
    optimizer = lars_over(model, torch.optim.SGD, "cpp", momentum=0.9)
    for param in model.parameters():
        param.grad = torch.empty_like(param)
    optimizer.step()
    assert all(param.device.type == "meta" for param in model.parameters())


@pytest.mark.parametrize("name", sorted(BASES))
def test_cpp_backend_compiles_to_one_graph_without_recompiling(name):
    torch._dynamo.reset()
    counters.clear()
    base_cls, options = BASES[name]
    model = make_model()
    twin = copy.deepcopy(model)
    optimizer = lars_over(model, base_cls, "cpp", lr=torch.tensor(0.01), **options)
    foreach = lars_over(twin, base_cls, "foreach", lr=torch.tensor(0.01), **options)

    def train(lars, model):
        # aot_eager: traced (through the fake implementation for "cpp"), run with eager
        # kernels, so both backends compiled the same way give the same numbers.
        @torch.compile(fullgraph=True, backend="aot_eager")  # raises on any graph break
        def step():
            lars.step()

        for index in range(4):
            set_grads(model, index)
            step()
            for group in lars.param_groups:
                group["lr"].mul_(0.5)  # what a scheduler does to a tensor lr
            if index == 1:
                graphs_after_two_steps = counters["stats"]["unique_graphs"]
        # The first call compiles; the second recompiles once the base has created its state.
        assert graphs_after_two_steps <= 2
        assert counters["stats"]["unique_graphs"] == graphs_after_two_steps
        counters.clear()

    train(optimizer, model)
    train(foreach, twin)
    for param, twin_param in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(param, twin_param, rtol=0, atol=0)
    torch._dynamo.reset()


# --- GPU: streams, no synchronisation, CUDA graphs ---------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("face", ["backend_cpp", "torchlars_cpp"])
def test_gpu_step_on_a_side_stream_without_sync(face):
    cpp = import_extension("torchlars.cpp")

    def run(side_stream):
        model = make_model(device="cuda")
        optimizer = (lars_over(model, torch.optim.SGD, "cpp", lr=0.1, momentum=0.9) if face == "backend_cpp"
                     else cpp.LARS(model.parameters(), "sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, clip=True))
        for index in range(3):
            set_grads(model, index)
            stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    optimizer.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.cuda.current_stream().wait_stream(stream)
        return [param.detach().cpu() for param in model.parameters()]

    for side, default in zip(run(True), run(False)):
        torch.testing.assert_close(side, default, rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("face", ["backend_cpp", "torchlars_cpp"])
def test_gpu_cuda_graph_replay_matches_eager(face):
    cpp = import_extension("torchlars.cpp")

    def build():
        model = make_model(device="cuda")
        if face == "backend_cpp":
            # A float lr: torch.optim.SGD reads a tensor lr with .item() outside torch.compile.
            optimizer = lars_over(model, torch.optim.SGD, "cpp", lr=0.1, momentum=0.9)
        else:
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
    for backend in ("foreach", "cpp"):
        scaled = [grad.clone() for grad in grads]
        lars_scale_gradients_(params, scaled, lr=0.1, clip=False, backend=backend, **SETTINGS)
        for grad, want in zip(scaled, expected):
            torch.testing.assert_close(grad, want, rtol=0, atol=0)
