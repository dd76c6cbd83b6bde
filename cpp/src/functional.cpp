#include <lars/functional.h>

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

namespace lars {

at::Tensor trust_ratio(
    const at::Tensor& param_norms,
    const at::Tensor& grad_norms,
    double weight_decay,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip) {
  at::Tensor ratio = trust_coef * param_norms / (grad_norms + weight_decay * param_norms + eps);
  ratio = at::where((param_norms > 0) & (grad_norms > 0), ratio, at::ones_like(ratio));
  if (clip) {
    ratio = at::clamp_max(ratio / lr, 1.0);
  }
  return ratio;
}

double trust_ratio(
    double param_norm,
    double grad_norm,
    double weight_decay,
    double lr,
    double eps,
    double trust_coef,
    bool clip) {
  double ratio = param_norm > 0 && grad_norm > 0
      ? trust_coef * param_norm / (grad_norm + weight_decay * param_norm + eps)
      : 1.0;
  if (clip) {
    ratio = std::min(ratio / lr, 1.0);
  }
  return ratio;
}

namespace {

// The tensors of one device and dtype, as multi-tensor kernels want them.
struct DeviceDtypeGroup {
  c10::Device device;
  c10::ScalarType dtype;
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> grads;
};

std::vector<DeviceDtypeGroup> group_by_device_and_dtype(at::TensorList params, at::TensorList grads) {
  TORCH_CHECK(
      params.size() == grads.size(),
      "lars_scale_gradients_: got ", params.size(), " params but ", grads.size(), " grads");
  std::vector<DeviceDtypeGroup> groups;
  for (const auto i : c10::irange(params.size())) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    TORCH_CHECK(
        grad.layout() == at::kStrided,
        "lars_scale_gradients_: grads[", i, "] is not dense (layout ", grad.layout(),
        "); LARS needs dense gradients");
    TORCH_CHECK(
        grad.device() == param.device() && grad.scalar_type() == param.scalar_type() &&
            grad.sizes() == param.sizes(),
        "lars_scale_gradients_: grads[", i, "] (", grad.scalar_type(), grad.sizes(), " on ",
        grad.device(), ") does not match params[", i, "] (", param.scalar_type(), param.sizes(),
        " on ", param.device(), ")");
    auto group = std::find_if(groups.begin(), groups.end(), [&](const DeviceDtypeGroup& g) {
      return g.device == param.device() && g.dtype == param.scalar_type();
    });
    if (group == groups.end()) {
      group = groups.insert(groups.end(), {param.device(), param.scalar_type(), {}, {}});
    }
    group->params.push_back(param);
    group->grads.push_back(grad);
  }
  return groups;
}

// The L2 norms of `params` and of `grads` (all of `dtype`), each stacked into one tensor.
std::pair<at::Tensor, at::Tensor> param_and_grad_norms(
    at::TensorList params, at::TensorList grads, c10::ScalarType dtype) {
  // Half-precision norms are accumulated (and returned) in fp32.
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  const auto norm_dtype = half ? std::optional<c10::ScalarType>(at::kFloat) : std::nullopt;
  at::Tensor param_norms = at::stack(at::_foreach_norm(params, 2, norm_dtype));
  at::Tensor grad_norms = at::stack(at::_foreach_norm(grads, 2, norm_dtype));
  return {std::move(param_norms), std::move(grad_norms)};
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

// g = (g + weight_decay * w) * r for tensors of one device and dtype, given their norms.
void scale_by_trust_ratio_(
    at::TensorList params,
    at::TensorList grads,
    const at::Tensor& param_norms,
    const at::Tensor& grad_norms,
    double weight_decay,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip) {
  // Kept in the norms' dtype, fp32 for fp16/bf16 gradients: the multiply then runs in fp32 and
  // rounds once, instead of every layer's step being off by the ratio's rounding (0.4% in bf16).
  const std::vector<at::Tensor> ratios =
      trust_ratio(param_norms, grad_norms, weight_decay, lr, eps, trust_coef, clip).unbind(0);
  if (weight_decay == 0) {
    at::_foreach_mul_(grads, ratios);
    return;
  }
  // On the CPU, adding the decay and multiplying one cache-sized block at a time reads and
  // writes each gradient from memory once instead of twice. (On a GPU, blocks would multiply
  // the kernel launches.)
  const auto blocks = grads[0].device().is_cpu()
      ? cpu_blocks(params, grads, ratios)
      : std::vector<Block>{{params.vec(), grads.vec(), ratios}};
  for (const auto& block : blocks) {
    at::_foreach_add_(block.grads, block.params, weight_decay);
    at::_foreach_mul_(block.grads, block.ratios);
  }
}

} // namespace

void lars_scale_gradients_(
    at::TensorList params,
    at::TensorList grads,
    double weight_decay,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip) {
  for (const auto& group : group_by_device_and_dtype(params, grads)) {
    const auto [param_norms, grad_norms] = param_and_grad_norms(group.params, group.grads, group.dtype);
    scale_by_trust_ratio_(
        group.params, group.grads, param_norms, grad_norms, weight_decay, lr, eps, trust_coef, clip);
  }
}

} // namespace lars
