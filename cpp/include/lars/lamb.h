#pragma once

// lars::LAMB, the LAMB optimizer built from params as every libtorch optimizer: the C++ twin
// of torchlars.LAMB (torchlars/lamb.py).

#include <lars/detail/fused_sgd_step.h>

#include <torch/arg.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace lars {

/// The settings of a `LAMB` param group, set with TORCH_ARG setters as libtorch's
/// AdamWOptions (with timm's Lamb defaults), and checked when a LAMB is built and at every step:
///
///     lars::LAMBOptions(1e-3).betas(std::make_tuple(0.9, 0.999)).eps(1e-6).weight_decay(0.01).trust_clip(true)
struct LAMBOptions : public torch::optim::OptimizerCloneableOptions<LAMBOptions> {
  LAMBOptions(double lr = 1e-3); // NOLINT: implicit, as torch::optim::AdamWOptions
  /// Learning rate, Adam's betas and eps, and the weight decay added to the update (decoupled
  /// from the moments, as AdamW's): as torch::optim::AdamWOptions, every one non-negative,
  /// betas in [0, 1).
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-6;
  TORCH_ARG(double, weight_decay) = 0.01;
  /// The trust coefficient and the eps of the trust ratio's denominator (timm, apex: 1 and 0).
  TORCH_ARG(double, trust_coef) = 1.0;
  TORCH_ARG(double, trust_eps) = 0.0;
  /// Clip the trust ratio at 1: LAMBC (timm's trust_clip, apex's LAMBC).
  TORCH_ARG(bool, trust_clip) = false;
  /// Adapt the group even when its weight decay is 0 (timm's always_adapt; apex's
  /// use_nvlamb). Off by default: no-decay groups (biases, norms) step as plain AdamW.
  TORCH_ARG(bool, always_adapt) = false;
  /// Divide the moments by 1 - beta^t, as Adam does (timm's and apex's bias_correction).
  TORCH_ARG(bool, bias_correction) = true;
  /// When set, every gradient is first divided by max(global norm / max_grad_norm, 1), the
  /// global norm over all the optimizer's gradients (timm's max_grad_norm). Read from the
  /// optimizer's defaults, as timm reads it.
  TORCH_ARG(std::optional<double>, max_grad_norm) = std::nullopt;
  /// Step to maximise the objective: the gradients are negated first.
  TORCH_ARG(bool, maximize) = false;
  /// The group is never adapted (Python's "lars_exclude": True): it steps as plain AdamW.
  TORCH_ARG(bool, lars_exclude) = false;

 public:
  /// Writes torch::optim::AdamWOptions's fields under its names (amsgrad false), and LAMB's
  /// besides, so that a plain AdamW reads its options from a LAMB archive. Reading sets the
  /// fields the archive has and keeps the others.
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const LAMBOptions& lhs, const LAMBOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

/// LAMB (You et al., 2019, https://arxiv.org/abs/1904.00962), as timm's Lamb and apex's
/// FusedLAMB compute it: an AdamW update whose size is set per parameter by the trust ratio.
/// lars/fused.h's `lamb_` states the step; the ratio is lars::trust_ratio's "update" ratio
/// (functional.h).
///
///     lars::LAMB optimizer(model->parameters(), lars::LAMBOptions(1e-3).weight_decay(0.01));
///
/// CPU parameters of fp32, fp64, bf16 and fp16 step with liblars's fused LAMB operator; other
/// parameters (e.g. CUDA ones) with the same maths in ATen ops. A group is adapted when its
/// weight decay is non-zero or `always_adapt` is set, and never with `lars_exclude`; else it
/// steps as AdamW (r = 1). The state of each parameter is torch::optim::AdamW's
/// (AdamWParamState: step, exp_avg, exp_avg_sq), and the archive is one that a plain
/// torch::optim::AdamW loads. Sparse gradients are refused, before anything is written. As the
/// fused operator does (lars/fused.h), an adapted fp32 or fp64 CPU step leaves each parameter's
/// update u in its grad(); zero_grad() before the next backward, as usual.
class LAMB : public torch::optim::Optimizer {
 public:
  explicit LAMB(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, LAMBOptions defaults = {});
  explicit LAMB(std::vector<at::Tensor> params, LAMBOptions defaults = {})
      : LAMB({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

  /// Adds a param group: with its own LAMBOptions (kept as they are, checked) or none (then
  /// the defaults). Hides libtorch's, as LARSSGD::add_param_group does.
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  /// Evaluates `closure` first (with grad enabled) if given, steps every param group, and
  /// returns the closure's loss (undefined without a closure).
  torch::Tensor step(LossClosure closure = nullptr) override;

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  /// The trust ratio of every adapted parameter that had a gradient in the last step: pairs
  /// (parameter, 0-dim fp32 tensor), as lars::LARS::trust_ratios(). Empty before the first step.
  std::vector<std::pair<at::Tensor, at::Tensor>> trust_ratios() const { return trust_ratios_.ratios(); }

 private:
  detail::TrustRatioRecord trust_ratios_;
};

} // namespace lars
