#pragma once

// lars::LARSSGD, LARS with momentum SGD built from params as every libtorch optimizer: the
// C++ twin of torchlars.LARSSGD (torchlars/lars_sgd.py).

#include <lars/detail/fused_sgd_step.h>
#include <lars/functional.h>

#include <c10/util/string_view.h>
#include <torch/arg.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <utility>
#include <vector>

namespace lars {

/// The settings of a `LARSSGD` param group, set with TORCH_ARG setters as libtorch's
/// SGDOptions, and checked when a LARSSGD is built and at every step:
///
///     lars::LARSSGDOptions(0.1).momentum(0.9).weight_decay(1e-4).trust_coef(1e-3)
struct LARSSGDOptions : public torch::optim::OptimizerCloneableOptions<LARSSGDOptions> {
  LARSSGDOptions(double lr); // NOLINT: implicit, as torch::optim::SGDOptions (serialize.h builds one from 0)
  /// Learning rate, momentum, dampening, weight decay and Nesterov momentum: as
  /// torch::optim::SGDOptions (lr, momentum and weight_decay non-negative; nesterov needs
  /// momentum > 0 and dampening == 0).
  TORCH_ARG(double, lr);
  TORCH_ARG(double, momentum) = 0;
  TORCH_ARG(double, dampening) = 0;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(bool, nesterov) = false;
  /// Step to maximise the objective: the gradients are negated first (torch.optim.SGD's maximize).
  TORCH_ARG(bool, maximize) = false;
  /// Added to the denominator of the trust ratio; non-negative.
  TORCH_ARG(double, eps) = 1e-8;
  /// The trust coefficient eta; non-negative.
  TORCH_ARG(double, trust_coef) = 1e-3;
  /// Clip the trust ratio at the learning rate, as NVIDIA apex's LARC does.
  TORCH_ARG(bool, clip) = false;
  /// TrustRatio::kPaper or kDecayed (functional.h), or by Python's names,
  /// `.trust_ratio("paper" | "decayed")`. kUpdate (LAMB) scales a base optimizer's step, so it
  /// is refused here: use lars::LARS with TrustRatio::kUpdate.
  TORCH_ARG(TrustRatio, trust_ratio) = TrustRatio::kPaper;
  /// The group steps as plain torch::optim::SGD: no trust ratio, its weight decay applied as
  /// usual (Python's "lars_exclude": True; e.g. for biases and normalization weights).
  TORCH_ARG(bool, lars_exclude) = false;

 public:
  /// The variant by its Python name; an unknown name is refused here, "update" when a
  /// LARSSGD is built or steps.
  LARSSGDOptions& trust_ratio(c10::string_view name) {
    return trust_ratio(parse_trust_ratio(name, "lars::LARSSGDOptions"));
  }

  /// Writes torch::optim::SGDOptions's fields under its names, and the LARS ones besides, so
  /// that a plain SGD reads its options from a LARSSGD archive. Reading sets the fields the
  /// archive has and keeps the others (a plain SGD archive has no LARS fields).
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const LARSSGDOptions& lhs, const LARSSGDOptions& rhs);
  double get_lr() const override;
  void set_lr(const double lr) override;
};

/// LARS (You, Gitman & Ginsburg, 2017, https://arxiv.org/abs/1708.03888) with momentum SGD,
/// in one optimizer built from params: the numbers of
/// `lars::LARS(std::make_shared<torch::optim::SGD>(...))` (functional.h states the ratio,
/// fused.h the step), with every option in LARSSGDOptions, per param group.
///
///     lars::LARSSGD optimizer(
///         model->parameters(),
///         lars::LARSSGDOptions(0.1).momentum(0.9).weight_decay(1e-4).trust_coef(1e-3));
///
/// CPU parameters of fp32, fp64, bf16 and fp16 step with liblars's fused LARS-momentum
/// operator (lars/fused.h), the gradients left as they are; other parameters (e.g. CUDA ones)
/// get the same ratios from lars_scale_gradients_ on a copy of their gradients, then an SGD
/// step. Groups with `lars_exclude` step as torch::optim::SGD steps. Sparse gradients are
/// refused, before anything is written.
///
/// The per-parameter state is torch::optim::SGDParamState (the momentum buffer), and the
/// archive is a plain SGD's layout with the LARS options added to each group's options: a
/// torch::optim::SGD over the same parameters loads a LARSSGD archive, and a LARSSGD loads a
/// plain SGD's (keeping its own LARS options, lars_exclude included).
///
/// Like libtorch's optimizers, a LARSSGD must not be used from two threads at once.
class LARSSGD : public torch::optim::Optimizer {
 public:
  explicit LARSSGD(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, LARSSGDOptions defaults);
  explicit LARSSGD(std::vector<at::Tensor> params, LARSSGDOptions defaults)
      : LARSSGD({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

  /// Adds a param group: with its own LARSSGDOptions (kept as they are, checked) or none
  /// (then the defaults). Hides libtorch's, which would replace the group's options by the
  /// defaults: call it on the LARSSGD, not through a torch::optim::Optimizer reference.
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
