// liblars's PyTorch custom operators, torch.ops.torchlars.*: the LARS gradient scaling
// (functional.h) and the fused LARS + momentum-SGD step (fused.h). Their fake (meta)
// implementations, which torch.compile traces with, are registered from Python in
// torchlars/ops.py.

#include <lars/functional.h>
#include <lars/fused.h>

#include <torch/library.h>

TORCH_LIBRARY(torchlars, m) {
  m.def(
      "lars_scale_gradients_(Tensor[] params, Tensor(a!)[] grads, *, float weight_decay, "
      "Tensor lr, float eps, float trust_coef, bool clip) -> ()");
  m.def("lars_param_norms(Tensor[] tensors) -> Tensor");
  m.def(
      "lars_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!) param_norms, *, Tensor lr, float weight_decay, float momentum, float dampening, "
      "bool nesterov, bool maximize, bool is_first_step, float eps, float trust_coef, bool clip, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, bool recompute_param_norms=False) -> ()");
}

// lars_scale_gradients_ is composed of ATen ops, so one kernel serves every device. The
// fused step has a CPU kernel only; registered for every backend, it tells a caller with
// CUDA or sparse tensors so (and that CUDA tensors take the foreach path).
TORCH_LIBRARY_IMPL(torchlars, CompositeExplicitAutograd, m) {
  m.impl("lars_scale_gradients_", &lars::lars_scale_gradients_);
  m.impl("lars_param_norms", &lars::lars_param_norms);
  m.impl("lars_sgd_", &lars::lars_sgd_);
}

// Sparse tensors are not covered by CompositeExplicitAutograd: the same kernel refuses them
// by name.
TORCH_LIBRARY_IMPL(torchlars, SparseCPU, m) {
  m.impl("lars_sgd_", &lars::lars_sgd_);
}
