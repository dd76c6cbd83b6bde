// liblars's PyTorch custom operators, torch.ops.torchlars.*: the LARS gradient scaling
// (functional.h) and the fused LARS + momentum-SGD and LAMB steps (fused.h). Their fake (meta)
// implementations, which torch.compile traces with, are registered from Python in
// torchlars/ops.py.

#include <lars/functional.h>
#include <lars/fused.h>

#include "fused_op.h"

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

// A learning rate given as a one-element CPU tensor (so that a changing lr causes no
// recompilation), as a number.
double lr_of(const at::Tensor& lr, const char* op) {
  TORCH_CHECK(
      at::isFloatingType(lr.scalar_type()), op, ": lr must be a floating-point tensor, got ", lr.scalar_type());
  return lars::fused_op::cpu_scalar(lr, op, "lr");
}

// The schema's keyword arguments, unpacked into lars::LARSSGDOptions here and nowhere else.
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
  const auto options = lars::LARSSGDOptions(lr_of(lr, "lars_sgd_"))
                           .weight_decay(weight_decay)
                           .momentum(momentum)
                           .dampening(dampening)
                           .nesterov(nesterov)
                           .maximize(maximize)
                           .eps(eps)
                           .trust_coef(trust_coef)
                           .clip(clip)
                           .trust_ratio(lars::parse_trust_ratio(trust_ratio, "lars_sgd_"));
  lars::lars_sgd_(params, grads, momentum_buffers, options, is_first_step, grad_scale, found_inf, trust_ratios);
}

// The schema's keyword arguments, unpacked into lars::LAMBOptions here and nowhere else.
at::Tensor lamb_op(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList state_steps,
    const at::Tensor& lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    double trust_coef,
    double trust_eps,
    bool trust_clip,
    bool adapt,
    bool bias_correction,
    bool maximize,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf) {
  const auto options = lars::LAMBOptions(lr_of(lr, "lamb_"))
                           .betas(std::make_tuple(beta1, beta2))
                           .eps(eps)
                           .weight_decay(weight_decay)
                           .trust_coef(trust_coef)
                           .trust_eps(trust_eps)
                           .trust_clip(trust_clip)
                           .bias_correction(bias_correction)
                           .maximize(maximize);
  return lars::lamb_(params, grads, exp_avgs, exp_avg_sqs, state_steps, options, adapt, grad_scale, found_inf);
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
  m.def(
      "lamb_(Tensor(a!)[] params, Tensor(d!)[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor[] state_steps, *, Tensor lr, float beta1, float beta2, float eps, float weight_decay, "
      "float trust_coef, float trust_eps, bool trust_clip, bool adapt, bool bias_correction, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
}

// lars_scale_gradients_ is composed of ATen ops, so one kernel serves every device. The
// fused steps have CPU kernels only; registered for every backend, they tell a caller with
// CUDA or sparse tensors so (torchlars steps CUDA tensors with its Triton kernels).
TORCH_LIBRARY_IMPL(torchlars, CompositeExplicitAutograd, m) {
  m.impl("lars_scale_gradients_", &lars_scale_gradients_op);
  m.impl("lars_sgd_", &lars_sgd_op);
  m.impl("lamb_", &lamb_op);
}

// Sparse tensors are not covered by CompositeExplicitAutograd: the same kernel refuses them
// by name.
TORCH_LIBRARY_IMPL(torchlars, SparseCPU, m) {
  m.impl("lars_sgd_", &lars_sgd_op);
  m.impl("lamb_", &lamb_op);
}
