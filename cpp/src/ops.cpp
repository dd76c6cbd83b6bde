// The LARS step as a PyTorch custom operator, torch.ops.torchlars.lars_scale_gradients_.
// Its fake (meta) implementation, which torch.compile traces with, is registered from
// Python in torchlars/ops.py.

#include <lars/functional.h>

#include <torch/library.h>

TORCH_LIBRARY(torchlars, m) {
  m.def(
      "lars_scale_gradients_(Tensor[] params, Tensor(a!)[] grads, *, float weight_decay, "
      "Tensor lr, float eps, float trust_coef, bool clip) -> ()");
}

// Composed of ATen ops, so one kernel serves every device.
TORCH_LIBRARY_IMPL(torchlars, CompositeExplicitAutograd, m) {
  m.impl("lars_scale_gradients_", &lars::lars_scale_gradients_);
}
