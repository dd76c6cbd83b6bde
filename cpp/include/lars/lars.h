#pragma once

// lars::LARS, Layer-wise Adaptive Rate Scaling around a libtorch optimizer: the C++ twin
// of torchlars.LARS (torchlars/lars.py).

#include <lars/functional.h>

#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

namespace lars {

/// The settings of `LARS`, with TORCH_ARG-style setters that refuse bad values:
///
///     lars::LARSOptions().eps(1e-8).trust_coef(1e-3).clip(false)
struct LARSOptions {
  /// Added to the denominator of the trust ratio; non-negative (default 1e-8).
  double eps() const noexcept { return eps_; }
  LARSOptions& eps(double eps);

  /// The trust coefficient eta; non-negative (default 1e-3).
  double trust_coef() const noexcept { return trust_coef_; }
  LARSOptions& trust_coef(double trust_coef);

  /// Clip the trust ratio at the learning rate, as NVIDIA apex's LARC does (default false).
  bool clip() const noexcept { return clip_; }
  LARSOptions& clip(bool clip);

  /// Indices of the param groups left entirely to the base optimizer: no trust ratio, and
  /// their weight decay is applied by the base as usual (Python's "lars_exclude": True).
  /// Keeps biases and normalization weights out of the adaptation (default: none).
  const std::vector<size_t>& excluded_param_groups() const noexcept { return excluded_param_groups_; }
  LARSOptions& excluded_param_groups(std::vector<size_t> excluded_param_groups);

  void serialize(torch::serialize::OutputArchive& archive) const;
  void serialize(torch::serialize::InputArchive& archive);

 private:
  double eps_ = 1e-8;
  double trust_coef_ = 1e-3;
  bool clip_ = false;
  std::vector<size_t> excluded_param_groups_;
};

/// Layer-wise Adaptive Rate Scaling around a libtorch optimizer (You, Gitman & Ginsburg,
/// 2017, https://arxiv.org/abs/1708.03888). Before every step of the base optimizer, each
/// parameter w with gradient g in a param group with weight decay wd and learning rate lr
/// gets
///
///     r = trust_coef * |w| / (|g| + wd * |w| + eps)   if |w| > 0 and |g| > 0, else 1
///     r = min(r / lr, 1)                               only if clip (LARC)
///     g = (g + wd * w) * r
///
/// and the base steps on the scaled gradient with its weight decay set to 0 (the decay is
/// already in g), restored afterwards even when the base step throws. The scaling runs on
/// the current stream of the parameters' device and never synchronises: a caller's
/// c10::StreamGuard is honoured, and the step can run inside CUDA graph capture.
///
///     auto sgd = std::make_shared<torch::optim::SGD>(
///         model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-4));
///     lars::LARS optimizer(sgd, lars::LARSOptions().trust_coef(1e-3));
///
/// The base can be torch::optim::SGD, Adam, AdamW, RMSprop or Adagrad, whose weight decay
/// LARS takes; any other base is accepted only if its options carry no non-zero
/// "weight_decay" (read through their serialisation, at every step). Param groups listed in
/// LARSOptions::excluded_param_groups are left to the base entirely.
///
/// Around torch::optim::SGD with CPU parameters, LARS and the SGD step are one fused
/// operator (lars/fused.h): the gradients are left as they are, the momentum buffers stay in
/// the SGD's state (so its archive is a plain SGD's), and each parameter's norm is carried
/// from one step to the next. A carried norm is used only if the parameter is the same
/// tensor, on the same memory, with the version counter the step left; anything else (an
/// in-place edit, a replaced parameter or `.set_data`, `load`) makes the step recompute it,
/// to the same bits. Writes through `.data()`, which has a version counter of its own, are
/// not seen.
///
/// LARS holds its own copy of the base's param groups: configure the optimizer through the
/// LARS (`param_groups()`, `add_param_group`, LR schedulers); before every step and save,
/// the LARS's param group options are copied into the base. The base's per-parameter state
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

  const std::shared_ptr<torch::optim::Optimizer>& base() const noexcept { return base_; }

 private:
  // The base's param groups follow the LARS's; `save` needs this too, hence const.
  void copy_param_groups_to_base() const;
  std::vector<size_t> adapted_param_groups() const;

  // The fused LARS + SGD step of one param group's `params` (with their `grads`).
  void fused_sgd_step(size_t group_index, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads);
  // The norms of `params` that the last steps carried, or an undefined tensor if any of them
  // may be stale (then the step recomputes them all).
  at::Tensor carried_param_norms(const std::vector<at::Tensor>& params) const;

  // A parameter's norm as the last fused step left it, and what identifies the parameter
  // then. The weak reference keeps another tensor from taking the parameter's address.
  struct CarriedNorm {
    c10::weak_intrusive_ptr<c10::TensorImpl> param;
    const void* data;
    int64_t version;
    float norm;
  };

  std::shared_ptr<torch::optim::Optimizer> base_;
  LARSOptions options_;
  std::unordered_map<const c10::TensorImpl*, CarriedNorm> carried_norms_;
};

} // namespace lars
