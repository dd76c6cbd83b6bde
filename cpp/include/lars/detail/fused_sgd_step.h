#pragma once

// What liblars's optimizers share: the fused LARS + momentum-SGD step of a param group
// (lars/fused.h) of lars::LARS (around torch::optim::SGD) and lars::LARSSGD, and the trust
// ratios of the last step (the telemetry of `trust_ratios()`) of all three. Not API: an
// implementation detail, in a header because the optimizers hold these as members.

#include <lars/functional.h>

#include <ATen/core/Tensor.h>
#include <torch/optim/optimizer.h>

#include <utility>
#include <vector>

namespace lars {
struct LARSSGDOptions; // lars_sgd.h
} // namespace lars

namespace lars::detail {

/// Refuses a negative or NaN eps or trust_coef, naming the option and `who`.
void check_lars_options(double eps, double trust_coef, const char* who);

/// The trust ratios a step used, as the steps produce them: per call of a kernel, its params
/// and one 1-D tensor of their ratios (fp32). Kept without a sync; read by `trust_ratios()`.
class TrustRatioRecord {
 public:
  void clear() noexcept { buckets_.clear(); }
  void add(std::vector<at::Tensor> params, at::Tensor ratios) {
    buckets_.emplace_back(std::move(params), std::move(ratios));
  }
  /// (parameter, its ratio as a 0-dim fp32 tensor), in the order the step took them.
  std::vector<std::pair<at::Tensor, at::Tensor>> ratios() const;

 private:
  std::vector<std::pair<std::vector<at::Tensor>, at::Tensor>> buckets_;
};

/// Whether `params` (CPU, dense, of a dtype the kernels step) can take a fused step.
bool fused_step_supports(const std::vector<at::Tensor>& params);

/// The fused LARS + SGD step (fused.h's `lars_sgd_`) of `params` (with their `grads`) of one
/// param group with these `options`, one operator call per dtype and per first step:
/// parameters without a momentum buffer in `state` get one, a torch::optim::SGDParamState set
/// by the step as torch::optim::SGD's first step sets it. Records the ratios in `record`.
void fused_sgd_step(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    const LARSSGDOptions& options,
    ska::flat_hash_map<void*, std::unique_ptr<torch::optim::OptimizerParamState>>& state,
    TrustRatioRecord& record);

} // namespace lars::detail
