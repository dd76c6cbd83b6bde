// liblars's PyTorch custom operators, torch.ops.torchlars.*: the LARS gradient scaling
// (functional.h) and the fused LARS + momentum-SGD step (fused.h). Their fake (meta)
// implementations, which torch.compile traces with, are registered from Python in
// torchlars/ops.py.

#include <lars/functional.h>
#include <lars/fused.h>

#include <torch/library.h>

#include <optional>

namespace {

// The operators take the trust-ratio variant by its Python name.

void lars_scale_gradients_op(
    at::TensorList params,
    at::TensorList grads,
    double weight_decay,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip,
    c10::string_view trust_ratio,
    const std::optional<at::Tensor>& trust_ratios) {
  lars::lars_scale_gradients_(
      params, grads, weight_decay, lr, eps, trust_coef, clip,
      lars::parse_trust_ratio(trust_ratio, "lars_scale_gradients_"), trust_ratios);
}

void lars_sgd_op(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum_buffers,
    const at::Tensor& lr,
    double weight_decay,
    double momentum,
    double dampening,
    bool nesterov,
    bool maximize,
    bool is_first_step,
    double eps,
    double trust_coef,
    bool clip,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf,
    c10::string_view trust_ratio,
    const std::optional<at::Tensor>& trust_ratios) {
  lars::lars_sgd_(
      params, grads, momentum_buffers, lr, weight_decay, momentum, dampening, nesterov, maximize,
      is_first_step, eps, trust_coef, clip, grad_scale, found_inf, lars::parse_trust_ratio(trust_ratio, "lars_sgd_"), trust_ratios);
}

} // namespace

TORCH_LIBRARY(torchlars, m) {
  m.def(
      "lars_scale_gradients_(Tensor[] params, Tensor(a!)[] grads, *, float weight_decay, "
      "Tensor lr, float eps, float trust_coef, bool clip, str trust_ratio=\"paper\", "
      "Tensor(b!)? trust_ratios=None) -> ()");
  m.def(
      "lars_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, Tensor lr, "
      "float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, "
      "bool is_first_step, float eps, float trust_coef, bool clip, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, str trust_ratio=\"paper\", Tensor(c!)? trust_ratios=None) -> ()");
}

// lars_scale_gradients_ is composed of ATen ops, so one kernel serves every device. The
// fused step has a CPU kernel only; registered for every backend, it tells a caller with
// CUDA or sparse tensors so (and that CUDA tensors take the foreach path).
TORCH_LIBRARY_IMPL(torchlars, CompositeExplicitAutograd, m) {
  m.impl("lars_scale_gradients_", &lars_scale_gradients_op);
  m.impl("lars_sgd_", &lars_sgd_op);
}

// Sparse tensors are not covered by CompositeExplicitAutograd: the same kernel refuses them
// by name.
TORCH_LIBRARY_IMPL(torchlars, SparseCPU, m) {
  m.impl("lars_sgd_", &lars_sgd_op);
}
