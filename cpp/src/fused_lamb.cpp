// The fused LAMB operator (lars/fused.h): argument checks and layouts. The loops are in
// fused_lamb_kernel.cpp.

#include <lars/fused.h>

#include "fused_kernels.h"
#include "fused_op.h"

#include <ATen/ops/full.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace lars {

namespace {

// Whether the gradient of each slot shares no memory with any other tensor of the step, so the
// first pass may write u over it: were two params given one gradient tensor, the second would
// read the first's u as its gradient. (Every tensor is dense here, so its elements span
// numel * element_size bytes from its data pointer.)
std::vector<bool> grads_alone(const std::vector<fused_kernel::LambSlot>& slots) {
  struct Span {
    uintptr_t begin;
    uintptr_t end;
    size_t slot;
    bool grad;
  };
  std::vector<Span> spans;
  spans.reserve(4 * slots.size());
  const auto add = [&](const at::Tensor& tensor, size_t slot, bool grad) {
    if (tensor.numel() > 0) {
      const auto begin = reinterpret_cast<uintptr_t>(tensor.const_data_ptr());
      spans.push_back({begin, begin + static_cast<uintptr_t>(tensor.numel() * tensor.element_size()), slot, grad});
    }
  };
  for (const auto i : c10::irange(slots.size())) {
    add(slots[i].param, i, false);
    add(slots[i].grad, i, true);
    add(slots[i].exp_avg, i, false);
    add(slots[i].exp_avg_sq, i, false);
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  // Sorted by start, a span overlaps another exactly when it starts before an earlier one ends
  // or the next one starts before it ends.
  std::vector<bool> alone(slots.size(), true);
  uintptr_t reach = 0;
  for (const auto k : c10::irange(spans.size())) {
    const bool overlaps = spans[k].begin < reach || (k + 1 < spans.size() && spans[k + 1].begin < spans[k].end);
    if (overlaps && spans[k].grad) {
      alone[spans[k].slot] = false;
    }
    reach = std::max(reach, spans[k].end);
  }
  return alone;
}

} // namespace

at::Tensor lamb_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList state_steps,
    const LAMBOptions& options,
    bool adapt,
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf) {
  using fused_op::check_matches;
  constexpr const char* op = "lamb_";
  // Every check before anything is written: a refused step modifies nothing.
  const size_t n = params.size();
  TORCH_CHECK(
      grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n, op, ": got ",
      n, " params, ", grads.size(), " grads, ", exp_avgs.size(), " exp_avgs, ", exp_avg_sqs.size(),
      " exp_avg_sqs and ", state_steps.size(), " state_steps; pass one of each per param");
  const auto [beta1, beta2] = options.betas();
  TORCH_CHECK_VALUE(
      0 <= beta1 && beta1 < 1 && 0 <= beta2 && beta2 < 1, op, ": betas must be in [0, 1), got (", beta1, ", ", beta2,
      ")");
  std::vector<double> steps(n);
  for (const auto i : c10::irange(n)) {
    fused_op::check_floating_cpu(params[i], op, "params", i);
    TORCH_CHECK(
        params[i].scalar_type() == params[0].scalar_type(), op, ": params[", i, "] has dtype ",
        params[i].scalar_type(), " but params[0] has ", params[0].scalar_type(), "; pass one dtype per call");
    check_matches(grads[i], params[i], op, "grads", i);
    check_matches(exp_avgs[i], params[i], op, "exp_avgs", i);
    check_matches(exp_avg_sqs[i], params[i], op, "exp_avg_sqs", i);
    steps[i] = fused_op::cpu_scalar(state_steps[i], op, "state_steps[i]");
  }
  const std::optional<double> scale =
      grad_scale ? std::optional<double>(fused_op::cpu_scalar(*grad_scale, op, "grad_scale")) : std::nullopt;
  const bool fp64 = n > 0 && params[0].scalar_type() == at::kDouble;
  at::Tensor ratios = at::full(
      {static_cast<int64_t>(n)}, std::numeric_limits<double>::quiet_NaN(), fp64 ? at::kDouble : at::kFloat);
  if (n == 0 || (found_inf && fused_op::cpu_scalar(*found_inf, op, "found_inf") != 0)) {
    return ratios;
  }

  // The kernel walks w, g, m and v in the same memory order; tensors laid out otherwise are
  // updated in dense copies, written back afterwards.
  std::vector<fused_kernel::LambSlot> slots;
  slots.reserve(n);
  for (const auto i : c10::irange(n)) {
    const at::Tensor param = fused_op::dense(params[i]);
    slots.push_back(
        {param, fused_op::dense_like(grads[i], param), fused_op::dense_like(exp_avgs[i], param),
         fused_op::dense_like(exp_avg_sqs[i], param), steps[i], false});
  }
  // An adapted step keeps u in the gradient between its passes: the second then reads u and w
  // instead of m, v and w, with no square root or division (fp32, BERT's 23M-element word
  // embedding: 1.47x AdamW's time instead of about 1.7x, `bench/bench_lamb.py --sets
  // embedding`). Not in half types, where u would be rounded to 16 bits.
  if (adapt && (params[0].scalar_type() == at::kFloat || params[0].scalar_type() == at::kDouble)) {
    const std::vector<bool> alone = grads_alone(slots);
    for (const auto i : c10::irange(n)) {
      slots[i].update_in_grad = alone[i];
    }
  }
  fused_kernel::kernels().lamb(slots, ratios, options, adapt, scale);
  for (const auto i : c10::irange(n)) {
    fused_op::written_to(params[i], slots[i].param);
    fused_op::written_to(exp_avgs[i], slots[i].exp_avg);
    fused_op::written_to(exp_avg_sqs[i], slots[i].exp_avg_sq);
    if (slots[i].update_in_grad && slots[i].grad.is_same(grads[i])) {
      // A gradient the kernel took a dense copy of is left as it was.
      fused_op::written_to(grads[i], slots[i].grad);
    }
  }
  return ratios;
}

} // namespace lars
