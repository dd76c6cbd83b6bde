"""torchlars.LARSSGD, the params-built LARS + momentum SGD, on its torch._foreach_* path.

Its numbers are LARS(torch.optim.SGD(...))'s, its state dict is torch.optim.SGD's, and it
leaves .grad as the caller's gradient. The fused path (liblars's operator) is in test_fused.py.
"""

import copy
import pickle

import pytest
import torch

from lars_reference import SGD_OPTIONS

from torchlars import LARS, LARSSGD, exclude_bias_and_norm
from torchlars_extension import import_extension

SHAPES = [(6, 5), (5,), (4, 3, 2), (3,)]


def make_params(dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype).to(device)) for shape in SHAPES]
    with torch.no_grad():
        params[3].zero_()  # a zero parameter norm: ratio 1
    return params


def set_grads(param_lists, step):
    generator = torch.Generator().manual_seed(100 + step)
    for index, params in enumerate(zip(*param_lists)):
        grad = torch.randn(params[0].shape, generator=generator, dtype=params[0].dtype)
        if index == 2 and step == 1:
            grad.zero_()  # a zero gradient norm: ratio 1
        for param in params:
            param.grad = grad.clone().to(param.device)


@pytest.mark.parametrize("clip", [False, True], ids=["lars", "larc"])
@pytest.mark.parametrize("options", sorted(SGD_OPTIONS))
def test_same_numbers_as_lars_around_sgd(options, clip):
    params, wrapped_params = make_params(), make_params()
    optimizer = LARSSGD(params, lr=0.1, trust_coef=0.02, clip=clip, foreach=True, **SGD_OPTIONS[options])
    wrapped = LARS(torch.optim.SGD(wrapped_params, lr=0.1, foreach=True, **SGD_OPTIONS[options]), trust_coef=0.02, clip=clip)
    initial = [p.detach().clone() for p in params]
    for step in range(4):
        set_grads([params, wrapped_params], step)
        optimizer.step()
        wrapped.step()
    for param, expected, start in zip(params, wrapped_params, initial):
        torch.testing.assert_close(param, expected, rtol=0, atol=0)
        assert not torch.equal(param, start)


def test_foreach_false_steps_one_parameter_at_a_time_with_the_same_numbers():
    params, foreach_params = make_params(), make_params()
    optimizer = LARSSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, foreach=False)
    reference = LARSSGD(foreach_params, lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, foreach=True)
    for step in range(3):
        set_grads([params, foreach_params], step)
        optimizer.step()
        reference.step()
    for param, expected in zip(params, foreach_params):
        torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)


def test_excluded_groups_step_as_plain_sgd():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    reference_model = copy.deepcopy(model)
    optimizer = LARSSGD(exclude_bias_and_norm(model, 1e-2), lr=0.1, momentum=0.9, foreach=True)
    reference = LARS(torch.optim.SGD(exclude_bias_and_norm(reference_model, 1e-2), lr=0.1, momentum=0.9, foreach=True))
    for step in range(3):
        set_grads([list(model.parameters()), list(reference_model.parameters())], step)
        optimizer.step()
        reference.step()
    for param, expected in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(param, expected, rtol=0, atol=0)


@pytest.mark.parametrize("direction", ["larssgd_to_sgd", "sgd_to_larssgd"])
def test_state_dicts_interchange_with_torch_sgd(direction):
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    params = make_params()
    first = (LARSSGD if direction == "larssgd_to_sgd" else torch.optim.SGD)(params, **options)
    for step in range(2):
        set_grads([params], step)
        first.step()
    second_params = [p.detach().clone().requires_grad_() for p in params]
    second = (torch.optim.SGD if direction == "larssgd_to_sgd" else LARSSGD)(second_params, **options)
    second.load_state_dict(first.state_dict())
    for param, second_param in zip(params, second_params):
        assert torch.equal(second.state[second_param]["momentum_buffer"], first.state[param]["momentum_buffer"])
    if direction == "sgd_to_larssgd":
        # LARS's settings come from LARSSGD's defaults, as the SGD state dict has none.
        assert second.param_groups[0]["trust_coef"] == 0.001 and second.param_groups[0]["clip"] is False
    set_grads([second_params], 2)
    second.step()  # steps on the loaded buffers
    assert not torch.equal(second_params[0], params[0])


def test_state_dict_round_trip_continues_identically():
    params, copy_params = make_params(), make_params()
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, clip=True, foreach=True)
    optimizer = LARSSGD(params, **options)
    set_grads([params, copy_params], 0)
    optimizer.step()
    with torch.no_grad():
        for param, copy_param in zip(params, copy_params):
            copy_param.copy_(param)
    resumed = LARSSGD(copy_params, lr=0.5)  # every setting comes from the state dict
    resumed.load_state_dict(pickle.loads(pickle.dumps(optimizer.state_dict())))
    assert resumed.param_groups[0]["clip"] is True and resumed.param_groups[0]["trust_coef"] == 0.02
    for step in (1, 2):
        set_grads([params, copy_params], step)
        optimizer.step()
        resumed.step()
    for param, expected in zip(copy_params, params):
        torch.testing.assert_close(param, expected, rtol=0, atol=0)


def test_deepcopy_and_pickle():
    params = make_params()
    optimizer = LARSSGD(params, lr=0.1, momentum=0.9)
    set_grads([params], 0)
    optimizer.step()
    for clone in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert isinstance(clone, LARSSGD)
        assert clone.param_groups[0]["lr"] == 0.1 and len(clone.state) == len(params)


def test_per_group_lars_settings():
    params, other = make_params(), make_params()
    optimizer = LARSSGD([{"params": params[:2], "trust_coef": 0.5}, {"params": params[2:]}], lr=0.1, foreach=True)
    reference = LARSSGD(other, lr=0.1, trust_coef=0.5, foreach=True)
    set_grads([params, other], 0)
    optimizer.step()
    reference.step()
    torch.testing.assert_close(params[0], other[0], rtol=0, atol=0)  # trust_coef=0.5 in both
    assert not torch.equal(params[2], other[2])  # 0.001 against 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "`lr`"),
        ({"lr": 0.1, "momentum": -0.1}, "`momentum`"),
        ({"lr": 0.1, "weight_decay": -1.0}, "`weight_decay`"),
        ({"lr": 0.1, "nesterov": True}, "`nesterov=True`"),
        ({"lr": 0.1, "eps": -1.0}, "`eps`"),
        ({"lr": 0.1, "trust_coef": -1.0}, "`trust_coef`"),
        ({"lr": 0.1, "fused": True, "foreach": True}, "`fused=True` and `foreach=True`"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LARSSGD(make_params(), **kwargs)


def test_sparse_gradients_are_refused_by_position_with_nothing_modified():
    params = make_params()
    optimizer = LARSSGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, foreach=True)
    set_grads([params], 0)
    params[3].grad = params[3].grad.to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="parameter 1 of param group 1"):
        optimizer.step()
    for param, start in zip(params, before):
        assert torch.equal(param, start)


def test_meta_device_step_never_waits_on_the_device():
    # .item() and friends fail on meta tensors: a step that passes here has no host sync.
    params = make_params(device="meta")
    optimizer = LARSSGD(params, lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-2, clip=True)
    for param in params:
        param.grad = torch.randn(param.shape, device="meta")
    optimizer.step()
    optimizer.step()
    assert all(optimizer.state[p]["momentum_buffer"].device.type == "meta" for p in params)


def test_closure_loss_is_returned():
    params = make_params()
    optimizer = LARSSGD(params, lr=0.1, foreach=True)

    def closure():
        optimizer.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    loss = optimizer.step(closure)
    assert loss.item() > 0
    assert not torch.equal(params[0], before[0])


# torch 2.11's dynamo cannot trace LARS(SGD(fused=True)) handing the base only its excluded
# groups (a setattr of param_groups on the base) into one graph.
OLD_DYNAMO = torch.__version__ < "2.13"


@pytest.mark.parametrize("build", [
    "LARSSGD",
    pytest.param("LARS_fused_SGD", marks=pytest.mark.skipif(OLD_DYNAMO, reason="one graph from torch 2.13 on")),
])
def test_compiled_step_is_one_graph_with_eager_numbers_and_leaves_grads(build):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    params, eager_params = make_params(), make_params()
    options = dict(lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-2)
    if build == "LARSSGD":
        optimizer = LARSSGD(params, trust_coef=0.02, **options)
    else:
        # Without liblars's fused operator, the base's own fused SGD steps, which dynamo does not trace.
        import_extension("torchlars.ops")
        optimizer = LARS(torch.optim.SGD(params, fused=True, **options), trust_coef=0.02)
    eager = LARSSGD(eager_params, trust_coef=0.02, foreach=True, **{**options, "lr": torch.tensor(0.1)})

    @torch.compile(fullgraph=True)  # raises on any graph break
    def compiled_step():
        optimizer.step()

    for step in range(3):
        set_grads([params, eager_params], step)
        grads = [p.grad.clone() for p in params]
        compiled_step()
        eager.step()
        # Inductor fuses the scaling into the update: the scaled gradient is never written back.
        for param, grad in zip(params, grads):
            assert torch.equal(param.grad, grad)
        for group in (*optimizer.param_groups, *eager.param_groups):
            group["lr"].mul_(0.5)  # what a scheduler does to a tensor lr
        if step == 1:
            # The first call compiles; the second recompiles once the momentum buffers exist.
            graphs_after_second_step = counters["stats"]["unique_graphs"]
    for param, expected in zip(params, eager_params):
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs_after_second_step <= 2, "recompiled"
    torch._dynamo.reset()
