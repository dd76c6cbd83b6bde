#include <lars/functional.h>

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

namespace lars {

TrustRatio parse_trust_ratio(c10::string_view name, const char* who) {
  if (name == "paper") {
    return TrustRatio::kPaper;
  }
  if (name == "decayed") {
    return TrustRatio::kDecayed;
  }
  TORCH_CHECK_VALUE(
      name == "update", who, ": trust_ratio must be 'paper', 'decayed' or 'update', got '", name, "'");
  return TrustRatio::kUpdate;
}

const char* trust_ratio_name(TrustRatio variant) {
  switch (variant) {
    case TrustRatio::kPaper:
      return "paper";
    case TrustRatio::kDecayed:
      return "decayed";
    case TrustRatio::kUpdate:
      return "update";
  }
  TORCH_INTERNAL_ASSERT(false, "unknown lars::TrustRatio");
}

namespace {

// What trust_ratio does differently to tensors and to numbers: the zero-norm rule (a tensor
// op for tensors, so that nothing waits on the device) and the clip.
at::Tensor unless_zero_norm(const at::Tensor& ratio, const at::Tensor& param_norms, const at::Tensor& norms) {
  return at::where((param_norms > 0) & (norms > 0), ratio, at::ones_like(ratio));
}

double unless_zero_norm(double ratio, double param_norm, double norm) {
  return param_norm > 0 && norm > 0 ? ratio : 1.0;
}

at::Tensor at_most_one(const at::Tensor& ratio) {
  return at::clamp_max(ratio, 1.0);
}

double at_most_one(double ratio) {
  return std::min(ratio, 1.0);
}

} // namespace

template <typename T>
T trust_ratio(
    const T& param_norms,
    const T& norms,
    double weight_decay,
    const T& lr,
    double eps,
    double trust_coef,
    bool clip,
    TrustRatio variant) {
  // "decayed" and "update" divide by their norm alone: the decay is in it, or in the step.
  const T denominator = variant == TrustRatio::kPaper ? norms + weight_decay * param_norms + eps : norms + eps;
  T ratio = unless_zero_norm(trust_coef * param_norms / denominator, param_norms, norms);
  if (clip) {
    ratio = at_most_one(ratio / lr);
  }
  return ratio;
}

template at::Tensor trust_ratio<at::Tensor>(
    const at::Tensor&, const at::Tensor&, double, const at::Tensor&, double, double, bool, TrustRatio);
template double trust_ratio<double>(
    const double&, const double&, double, const double&, double, double, bool, TrustRatio);

namespace {

// The tensors of one device and dtype, as multi-tensor kernels want them.
struct DeviceDtypeGroup {
  c10::Device device;
  c10::ScalarType dtype;
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> grads;
  std::vector<int64_t> indices; // of params and grads in the lists given
};

// `grads` (named `name` in errors, from `op`) pair with `params` one to one.
std::vector<DeviceDtypeGroup> group_by_device_and_dtype(
    at::TensorList params, at::TensorList grads, const char* op, const char* name) {
  TORCH_CHECK(
      params.size() == grads.size(), op, ": got ", params.size(), " params but ", grads.size(), " ", name);
  std::vector<DeviceDtypeGroup> groups;
  for (const auto i : c10::irange(params.size())) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    TORCH_CHECK(
        grad.layout() == at::kStrided,
        op, ": ", name, "[", i, "] is not dense (layout ", grad.layout(), "); LARS needs dense tensors");
    TORCH_CHECK(
        grad.device() == param.device() && grad.scalar_type() == param.scalar_type() &&
            grad.sizes() == param.sizes(),
        op, ": ", name, "[", i, "] (", grad.scalar_type(), grad.sizes(), " on ",
        grad.device(), ") does not match params[", i, "] (", param.scalar_type(), param.sizes(),
        " on ", param.device(), ")");
    auto group = std::find_if(groups.begin(), groups.end(), [&](const DeviceDtypeGroup& g) {
      return g.device == param.device() && g.dtype == param.scalar_type();
    });
    if (group == groups.end()) {
      group = groups.insert(groups.end(), {param.device(), param.scalar_type(), {}, {}, {}});
    }
    group->params.push_back(param);
    group->grads.push_back(grad);
    group->indices.push_back(static_cast<int64_t>(i));
  }
  return groups;
}

// The L2 norms of `tensors` (all of `dtype`), stacked into one tensor; half-precision norms
// are accumulated (and returned) in fp32.
at::Tensor norms_of(at::TensorList tensors, c10::ScalarType dtype) {
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  const auto norm_dtype = half ? std::optional<c10::ScalarType>(at::kFloat) : std::nullopt;
  return at::stack(at::_foreach_norm(tensors, 2, norm_dtype));
}

// Elements per block of cpu_blocks: 1 MiB of fp32 gradient plus as much parameter stays in a
// last-level cache; smaller blocks cost more in per-call overhead than they save (bench/).
constexpr int64_t kCpuBlockNumel = int64_t{1} << 18;

struct Block {
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> grads;
  std::vector<at::Tensor> ratios;
};

// `params`, `grads` and `ratios` regrouped into blocks of about kCpuBlockNumel elements. A
// larger contiguous tensor is cut into flat slices, views that write through to it; each
// slice keeps its tensor's ratio. Elementwise ops give the same numbers on the slices.
std::vector<Block> cpu_blocks(at::TensorList params, at::TensorList grads, const std::vector<at::Tensor>& ratios) {
  std::vector<Block> blocks(1);
  int64_t block_numel = 0;
  for (const auto i : c10::irange(params.size())) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    std::vector<at::Tensor> param_pieces{param};
    std::vector<at::Tensor> grad_pieces{grad};
    if (grad.numel() > kCpuBlockNumel && param.is_contiguous() && grad.is_contiguous()) {
      param_pieces = param.view(-1).split(kCpuBlockNumel);
      grad_pieces = grad.view(-1).split(kCpuBlockNumel);
    }
    for (const auto j : c10::irange(grad_pieces.size())) {
      if (block_numel >= kCpuBlockNumel) {
        blocks.emplace_back();
        block_numel = 0;
      }
      blocks.back().params.push_back(param_pieces[j]);
      blocks.back().grads.push_back(grad_pieces[j]);
      blocks.back().ratios.push_back(ratios[i]);
      block_numel += grad_pieces[j].numel();
    }
  }
  return blocks;
}

// g = (g + weight_decay * w) * r for tensors of one device and dtype; returns the ratios.
at::Tensor scale_by_trust_ratio_(
    at::TensorList params,
    at::TensorList grads,
    c10::ScalarType dtype,
    double weight_decay,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip,
    TrustRatio variant) {
  const at::Tensor param_norms = norms_of(params, dtype);
  if (variant == TrustRatio::kDecayed) {
    // The norm of the decayed gradient, which is what gets scaled: decay first, in place.
    if (weight_decay != 0) {
      at::_foreach_add_(grads, params, weight_decay);
    }
    const at::Tensor ratios =
        trust_ratio(param_norms, norms_of(grads, dtype), weight_decay, lr, eps, trust_coef, clip, variant);
    at::_foreach_mul_(grads, ratios.unbind(0));
    return ratios;
  }
  // Kept in the norms' dtype, fp32 for fp16/bf16 gradients: the multiply then runs in fp32 and
  // rounds once, instead of every layer's step being off by the ratio's rounding (0.4% in bf16).
  const at::Tensor ratios =
      trust_ratio(param_norms, norms_of(grads, dtype), weight_decay, lr, eps, trust_coef, clip, variant);
  const std::vector<at::Tensor> unbound = ratios.unbind(0);
  if (weight_decay == 0) {
    at::_foreach_mul_(grads, unbound);
    return ratios;
  }
  // On the CPU, adding the decay and multiplying one cache-sized block at a time reads and
  // writes each gradient from memory once instead of twice. (On a GPU, blocks would multiply
  // the kernel launches.)
  const auto blocks = grads[0].device().is_cpu()
      ? cpu_blocks(params, grads, unbound)
      : std::vector<Block>{{params.vec(), grads.vec(), unbound}};
  for (const auto& block : blocks) {
    at::_foreach_add_(block.grads, block.params, weight_decay);
    at::_foreach_mul_(block.grads, block.ratios);
  }
  return ratios;
}

} // namespace

void lars_scale_gradients_(
    at::TensorList params,
    at::TensorList grads,
    double weight_decay,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip,
    TrustRatio variant,
    const std::optional<at::Tensor>& trust_ratios) {
  TORCH_CHECK_VALUE(
      variant != TrustRatio::kUpdate,
      "lars_scale_gradients_: trust_ratio='update' scales the base's update, not the gradient; "
      "use 'paper' or 'decayed' (lars::LARS steps 'update' itself)");
  const std::vector<DeviceDtypeGroup> groups = group_by_device_and_dtype(params, grads, "lars_scale_gradients_", "grads");
  if (trust_ratios) {
    const at::Tensor& out = *trust_ratios;
    TORCH_CHECK(
        out.scalar_type() == at::kFloat && out.dim() == 1 && out.size(0) == static_cast<int64_t>(params.size()),
        "lars_scale_gradients_: trust_ratios must be a 1-D fp32 tensor of ", params.size(), " ratios, got ",
        out.scalar_type(), out.sizes());
    for (const auto& group : groups) {
      TORCH_CHECK(
          group.device == out.device(), "lars_scale_gradients_: trust_ratios is on ", out.device(),
          " but params[", group.indices[0], "] is on ", group.device,
          "; pass the params of one device, or no trust_ratios");
    }
  }
  for (const auto& group : groups) {
    const at::Tensor ratios = scale_by_trust_ratio_(
        group.params, group.grads, group.dtype, weight_decay, lr, eps, trust_coef, clip, variant);
    if (!trust_ratios) {
      continue;
    }
    if (groups.size() == 1) {
      trust_ratios->copy_(ratios);
    } else { // one copy per ratio on the CPU, one kernel per group on a GPU
      std::vector<at::Tensor> slots;
      for (const int64_t index : group.indices) {
        slots.push_back(trust_ratios->select(0, index));
      }
      at::_foreach_copy_(slots, ratios.to(at::kFloat).unbind(0));
    }
  }
}

std::vector<std::pair<std::vector<at::Tensor>, at::Tensor>> lars_update_(
    at::TensorList params,
    at::TensorList params_before,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip) {
  std::vector<std::pair<std::vector<at::Tensor>, at::Tensor>> ratios;
  for (auto& group : group_by_device_and_dtype(params, params_before, "lars_update_", "params_before")) {
    const std::vector<at::Tensor>& before = group.grads; // paired with params as grads are elsewhere
    const at::Tensor param_norms = norms_of(before, group.dtype);
    // w <- w - w_before, the base's step, in place; then w <- w_before + r * step.
    at::_foreach_sub_(group.params, before);
    const at::Tensor step_norms = norms_of(group.params, group.dtype) / lr;
    const at::Tensor group_ratios =
        trust_ratio(param_norms, step_norms, 0.0, lr, eps, trust_coef, clip, TrustRatio::kUpdate);
    at::_foreach_mul_(group.params, group_ratios.unbind(0));
    at::_foreach_add_(group.params, before);
    ratios.emplace_back(std::move(group.params), group_ratios);
  }
  return ratios;
}

} // namespace lars
