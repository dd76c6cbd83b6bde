"""torchlars.cpp.LARS (liblars through pybind11): its Python face, and parity with torchlars.LARS.

Parity: torchlars.LARS around torch.optim.X (single-tensor, foreach=False) and
torchlars.cpp.LARS around libtorch's X start from the same parameters, see the same
batches, and must end with the same parameters after several steps. The LARS scaling is
bit-for-bit the same; what differs is in the base optimizers themselves:

- fp32: RMSprop and Adagrad agree to the last bit. Adam, AdamW and centered RMSprop
  update their moving averages with ``lerp_`` in Python and ``mul_().add_()`` in libtorch,
  which round differently: about one ulp per step (rtol 1e-6, atol 1e-7). Around SGD,
  torchlars.cpp.LARS steps with liblars's fused LARS-momentum kernel (lars/fused.h), which
  sums the norms in an order of its own: the same tolerance.
- bf16: Adagrad agrees to the last bit. libtorch multiplies by its momentum, betas and
  alpha through ``Tensor::mul_(Scalar)``, which first rounds the scalar to bf16 (0.9 becomes
  0.8984375) where Python multiplies in fp32; the parameters then differ by a bf16 rounding
  step or two (rtol 1e-2, atol 2e-3). Centered RMSprop divides by ``sqrt(v - mean^2)``, a
  difference of two rounded bf16 averages, which magnifies those steps: up to 7 ulps seen
  with torch 2.11 (atol 5e-3).
"""

import copy

import pytest
import torch

from torchlars import LARS
from torchlars_extension import import_extension

cpp = import_extension("torchlars.cpp")

# name -> (torch.optim class, its options, the base of torchlars.cpp.LARS)
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3), "sgd"),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3), "sgd"),
    "adam": (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=1e-3), "adam"),
    "adam_amsgrad": (torch.optim.Adam, dict(lr=1e-2, eps=1e-6, weight_decay=1e-3, amsgrad=True), "adam"),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=1e-2), "adamw"),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=1e-3, momentum=0.5), "rmsprop"),
    "rmsprop_centered": (torch.optim.RMSprop, dict(lr=1e-2, eps=1e-6, weight_decay=1e-3, centered=True), "rmsprop"),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.1, lr_decay=1e-2, weight_decay=1e-3, initial_accumulator_value=0.1, eps=1e-8), "adagrad"),
}
# Bit-for-bit; the others differ by rounding only (see the module docstring).
EXACT = {torch.float32: {"rmsprop", "adagrad"}, torch.bfloat16: {"adagrad"}}
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.bfloat16: dict(rtol=1e-2, atol=2e-3)}


def cpp_options(options):
    """torch.optim's keyword options under torchlars.cpp's names (the base's eps is base_eps)."""
    return {("base_eps" if key == "eps" else key): value for key, value in options.items()}


def make_model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model.to(dtype)


def batches(dtype, steps):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=generator, dtype=dtype), torch.randn(16, 3, generator=generator, dtype=dtype))
            for _ in range(steps)]


def train(model, optimizer, data):
    for x, y in data:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        optimizer.step()


def groups_of(model, options, excluded):
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    if not excluded:
        return [{"params": weights + biases}]
    return [{"params": weights}, {"params": biases, "lars_exclude": True, **options}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("excluded", [False, True], ids=["all", "excluded"])
@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("name", sorted(BASES))
def test_cpp_matches_python(name, clip, excluded, dtype):
    optim_cls, options, base = BASES[name]
    python_model = make_model(dtype)
    cpp_model = copy.deepcopy(python_model)
    # The excluded group has its own lr and weight decay, to show they are the base's.
    excluded_options = dict(lr=options["lr"] / 2, weight_decay=5e-3)
    python = LARS(optim_cls(groups_of(python_model, excluded_options, excluded), foreach=False, **options),
                  trust_coef=0.02, clip=clip)
    lars_cpp = cpp.LARS(groups_of(cpp_model, excluded_options, excluded), base, trust_coef=0.02, clip=clip,
                        **cpp_options(options))
    data = batches(dtype, steps=5)
    train(python_model, python, data)
    train(cpp_model, lars_cpp, data)

    tolerance = dict(rtol=0, atol=0) if name in EXACT[dtype] else TOLERANCE[dtype]
    if name == "rmsprop_centered" and dtype == torch.bfloat16:
        tolerance = dict(tolerance, atol=5e-3)
    initial = make_model(dtype)
    for python_param, cpp_param, initial_param in zip(python_model.parameters(), cpp_model.parameters(), initial.parameters()):
        assert not torch.equal(cpp_param, initial_param)  # it trained
        torch.testing.assert_close(cpp_param, python_param, **tolerance)


def test_step_evaluates_the_closure_first_and_returns_its_loss():
    model = make_model(torch.float32)
    twin = copy.deepcopy(model)
    lars_cpp = cpp.LARS(model.parameters(), "sgd", lr=0.1, trust_coef=0.05)
    python = LARS(torch.optim.SGD(twin.parameters(), lr=0.1), trust_coef=0.05)
    (x, y), = batches(torch.float32, steps=1)
    for param in model.parameters():
        param.grad = torch.full_like(param, 1e3)  # stale; the closure replaces it

    def closure():
        lars_cpp.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = lars_cpp.step(closure)
    assert loss.requires_grad
    train(twin, python, [(x, y)])
    # To rounding: over SGD the C++ LARS steps through the fused kernel, the Python one through
    # ATen's ops, whose sums depend on the CPU capability.
    for param, twin_param in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(param, twin_param, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    param = torch.nn.Parameter(torch.randn(3))
    param.grad = torch.randn(3)
    lars_cpp = cpp.LARS([param], "adam")
    lars_cpp.zero_grad(set_to_none=set_to_none)
    assert param.grad is None if set_to_none else torch.equal(param.grad, torch.zeros(3))


def test_settings_and_repr():
    lars_cpp = cpp.LARS([torch.nn.Parameter(torch.randn(2))], "rmsprop", 1e-6, 0.01, clip=True)
    assert (lars_cpp.eps, lars_cpp.trust_coef, lars_cpp.clip) == (1e-6, 0.01, True)
    assert repr(lars_cpp) == "torchlars.cpp.LARS(base='rmsprop', eps=1e-06, trust_coef=0.01, clip=True, trust_ratio='paper')"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(base="lamb"), ValueError, "base must be one of 'sgd', 'adam', 'adamw', 'rmsprop', 'adagrad', got 'lamb'"),
        (dict(base=torch.optim.SGD), TypeError, "`base` must be a str"),
        (dict(base="sgd"), TypeError, "base 'sgd' needs the option 'lr'"),
        (dict(base="sgd", lr=0.1, betas=(0.9, 0.99)), TypeError,
         "unknown option(s) ['betas'] for base 'sgd'; its options are lr, momentum, dampening, weight_decay, nesterov"),
        (dict(base="adam", eps=1e-8, amsgrad="yes"), TypeError, "option 'amsgrad' of base 'adam' got 'yes', which is not a bool"),
        (dict(base="adam", betas=0.9), TypeError, "option 'betas' of base 'adam' got 0.9, which is not a pair of floats"),
        (dict(base="sgd", lr=0.1, eps=-1.0), ValueError, "eps must be non-negative, got -1"),
        (dict(base="sgd", lr=0.1, trust_coef=-1.0), ValueError, "trust_coef must be non-negative, got -1"),
        (dict(base="sgd", lr=0.1, clip=1), TypeError, "`clip` must be a bool"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error) as raised:
        cpp.LARS([torch.nn.Parameter(torch.randn(2))], **kwargs)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "params, error, message",
    [
        ([], ValueError, "`params` is empty"),
        (torch.randn(2, requires_grad=True), TypeError, "got a Tensor"),
        ([torch.randn(2), 3.0], TypeError, "parameter 1 of param group 0 is a float, not a Tensor"),
        ([{"params": [torch.randn(2)]}, {"lr": 0.1}], ValueError, "param group 1 has no 'params'"),
        ([{"params": [torch.randn(2)], "eps": 1e-3}], TypeError, "unknown option(s) ['eps'] for base 'adam'"),
        ([{"params": [torch.randn(2)], "lars_exclude": 1}], TypeError, "'lars_exclude' of param group 0 must be a bool"),
    ],
)
def test_bad_params(params, error, message):
    with pytest.raises(error) as raised:
        cpp.LARS(params, "adam")
    assert message in str(raised.value)


def test_sparse_gradient_is_refused_naming_its_position():
    dense, sparse = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 2))
    lars_cpp = cpp.LARS([{"params": [dense]}, {"params": [sparse]}], "sgd", lr=0.1)
    dense.grad = torch.randn(3)
    sparse.grad = torch.randn(4, 2).to_sparse()
    before = dense.grad.clone()
    with pytest.raises(ValueError, match="sparse gradients: parameter 0 of param group 1"):
        lars_cpp.step()
    assert torch.equal(dense.grad, before)


def test_the_module_is_reached_from_the_package():
    import torchlars

    assert torchlars.cpp is cpp


def test_steps_from_several_threads_run_one_at_a_time():
    # step() releases the GIL; its lock makes concurrent steps of one optimizer run one after
    # the other, so they give the numbers of the same steps taken in turn. (Without the lock,
    # threads scale and update the same tensors at once and lose each other's writes.)
    import threading

    threads, steps = 4, 5
    generator = torch.Generator().manual_seed(2)
    init, grad = torch.randn(2, 512, 512, generator=generator)
    params = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    optimizers = [cpp.LARS([param], "sgd", lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.1) for param in params]
    for param in params:
        param.grad = grad.clone()
    for _ in range(threads * steps):
        optimizers[0].step()
    start = threading.Barrier(threads)

    def stepping():
        start.wait()
        for _ in range(steps):
            optimizers[1].step()

    workers = [threading.Thread(target=stepping) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert torch.equal(params[1].grad, params[0].grad)
    assert torch.equal(params[1], params[0])


# --- trust_ratio="paper" | "decayed" | "update", and trust_ratios() -----------------------

from lars_reference import reference_decayed_scaled_grad, reference_scaled_grad, reference_update_step  # noqa: E402

VARIANT_BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2, eps=1e-6)),
}


def reference_steps(model, optim_cls, options, data, trust_ratio, clip):
    """Per-parameter LARS of the given variant around torch.optim's base, in fp64 norms."""
    lars = dict(eps=1e-8, trust_coef=0.02, clip=clip)
    params = list(model.parameters())
    kept_decay = trust_ratio == "update"
    base = optim_cls(params, foreach=False, **{**options, "weight_decay": options["weight_decay"] if kept_decay else 0.0})
    ratios = None
    for x, y in data:
        base.zero_grad()
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        if kept_decay:
            ratios = reference_update_step(params, base.step, lr=options["lr"], **lars)
            continue
        scale = reference_scaled_grad if trust_ratio == "paper" else reference_decayed_scaled_grad
        for param in params:
            param.grad = scale(param.detach(), param.grad, weight_decay=options["weight_decay"], lr=options["lr"], **lars)
        base.step()
    return ratios


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("base", sorted(VARIANT_BASES))
@pytest.mark.parametrize("trust_ratio", ["paper", "decayed", "update"])
def test_trust_ratio_variants_match_the_reference(trust_ratio, base, clip, dtype):
    optim_cls, options = VARIANT_BASES[base]
    reference_model = make_model(dtype)
    cpp_model = copy.deepcopy(reference_model)
    lars_cpp = cpp.LARS(cpp_model.parameters(), base, eps=1e-8, trust_coef=0.02, clip=clip, trust_ratio=trust_ratio,
                        **cpp_options(options))
    assert lars_cpp.trust_ratio == trust_ratio and lars_cpp.trust_ratios() == {}
    data = batches(dtype, steps=4)
    update_ratios = reference_steps(reference_model, optim_cls, options, data, trust_ratio, clip)
    train(cpp_model, lars_cpp, data)
    tolerance = dict(rtol=1e-2, atol=4e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for cpp_param, reference_param in zip(cpp_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(cpp_param, reference_param, **tolerance)
    ratios = lars_cpp.trust_ratios()
    assert list(ratios) == list(cpp_model.parameters())
    assert all(r.dim() == 0 and r.dtype == torch.float32 for r in ratios.values())
    if update_ratios is not None and dtype != torch.bfloat16:
        torch.testing.assert_close(torch.stack(list(ratios.values())).double(), torch.tensor(update_ratios, dtype=torch.float64), rtol=1e-4, atol=0)


def test_an_unknown_trust_ratio_is_refused_by_name():
    with pytest.raises(ValueError, match="torchlars.cpp.LARS: trust_ratio must be 'paper', 'decayed' or 'update', got 'lamb'"):
        cpp.LARS([torch.nn.Parameter(torch.randn(2))], "sgd", lr=0.1, trust_ratio="lamb")
    with pytest.raises(TypeError, match="`trust_ratio` must be a str"):
        cpp.LARS([torch.nn.Parameter(torch.randn(2))], "sgd", lr=0.1, trust_ratio=1)


def test_update_accepts_a_base_weight_decay_and_keeps_it_the_bases():
    # With "update" LARS takes nothing from the base; around plain SGD without momentum the
    # update is -lr * (g + wd * w), so the ratio's denominator holds the decay.
    param = torch.nn.Parameter(torch.randn(20))
    grad = torch.randn(20)
    lars_cpp = cpp.LARS([param], "sgd", lr=0.1, weight_decay=0.5, trust_coef=0.02, eps=0.0, trust_ratio="update")
    before = param.detach().clone()
    param.grad = grad.clone()
    lars_cpp.step()
    update = (grad + 0.5 * before).double()
    ratio = 0.02 * before.double().norm() / update.norm()
    torch.testing.assert_close(param.detach().double(), before.double() - 0.1 * ratio * update, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lars_cpp.trust_ratios()[param].double(), ratio, rtol=1e-6, atol=0)
