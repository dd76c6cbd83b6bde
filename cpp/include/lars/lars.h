#pragma once

// lars::LARS, Layer-wise Adaptive Rate Scaling around a libtorch optimizer: the C++ twin
// of torchlars.LARS (torchlars/lars.py).

#include <lars/detail/fused_sgd_step.h>
#include <lars/functional.h>

#include <torch/arg.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace lars {

/// The settings of `LARS`, set with TORCH_ARG setters and checked when a LARS is built (and
/// at every step, as they can be changed through `LARS::options()`):
///
///     lars::LARSOptions().eps(1e-8).trust_coef(1e-3).clip(false).trust_ratio("decayed")
struct LARSOptions {
  /// Added to the denominator of the trust ratio; non-negative.
  TORCH_ARG(double, eps) = 1e-8;
  /// The trust coefficient eta; non-negative.
  TORCH_ARG(double, trust_coef) = 1e-3;
  /// Clip the trust ratio at the learning rate, as NVIDIA apex's LARC does.
  TORCH_ARG(bool, clip) = false;
  /// What the trust ratio is computed from (functional.h): TrustRatio::kPaper, kDecayed or
  /// kUpdate, or by Python's names, `.trust_ratio("paper" | "decayed" | "update")`.
  TORCH_ARG(TrustRatio, trust_ratio) = TrustRatio::kPaper;
  /// Indices of the param groups left entirely to the base optimizer: no trust ratio, and
  /// their weight decay is applied by the base as usual (Python's "lars_exclude": True).
  /// Keeps biases and normalization weights out of the adaptation (default: none).
  TORCH_ARG(std::vector<size_t>, excluded_param_groups);

 public:
  /// The variant by its Python name; an unknown name is refused here.
  LARSOptions& trust_ratio(c10::string_view name) {
    return trust_ratio(parse_trust_ratio(name, "lars::LARSOptions"));
  }

  void serialize(torch::serialize::OutputArchive& archive) const;
  void serialize(torch::serialize::InputArchive& archive);
};

/// Layer-wise Adaptive Rate Scaling around a libtorch optimizer (You, Gitman & Ginsburg,
/// 2017, https://arxiv.org/abs/1708.03888). Each parameter w with gradient g in a param group
/// with weight decay wd and learning rate lr gets the trust ratio r of `lars::trust_ratio`
/// (functional.h states the formulas), by LARSOptions::trust_ratio:
///
///     paper, decayed: g = (g + wd * w) * r, then the base steps on g
///     update:         the base steps (w_before -> w_after, its own weight decay included),
///                     then w = w_before + r * (w_after - w_before)   (LAMB, You et al., 2019)
///
/// For "paper" and "decayed" the base steps on the scaled gradient with its weight decay set
/// to 0 (the decay is already in g), restored afterwards even when the base step throws;
/// "update" takes nothing from the base. Nothing synchronises, and every kernel runs on the current
/// stream of the parameters' device: a caller's c10::StreamGuard is honoured, and the step
/// can run inside CUDA graph capture. `trust_ratios()` gives the ratios of the last step.
///
///     auto sgd = std::make_shared<torch::optim::SGD>(
///         model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-4));
///     lars::LARS optimizer(sgd, lars::LARSOptions().trust_coef(1e-3));
///
/// For "paper" and "decayed" the base can be torch::optim::SGD, Adam, AdamW, RMSprop or
/// Adagrad, whose weight decay LARS takes; any other base is accepted only if its options
/// carry no non-zero "weight_decay" (read through their serialisation, at every step). With
/// "update" any base is accepted. Param groups listed in
/// LARSOptions::excluded_param_groups are left to the base entirely.
///
/// "paper" and "decayed" around torch::optim::SGD with CPU parameters step with one fused
/// operator (lars/fused.h): the gradients are left as they are, the momentum buffers stay in
/// the SGD's state (so its archive is a plain SGD's).
///
/// LARS holds its own copy of the base's param groups: configure the optimizer through the
/// LARS (`param_groups()`, `add_param_group`, LR schedulers); before every step and save,
/// the LARS's param group options are copied into the base. (libtorch's `param_groups()` is
/// not virtual: schedulers and users reach the LARS's own vector, and the base steps on its
/// own, so the two are kept equal rather than shared.) The base's per-parameter state
/// stays in `base()->state()`.
///
/// Like libtorch's optimizers, a LARS must not be used from two threads at once (its step
/// writes the gradients, the base's state and param groups); torchlars.cpp.LARS, its Python
/// face, steps behind a lock of its own.
class LARS : public torch::optim::Optimizer {
 public:
  explicit LARS(std::shared_ptr<torch::optim::Optimizer> base, LARSOptions options = {});

  /// Evaluates `closure` first (with grad enabled) if given, scales the gradients, steps
  /// the base optimizer, and returns the closure's loss (undefined without a closure).
  torch::Tensor step(LossClosure closure = nullptr) override;

  /// The base's archive, plus the LARS options under "lars": a plain base optimizer of the
  /// same type loads it, and LARS loads a plain base's archive (keeping its options).
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  const LARSOptions& options() const noexcept { return options_; }
  LARSOptions& options() noexcept { return options_; }

  /// The trust ratio of every adapted parameter that had a gradient in the last step: pairs
  /// (parameter, 0-dim fp32 tensor on its device), the very values the step used, kept
  /// without a sync or an extra pass (reading them is the caller's sync). Empty before the
  /// first step. Python's `trust_ratios()` dict, as pairs.
  std::vector<std::pair<at::Tensor, at::Tensor>> trust_ratios() const { return trust_ratios_.ratios(); }

  const std::shared_ptr<torch::optim::Optimizer>& base() const noexcept { return base_; }

 private:
  // The base's param groups follow the LARS's; `save` needs this too, hence const.
  void copy_param_groups_to_base() const;
  std::vector<size_t> adapted_param_groups() const;

  // The "update" step: the base steps, then each adapted parameter's update is scaled.
  void update_step(const std::vector<size_t>& adapted, const std::vector<std::vector<at::Tensor>>& params);

  std::shared_ptr<torch::optim::Optimizer> base_;
  LARSOptions options_;
  detail::TrustRatioRecord trust_ratios_;
};

} // namespace lars
