#include "fused_op.h"

#include "fused_kernels.h"

#include <lars/fused.h>

#include <ATen/Version.h>
#include <ATen/ops/empty_like.h>

#include <string>

namespace lars {

bool fused_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

namespace fused_kernel {

const Kernels& kernels() {
#ifdef LARS_HAVE_X86_KERNELS
  static const Kernels chosen = [] {
    const std::string torch_capability = at::get_cpu_capability();
    if (torch_capability == "AVX512") {
      return Kernels{&cpu_avx512::lars_sgd, &cpu_avx512::lamb};
    }
    if (torch_capability == "AVX2") {
      return Kernels{&cpu_avx2::lars_sgd, &cpu_avx2::lamb};
    }
    return Kernels{&cpu_default::lars_sgd, &cpu_default::lamb};
  }();
#else
  static const Kernels chosen{&cpu_default::lars_sgd, &cpu_default::lamb};
#endif
  return chosen;
}

} // namespace fused_kernel

namespace fused_op {

void check_floating_cpu(const at::Tensor& tensor, const char* op, const char* name, size_t i) {
  TORCH_CHECK(
      tensor.device().is_cpu(), op, ": ", name, "[", i, "] is on ", tensor.device(), "; ", op,
      " has a CPU kernel only (torchlars steps CUDA tensors with its Triton kernels)");
  TORCH_CHECK(
      tensor.layout() == at::kStrided, op, ": ", name, "[", i, "] is not dense (layout ", tensor.layout(),
      "); LARS needs dense tensors");
  TORCH_CHECK(
      fused_dtype(tensor.scalar_type()), op, ": ", name, "[", i, "] has dtype ", tensor.scalar_type(),
      "; the fused kernels step fp32, fp64, bf16 and fp16 tensors");
}

void check_matches(const at::Tensor& tensor, const at::Tensor& param, const char* op, const char* name, size_t i) {
  check_floating_cpu(tensor, op, name, i);
  TORCH_CHECK(
      tensor.scalar_type() == param.scalar_type() && tensor.sizes() == param.sizes(), op, ": ", name, "[", i,
      "] (", tensor.scalar_type(), tensor.sizes(), ") does not match params[", i, "] (", param.scalar_type(),
      param.sizes(), ")");
}

double cpu_scalar(const at::Tensor& tensor, const char* op, const char* name) {
  TORCH_CHECK(
      tensor.device().is_cpu() && tensor.numel() == 1, op, ": ", name, " must be a one-element CPU tensor, got ",
      tensor.numel(), " elements on ", tensor.device());
  return tensor.item<double>();
}

at::Tensor dense(const at::Tensor& tensor) {
  return tensor.is_non_overlapping_and_dense() ? tensor : tensor.contiguous();
}

at::Tensor dense_like(const at::Tensor& tensor, const at::Tensor& like) {
  if (tensor.strides() == like.strides() && tensor.is_non_overlapping_and_dense()) {
    return tensor;
  }
  return at::empty_like(like).copy_(tensor);
}

void written_to(const at::Tensor& tensor, const at::Tensor& written) {
  if (written.is_same(tensor)) {
    tensor.unsafeGetTensorImpl()->bump_version();
  } else {
    tensor.copy_(written);
  }
}

} // namespace fused_op

} // namespace lars
