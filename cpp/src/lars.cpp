#include <lars/lars.h>

#include <ATen/ops/scalar_tensor.h>
#include <c10/util/irange.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <utility>

namespace lars {

LARSOptions& LARSOptions::eps(double eps) {
  TORCH_CHECK_VALUE(eps >= 0, "lars::LARSOptions: eps must be non-negative, got ", eps);
  eps_ = eps;
  return *this;
}

LARSOptions& LARSOptions::trust_coef(double trust_coef) {
  TORCH_CHECK_VALUE(
      trust_coef >= 0, "lars::LARSOptions: trust_coef must be non-negative, got ", trust_coef);
  trust_coef_ = trust_coef;
  return *this;
}

LARSOptions& LARSOptions::clip(bool clip) {
  clip_ = clip;
  return *this;
}

LARSOptions& LARSOptions::excluded_param_groups(std::vector<size_t> excluded_param_groups) {
  excluded_param_groups_ = std::move(excluded_param_groups);
  return *this;
}

void LARSOptions::serialize(torch::serialize::OutputArchive& archive) const {
  archive.write("eps", eps_);
  archive.write("trust_coef", trust_coef_);
  archive.write("clip", clip_);
  archive.write(
      "excluded_param_groups",
      std::vector<int64_t>(excluded_param_groups_.begin(), excluded_param_groups_.end()));
}

void LARSOptions::serialize(torch::serialize::InputArchive& archive) {
  c10::IValue value;
  archive.read("eps", value);
  eps(value.toDouble());
  archive.read("trust_coef", value);
  trust_coef(value.toDouble());
  archive.read("clip", value);
  clip(value.toBool());
  archive.read("excluded_param_groups", value);
  std::vector<size_t> excluded;
  for (const int64_t index : value.toIntVector()) {
    TORCH_CHECK_VALUE(index >= 0, "lars::LARSOptions: excluded param group ", index, " is negative");
    excluded.push_back(static_cast<size_t>(index));
  }
  excluded_param_groups(std::move(excluded));
}

namespace {

using torch::optim::Optimizer;
using torch::optim::OptimizerOptions;

// The weight decay of a libtorch optimizer whose weight decay LARS takes over, or nullptr.
double* weight_decay_field(OptimizerOptions& options) {
  if (auto* sgd = dynamic_cast<torch::optim::SGDOptions*>(&options)) {
    return &sgd->weight_decay();
  }
  if (auto* adam = dynamic_cast<torch::optim::AdamOptions*>(&options)) {
    return &adam->weight_decay();
  }
  if (auto* adamw = dynamic_cast<torch::optim::AdamWOptions*>(&options)) {
    return &adamw->weight_decay();
  }
  if (auto* rmsprop = dynamic_cast<torch::optim::RMSpropOptions*>(&options)) {
    return &rmsprop->weight_decay();
  }
  if (auto* adagrad = dynamic_cast<torch::optim::AdagradOptions*>(&options)) {
    return &adagrad->weight_decay();
  }
  return nullptr;
}

// Other optimizers' options can only be read through their serialisation, where libtorch's
// convention names the field "weight_decay".
double serialized_weight_decay(const OptimizerOptions& options) {
  torch::serialize::OutputArchive written;
  options.serialize(written);
  std::stringstream bytes;
  written.save_to(bytes);
  torch::serialize::InputArchive read;
  read.load_from(bytes);
  c10::IValue weight_decay;
  return read.try_read("weight_decay", weight_decay) ? weight_decay.toDouble() : 0.0;
}

// The weight decay LARS folds into the gradients of a param group with these options.
double weight_decay_of(OptimizerOptions& options) {
  if (const double* field = weight_decay_field(options)) {
    return *field;
  }
  const double weight_decay = serialized_weight_decay(options);
  TORCH_CHECK_VALUE(
      weight_decay == 0,
      "lars::LARS: the base optimizer has weight_decay=", weight_decay,
      ", which LARS can take over only from torch::optim::SGD, Adam, AdamW, RMSprop and "
      "Adagrad. Use one of those bases, or set the base's weight decay to 0.");
  return 0.0;
}

// Sets the given weight decays to 0 for its lifetime: the base steps without the decay that
// LARS has already folded into the gradients, and gets it back even if its step throws.
class WeightDecayTakenOver {
 public:
  explicit WeightDecayTakenOver(std::vector<double*> weight_decays)
      : weight_decays_(std::move(weight_decays)) {
    saved_.reserve(weight_decays_.size());
    for (double* weight_decay : weight_decays_) {
      saved_.push_back(*weight_decay);
      *weight_decay = 0;
    }
  }
  ~WeightDecayTakenOver() {
    for (const auto i : c10::irange(weight_decays_.size())) {
      *weight_decays_[i] = saved_[i];
    }
  }
  WeightDecayTakenOver(const WeightDecayTakenOver&) = delete;
  WeightDecayTakenOver& operator=(const WeightDecayTakenOver&) = delete;

 private:
  std::vector<double*> weight_decays_;
  std::vector<double> saved_;
};

const std::shared_ptr<Optimizer>& checked_base(const std::shared_ptr<Optimizer>& base) {
  TORCH_CHECK_VALUE(base != nullptr, "lars::LARS: the base optimizer is null");
  TORCH_CHECK_VALUE(
      dynamic_cast<const LARS*>(base.get()) == nullptr,
      "lars::LARS: the base optimizer is already a lars::LARS; wrap its base instead");
  return base;
}

void check_excluded_param_groups(const LARSOptions& options, size_t num_param_groups) {
  for (const size_t index : options.excluded_param_groups()) {
    TORCH_CHECK_INDEX(
        index < num_param_groups, "lars::LARS: excluded param group ", index,
        " does not exist; the optimizer has ", num_param_groups, " param groups");
  }
}

} // namespace

LARS::LARS(std::shared_ptr<Optimizer> base, LARSOptions options)
    : Optimizer(std::vector<torch::optim::OptimizerParamGroup>{}, checked_base(base)->defaults().clone()),
      base_(std::move(base)),
      options_(std::move(options)) {
  // Copies, not add_param_group, which would merge each group's options with the defaults.
  for (const auto& group : base_->param_groups()) {
    param_groups_.emplace_back(group);
  }
  for (const size_t index : adapted_param_groups()) {
    weight_decay_of(param_groups_[index].options()); // refuses a weight decay LARS cannot take
  }
}

std::vector<size_t> LARS::adapted_param_groups() const {
  check_excluded_param_groups(options_, param_groups_.size());
  const auto& excluded = options_.excluded_param_groups();
  std::vector<size_t> adapted;
  for (const auto index : c10::irange(param_groups_.size())) {
    if (std::find(excluded.begin(), excluded.end(), index) == excluded.end()) {
      adapted.push_back(index);
    }
  }
  return adapted;
}

torch::Tensor LARS::step(LossClosure closure) {
  torch::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  const std::vector<size_t> adapted = adapted_param_groups();
  // Gathered first, so that a sparse gradient stops the step before anything is scaled.
  std::vector<std::vector<at::Tensor>> params(adapted.size());
  std::vector<std::vector<at::Tensor>> grads(adapted.size());
  for (const auto k : c10::irange(adapted.size())) {
    const auto& group_params = param_groups_[adapted[k]].params();
    for (const auto j : c10::irange(group_params.size())) {
      const at::Tensor& grad = group_params[j].grad();
      if (!grad.defined()) {
        continue;
      }
      TORCH_CHECK_VALUE(
          !grad.is_sparse(), "lars::LARS does not support sparse gradients: parameter ", j,
          " of param group ", adapted[k], " has one. Exclude its group "
          "(LARSOptions::excluded_param_groups), or use a dense gradient.");
      params[k].push_back(group_params[j]);
      grads[k].push_back(grad);
    }
  }
  {
    at::NoGradGuard no_grad;
    for (const auto k : c10::irange(adapted.size())) {
      auto& group_options = param_groups_[adapted[k]].options();
      lars_scale_gradients_(
          params[k],
          grads[k],
          weight_decay_of(group_options),
          at::scalar_tensor(group_options.get_lr(), at::kDouble),
          options_.eps(),
          options_.trust_coef(),
          options_.clip());
    }
  }
  copy_param_groups_to_base();
  std::vector<double*> base_weight_decays;
  for (const size_t index : adapted) {
    if (double* weight_decay = weight_decay_field(base_->param_groups()[index].options())) {
      base_weight_decays.push_back(weight_decay);
    }
  }
  {
    WeightDecayTakenOver taken_over(std::move(base_weight_decays));
    base_->step();
  }
  return loss;
}

void LARS::copy_param_groups_to_base() const {
  auto& base_groups = base_->param_groups();
  TORCH_CHECK(
      base_groups.size() <= param_groups_.size(), "lars::LARS: the base optimizer has ",
      base_groups.size(), " param groups but the LARS has ", param_groups_.size(),
      "; add param groups through the LARS (add_param_group), not through its base");
  for (const auto index : c10::irange(param_groups_.size())) {
    if (index == base_groups.size()) {
      base_->add_param_group(torch::optim::OptimizerParamGroup(param_groups_[index].params()));
    }
    base_groups[index].set_options(param_groups_[index].options().clone());
  }
}

void LARS::save(torch::serialize::OutputArchive& archive) const {
  copy_param_groups_to_base();
  base_->save(archive);
  torch::serialize::OutputArchive lars_archive(archive.compilation_unit());
  options_.serialize(lars_archive);
  archive.write("lars", lars_archive);
}

void LARS::load(torch::serialize::InputArchive& archive) {
  LARSOptions options = options_;
  torch::serialize::InputArchive lars_archive;
  if (archive.try_read("lars", lars_archive)) {
    options.serialize(lars_archive);
  }
  check_excluded_param_groups(options, param_groups_.size());
  base_->load(archive);
  options_ = std::move(options);
  param_groups_.clear();
  for (const auto& group : base_->param_groups()) {
    param_groups_.emplace_back(group);
  }
}

} // namespace lars
