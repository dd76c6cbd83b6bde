#pragma once

// The vectorised loops of liblars's fused steps (lars/fused.h), compiled once per CPU
// capability from fused_lars_sgd_kernel.cpp and fused_lamb_kernel.cpp: `cpu_default` with the
// compiler's default flags, and on x86-64 `cpu_avx2` and `cpu_avx512` with the instruction
// sets of ATen's own AVX2 and AVX-512 builds. fused_op.cpp checks the arguments and picks one
// at run time, as torch picks its own kernels. All give the same numbers.

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace lars {
struct LAMBOptions;
struct LARSSGDOptions;
} // namespace lars

namespace lars::fused_kernel {

// w, g and buf of one tensor, dense and laid out alike.
struct SgdSlot {
  at::Tensor param;
  at::Tensor grad;
  at::Tensor momentum_buffer; // undefined without momentum
};

// w, g, m and v of one tensor, dense and laid out alike, and its step number. With
// `update_in_grad` the first pass of an adapted step writes u over g (read before, in the same
// block) and the second reads it back; without, the second makes u again from m and v.
struct LambSlot {
  at::Tensor param;
  at::Tensor grad;
  at::Tensor exp_avg;
  at::Tensor exp_avg_sq;
  double step;
  bool update_in_grad;
};

// The steps of `slots` (one dtype); each writes, if it is defined, the ratios into
// `trust_ratios` (a CPU tensor, fp32 or fp64).
#define LARS_FUSED_KERNEL_DECLARATIONS                   \
  void lars_sgd(                                          \
      const std::vector<SgdSlot>& slots,                  \
      const at::Tensor& trust_ratios,                     \
      const LARSSGDOptions& options,                      \
      bool is_first_step,                                 \
      const std::optional<double>& grad_scale);           \
  void lamb(                                              \
      const std::vector<LambSlot>& slots,                 \
      const at::Tensor& trust_ratios,                     \
      const LAMBOptions& options,                         \
      bool adapt,                                         \
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

// The builds of the kernels for one CPU capability.
struct Kernels {
  decltype(&cpu_default::lars_sgd) lars_sgd;
  decltype(&cpu_default::lamb) lamb;
};

// The build for the capability torch itself runs its kernels with (ATEN_CPU_CAPABILITY
// included), where liblars has one; else the loops built with the compiler's default flags,
// which run on any CPU of the architecture. Chosen once (fused_op.cpp).
const Kernels& kernels();

} // namespace lars::fused_kernel
