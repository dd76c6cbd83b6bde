#pragma once

// The vectorised loops of the fused LARS + momentum-SGD step (lars/fused.h), compiled once
// per CPU capability from fused_lars_sgd_kernel.cpp: `cpu_default` with the compiler's
// default flags, and on x86-64 `cpu_avx2` and `cpu_avx512` with the instruction sets of
// ATen's own AVX2 and AVX-512 builds. fused_lars_sgd.cpp checks the arguments and picks one
// at run time, as torch picks its own kernels. All give the same numbers.

#include <lars/functional.h>

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace lars::fused_kernel {

// w, g and buf of one tensor, dense and laid out alike.
struct Slot {
  at::Tensor param;
  at::Tensor grad;
  at::Tensor momentum_buffer; // undefined without momentum
};

struct SgdOptions {
  double lr;
  double weight_decay;
  double momentum;
  double dampening;
  bool nesterov;
  bool maximize;
  bool is_first_step;
  double eps;
  double trust_coef;
  bool clip;
  TrustRatio variant;
};

// The step of `slots` (one dtype); writes, if it is defined, the ratios into `trust_ratios`
// (fp32, CPU).
#define LARS_FUSED_KERNEL_DECLARATIONS                                                   \
  void lars_sgd(                                                                          \
      const std::vector<Slot>& slots,                                                     \
      const at::Tensor& trust_ratios,                                                     \
      const SgdOptions& options,                                                          \
      const std::optional<double>& grad_scale);

namespace cpu_default {
LARS_FUSED_KERNEL_DECLARATIONS
} // namespace cpu_default

namespace cpu_avx2 {
LARS_FUSED_KERNEL_DECLARATIONS
} // namespace cpu_avx2

namespace cpu_avx512 {
LARS_FUSED_KERNEL_DECLARATIONS
} // namespace cpu_avx512

#undef LARS_FUSED_KERNEL_DECLARATIONS

} // namespace lars::fused_kernel
