// The fused LARS + momentum-SGD operator (lars/fused.h): argument checks, layouts, and the
// choice of the kernel's CPU capability. The loops are in fused_lars_sgd_kernel.cpp.

#include <lars/fused.h>

#include "fused_lars_sgd_kernel.h"

#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>

#include <string>
#include <vector>

namespace lars {

namespace {

using fused_kernel::SgdOptions;
using fused_kernel::Slot;

// The kernel's build for the capability torch itself runs its kernels with
// (ATEN_CPU_CAPABILITY included), where liblars has one; else the loops built with the
// compiler's default flags, which run on any CPU of the architecture. Chosen once.
using Kernel = decltype(&fused_kernel::cpu_default::lars_sgd);

Kernel kernel() {
#ifdef LARS_HAVE_X86_KERNELS
  static const Kernel chosen = [] {
    const std::string torch_capability = at::get_cpu_capability();
    if (torch_capability == "AVX512") {
      return &fused_kernel::cpu_avx512::lars_sgd;
    }
    return torch_capability == "AVX2" ? &fused_kernel::cpu_avx2::lars_sgd : &fused_kernel::cpu_default::lars_sgd;
  }();
  return chosen;
#else
  return &fused_kernel::cpu_default::lars_sgd;
#endif
}

// `tensor` if it is dense, else a contiguous copy: the norm then runs over the elements in
// memory order, or in index order for a tensor with gaps.
at::Tensor dense(const at::Tensor& tensor) {
  return tensor.is_non_overlapping_and_dense() ? tensor : tensor.contiguous();
}

// `tensor` if it is laid out as `like` (a dense tensor), else a copy laid out so.
at::Tensor dense_like(const at::Tensor& tensor, const at::Tensor& like) {
  if (tensor.strides() == like.strides() && tensor.is_non_overlapping_and_dense()) {
    return tensor;
  }
  return at::empty_like(like).copy_(tensor);
}

void check_floating_cpu(const at::Tensor& tensor, const char* op, const char* name, size_t i) {
  TORCH_CHECK(
      tensor.device().is_cpu(), op, ": ", name, "[", i, "] is on ", tensor.device(), "; ", op,
      " has a CPU kernel only; CUDA tensors take the foreach path");
  TORCH_CHECK(
      tensor.layout() == at::kStrided, op, ": ", name, "[", i, "] is not dense (layout ",
      tensor.layout(), "); LARS needs dense tensors");
  TORCH_CHECK(
      fused_dtype(tensor.scalar_type()), op, ": ", name, "[", i, "] has dtype ", tensor.scalar_type(),
      "; the fused kernel steps fp32, fp64, bf16 and fp16 tensors");
}

// `tensor` has the dtype and shape of params[i].
void check_matches(const at::Tensor& tensor, const at::Tensor& param, const char* name, size_t i) {
  check_floating_cpu(tensor, "lars_sgd_", name, i);
  TORCH_CHECK(
      tensor.scalar_type() == param.scalar_type() && tensor.sizes() == param.sizes(), "lars_sgd_: ",
      name, "[", i, "] (", tensor.scalar_type(), tensor.sizes(), ") does not match params[", i, "] (",
      param.scalar_type(), param.sizes(), ")");
}

// A one-element CPU tensor's value.
double cpu_scalar(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(
      tensor.device().is_cpu() && tensor.numel() == 1, "lars_sgd_: ", name,
      " must be a one-element CPU tensor, got ", tensor.numel(), " elements on ", tensor.device());
  return tensor.item<double>();
}

} // namespace

bool fused_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

void lars_sgd_(
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
    TrustRatio variant,
    const std::optional<at::Tensor>& trust_ratios) {
  // Every check before anything is written: a refused step modifies nothing.
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "lars_sgd_: got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(
      momentum_buffers.size() == n || (momentum == 0 && momentum_buffers.empty()), "lars_sgd_: got ", n,
      " params but ", momentum_buffers.size(), " momentum_buffers (momentum=", momentum,
      "; pass one buffer per param, or none when momentum is 0)");
  TORCH_CHECK_VALUE(
      variant != TrustRatio::kUpdate,
      "lars_sgd_: trust_ratio must be 'paper' or 'decayed'; 'update' scales the base's whole update, "
      "which lars::LARS (and torchlars.LARS) step around any base");
  if (trust_ratios) {
    const at::Tensor& out = *trust_ratios;
    TORCH_CHECK(
        out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 1 &&
            out.size(0) == static_cast<int64_t>(n),
        "lars_sgd_: trust_ratios must be a 1-D fp32 CPU tensor of ", n, " ratios, got ", out.scalar_type(),
        out.sizes(), " on ", out.device());
  }
  TORCH_CHECK(
      at::isFloatingType(lr.scalar_type()), "lars_sgd_: lr must be a floating-point tensor, got ",
      lr.scalar_type());
  for (const auto i : c10::irange(n)) {
    check_floating_cpu(params[i], "lars_sgd_", "params", i);
    TORCH_CHECK(
        params[i].scalar_type() == params[0].scalar_type(), "lars_sgd_: params[", i, "] has dtype ",
        params[i].scalar_type(), " but params[0] has ", params[0].scalar_type(), "; pass one dtype per call");
    check_matches(grads[i], params[i], "grads", i);
    if (momentum != 0) {
      check_matches(momentum_buffers[i], params[i], "momentum_buffers", i);
    }
  }
  const SgdOptions options{
      cpu_scalar(lr, "lr"), weight_decay, momentum, dampening, nesterov, maximize, is_first_step,
      eps, trust_coef, clip, variant};
  const std::optional<double> scale =
      grad_scale ? std::optional<double>(cpu_scalar(*grad_scale, "grad_scale")) : std::nullopt;
  if (n == 0) {
    return;
  }
  if (found_inf && cpu_scalar(*found_inf, "found_inf") != 0) {
    return;
  }

  // The kernel walks w, g and buf in the same memory order; tensors laid out otherwise are
  // updated in dense copies, written back afterwards.
  std::vector<Slot> slots;
  slots.reserve(n);
  for (const auto i : c10::irange(n)) {
    const at::Tensor param = dense(params[i]);
    slots.push_back({
        param,
        dense_like(grads[i], param),
        momentum != 0 ? dense_like(momentum_buffers[i], param) : at::Tensor()});
  }
  const at::Tensor out_ratios = trust_ratios ? *trust_ratios : at::Tensor();
  kernel()(slots, out_ratios, options, scale);
  // Written in place, as by in-place ATen ops: their version counters say so (autograd relies
  // on it).
  for (const auto i : c10::irange(n)) {
    if (slots[i].param.is_same(params[i])) {
      params[i].unsafeGetTensorImpl()->bump_version();
    } else {
      params[i].copy_(slots[i].param);
    }
    if (momentum != 0) {
      if (slots[i].momentum_buffer.is_same(momentum_buffers[i])) {
        momentum_buffers[i].unsafeGetTensorImpl()->bump_version();
      } else {
        momentum_buffers[i].copy_(slots[i].momentum_buffer);
      }
    }
  }
  if (trust_ratios) {
    trust_ratios->unsafeGetTensorImpl()->bump_version();
  }
}

} // namespace lars