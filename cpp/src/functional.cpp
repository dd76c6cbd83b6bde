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
  const at::Tensor ratios = trust_ratio(param_norms, grad_norms, weight_decay, lr, eps, trust_coef, clip);
  if (weight_decay != 0) {
    at::_foreach_add_(grads, params, weight_decay);
  }
  at::_foreach_mul_(grads, ratios.to(grads[0].scalar_type()).unbind(0));
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
