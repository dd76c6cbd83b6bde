// The fused LARS + momentum-SGD operator (lars/fused.h): argument checks and layouts. The
// loops are in fused_lars_sgd_kernel.cpp.

#include <lars/fused.h>

#include "fused_kernels.h"
#include "fused_op.h"

#include <c10/util/irange.h>

#include <vector>

namespace lars {

void lars_sgd_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum_buffers,
    const LARSSGDOptions& options,
    bool is_first_step,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& trust_ratios) {
  using fused_op::check_matches;
  constexpr const char* op = "lars_sgd_";
  // Every check before anything is written: a refused step modifies nothing.
  const size_t n = params.size();
  const bool momentum = options.momentum() != 0;
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(
      momentum_buffers.size() == n || (!momentum && momentum_buffers.empty()), op, ": got ", n, " params but ",
      momentum_buffers.size(), " momentum_buffers (momentum=", options.momentum(),
      "; pass one buffer per param, or none when momentum is 0)");
  TORCH_CHECK_VALUE(
      options.trust_ratio() != TrustRatio::kUpdate,
      "lars_sgd_: trust_ratio must be 'paper' or 'decayed'; 'update' scales the base's whole update, "
      "which lars::LARS (and torchlars.LARS) step around any base");
  for (const auto i : c10::irange(n)) {
    fused_op::check_floating_cpu(params[i], op, "params", i);
    TORCH_CHECK(
        params[i].scalar_type() == params[0].scalar_type(), op, ": params[", i, "] has dtype ",
        params[i].scalar_type(), " but params[0] has ", params[0].scalar_type(), "; pass one dtype per call");
    check_matches(grads[i], params[i], op, "grads", i);
    if (momentum) {
      check_matches(momentum_buffers[i], params[i], op, "momentum_buffers", i);
    }
  }
  if (trust_ratios) {
    const at::Tensor& out = *trust_ratios;
    // fp64 ratios for fp64 params, as the step uses them; fp32 ones are the rounded values.
    const bool fp64_allowed = n > 0 && params[0].scalar_type() == at::kDouble;
    TORCH_CHECK(
        out.device().is_cpu() && (out.scalar_type() == at::kFloat || (fp64_allowed && out.scalar_type() == at::kDouble)) &&
            out.dim() == 1 && out.size(0) == static_cast<int64_t>(n),
        op, ": trust_ratios must be a 1-D fp32 CPU tensor of ", n, " ratios (or fp64 for fp64 params), got ",
        out.scalar_type(), out.sizes(), " on ", out.device());
  }
  const std::optional<double> scale =
      grad_scale ? std::optional<double>(fused_op::cpu_scalar(*grad_scale, op, "grad_scale")) : std::nullopt;
  if (n == 0 || (found_inf && fused_op::cpu_scalar(*found_inf, op, "found_inf") != 0)) {
    return;
  }

  // The kernel walks w, g and buf in the same memory order; tensors laid out otherwise are
  // updated in dense copies, written back afterwards.
  std::vector<fused_kernel::SgdSlot> slots;
  slots.reserve(n);
  for (const auto i : c10::irange(n)) {
    const at::Tensor param = fused_op::dense(params[i]);
    slots.push_back(
        {param, fused_op::dense_like(grads[i], param),
         momentum ? fused_op::dense_like(momentum_buffers[i], param) : at::Tensor()});
  }
  fused_kernel::kernels().lars_sgd(slots, trust_ratios ? *trust_ratios : at::Tensor(), options, is_first_step, scale);
  for (const auto i : c10::irange(n)) {
    fused_op::written_to(params[i], slots[i].param);
    if (momentum) {
      fused_op::written_to(momentum_buffers[i], slots[i].momentum_buffer);
    }
  }
  if (trust_ratios) {
    trust_ratios->unsafeGetTensorImpl()->bump_version();
  }
}

} // namespace lars
