#include <lars/detail/fused_sgd_step.h>

#include <lars/fused.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/irange.h>
#include <torch/optim/sgd.h>

#include <algorithm>

namespace lars::detail {

std::vector<std::pair<at::Tensor, at::Tensor>> TrustRatioRecord::ratios() const {
  std::vector<std::pair<at::Tensor, at::Tensor>> ratios;
  for (const auto& [params, bucket_ratios] : buckets_) {
    const std::vector<at::Tensor> unbound = bucket_ratios.unbind(0); // views: no copy, no sync
    for (const auto j : c10::irange(params.size())) {
      ratios.emplace_back(params[j], unbound[j]);
    }
  }
  return ratios;
}

bool fused_sgd_supports(const std::vector<at::Tensor>& params) {
  return std::all_of(params.begin(), params.end(), [](const at::Tensor& param) {
    return param.device().is_cpu() && param.layout() == at::kStrided && fused_dtype(param.scalar_type());
  });
}

void fused_sgd_step(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    const FusedSGDSettings& settings,
    ska::flat_hash_map<void*, std::unique_ptr<torch::optim::OptimizerParamState>>& state,
    TrustRatioRecord& record) {
  struct Call {
    c10::ScalarType dtype;
    bool is_first_step;
    std::vector<at::Tensor> params, grads, momentum_buffers;
  };
  std::vector<Call> calls;
  for (const auto j : c10::irange(params.size())) {
    const at::Tensor& param = params[j];
    bool is_first_step = false;
    at::Tensor momentum_buffer;
    if (settings.momentum != 0) {
      auto& param_state = state[param.unsafeGetTensorImpl()];
      if (!param_state) {
        auto sgd_state = std::make_unique<torch::optim::SGDParamState>();
        sgd_state->momentum_buffer(at::empty_like(param));
        param_state = std::move(sgd_state);
        is_first_step = true;
      }
      momentum_buffer = static_cast<torch::optim::SGDParamState&>(*param_state).momentum_buffer();
    }
    auto call = std::find_if(calls.begin(), calls.end(), [&](const Call& c) {
      return c.dtype == param.scalar_type() && c.is_first_step == is_first_step;
    });
    if (call == calls.end()) {
      call = calls.insert(calls.end(), {param.scalar_type(), is_first_step, {}, {}, {}});
    }
    call->params.push_back(param);
    call->grads.push_back(grads[j]);
    if (momentum_buffer.defined()) {
      call->momentum_buffers.push_back(momentum_buffer);
    }
  }
  const at::Tensor lr = at::scalar_tensor(settings.lr, at::kDouble);
  for (auto& call : calls) {
    at::Tensor ratios = at::empty({static_cast<int64_t>(call.params.size())}, at::kFloat);
    lars_sgd_(
        call.params, call.grads, call.momentum_buffers, lr, settings.weight_decay, settings.momentum,
        settings.dampening, settings.nesterov, settings.maximize, call.is_first_step, settings.eps,
        settings.trust_coef, settings.clip, std::nullopt, std::nullopt, settings.trust_ratio, ratios);
    record.add(std::move(call.params), std::move(ratios));
  }
}

} // namespace lars::detail
