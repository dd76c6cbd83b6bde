#include <lars/detail/fused_sgd_step.h>

#include <lars/fused.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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

bool fused_step_supports(const std::vector<at::Tensor>& params) {
  return std::all_of(params.begin(), params.end(), [](const at::Tensor& param) {
    return param.device().is_cpu() && param.layout() == at::kStrided && fused_dtype(param.scalar_type());
  });
}

void fused_sgd_step(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    const LARSSGDOptions& options,
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
    if (options.momentum() != 0) {
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
  for (auto& call : calls) {
    // fp32 telemetry whatever the dtype (the step itself uses fp64 ratios for fp64 params).
    at::Tensor ratios = at::empty({static_cast<int64_t>(call.params.size())}, at::kFloat);
    lars_sgd_(call.params, call.grads, call.momentum_buffers, options, call.is_first_step, std::nullopt, std::nullopt,
              ratios);
    record.add(std::move(call.params), std::move(ratios));
  }
}

} // namespace lars::detail
