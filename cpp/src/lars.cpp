#include <lars/lars.h>

#include <lars/fused.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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
#include <iterator>
#include <sstream>
#include <typeinfo>
#include <utility>

namespace lars {

void LARSOptions::serialize(torch::serialize::OutputArchive& archive) const {
  archive.write("eps", eps());
  archive.write("trust_coef", trust_coef());
  archive.write("clip", clip());
  archive.write("trust_ratio", std::string(trust_ratio_name(trust_ratio())));
  archive.write(
      "excluded_param_groups",
      std::vector<int64_t>(excluded_param_groups().begin(), excluded_param_groups().end()));
}

void LARSOptions::serialize(torch::serialize::InputArchive& archive) {
  c10::IValue value;
  archive.read("eps", value);
  eps(value.toDouble());
  archive.read("trust_coef", value);
  trust_coef(value.toDouble());
  archive.read("clip", value);
  clip(value.toBool());
  // Archives of torchlars before the variants have none: theirs was "paper".
  trust_ratio(archive.try_read("trust_ratio", value) ? c10::string_view(value.toStringRef()) : "paper");
  archive.read("excluded_param_groups", value);
  std::vector<size_t> excluded;
  for (const int64_t index : value.toIntVector()) {
    TORCH_CHECK_VALUE(index >= 0, "lars::LARSOptions: excluded param group ", index, " is negative");
    excluded.push_back(static_cast<size_t>(index));
  }
  excluded_param_groups(std::move(excluded));
}

void detail::check_lars_options(double eps, double trust_coef, const char* who) {
  // Written so that NaN is refused too.
  TORCH_CHECK_VALUE(eps >= 0, who, ": eps must be non-negative, got ", eps);
  TORCH_CHECK_VALUE(trust_coef >= 0, who, ": trust_coef must be non-negative, got ", trust_coef);
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

// Whether LARS and the base step as one fused operator (lars/fused.h): "paper" or "decayed"
// around torch::optim::SGD itself (a subclass may step otherwise), for parameters the kernel
// steps. Other tensors (CUDA ones) take lars_scale_gradients_, then the base's step: the
// operator has a CPU kernel only.
bool steps_fused(
    const Optimizer& base, TrustRatio variant, const std::vector<std::vector<at::Tensor>>& params) {
  return typeid(base) == typeid(torch::optim::SGD) && variant != TrustRatio::kUpdate &&
      std::all_of(params.begin(), params.end(), detail::fused_step_supports);
}

// Undefines the gradients of the given parameters for its lifetime, so that the base's step
// of the excluded param groups leaves them alone; they come back even if that step throws.
class GradientsHidden {
 public:
  explicit GradientsHidden(const std::vector<std::vector<at::Tensor>>& params) {
    for (const auto& group : params) {
      for (const auto& param : group) {
        params_.push_back(param);
        grads_.push_back(param.grad());
        params_.back().mutable_grad().reset();
      }
    }
  }
  ~GradientsHidden() {
    for (const auto i : c10::irange(params_.size())) {
      params_[i].mutable_grad() = grads_[i];
    }
  }
  GradientsHidden(const GradientsHidden&) = delete;
  GradientsHidden& operator=(const GradientsHidden&) = delete;

 private:
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> grads_;
};

const std::shared_ptr<Optimizer>& checked_base(const std::shared_ptr<Optimizer>& base) {
  TORCH_CHECK_VALUE(base != nullptr, "lars::LARS: the base optimizer is null");
  TORCH_CHECK_VALUE(
      dynamic_cast<const LARS*>(base.get()) == nullptr,
      "lars::LARS: the base optimizer is already a lars::LARS; wrap its base instead");
  return base;
}

void check_options(const LARSOptions& options, size_t num_param_groups) {
  detail::check_lars_options(options.eps(), options.trust_coef(), "lars::LARS");
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
  if (options_.trust_ratio() != TrustRatio::kUpdate) { // "update" takes nothing from the base
    for (const size_t index : adapted_param_groups()) {
      weight_decay_of(param_groups_[index].options()); // refuses a weight decay LARS cannot take
    }
  }
}

std::vector<size_t> LARS::adapted_param_groups() const {
  check_options(options_, param_groups_.size());
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
      const at::Tensor& param = group_params[j];
      TORCH_CHECK_VALUE(
          grad.sizes() == param.sizes() && grad.scalar_type() == param.scalar_type() &&
              grad.device() == param.device(),
          "lars::LARS: the gradient of parameter ", j, " of param group ", adapted[k], " (",
          grad.scalar_type(), grad.sizes(), " on ", grad.device(), ") does not match the parameter (",
          param.scalar_type(), param.sizes(), " on ", param.device(), ")");
      params[k].push_back(param);
      grads[k].push_back(grad);
    }
  }
  const TrustRatio variant = options_.trust_ratio();
  if (variant == TrustRatio::kUpdate) {
    copy_param_groups_to_base();
    update_step(adapted, params);
    return loss;
  }
  // Every refusal comes before the first gradient is touched: a weight decay LARS cannot
  // take over, and param groups added to the base behind the LARS's back.
  std::vector<double> weight_decays;
  weight_decays.reserve(adapted.size());
  for (const size_t index : adapted) {
    weight_decays.push_back(weight_decay_of(param_groups_[index].options()));
  }
  copy_param_groups_to_base();
  trust_ratios_.clear();
  if (steps_fused(*base_, variant, params)) {
    {
      at::NoGradGuard no_grad;
      for (const auto k : c10::irange(adapted.size())) {
        const auto& sgd = static_cast<const torch::optim::SGDOptions&>(param_groups_[adapted[k]].options());
        const LARSSGDOptions options = LARSSGDOptions(sgd.lr())
                                           .momentum(sgd.momentum())
                                           .dampening(sgd.dampening())
                                           .weight_decay(sgd.weight_decay())
                                           .nesterov(sgd.nesterov())
                                           .eps(options_.eps())
                                           .trust_coef(options_.trust_coef())
                                           .clip(options_.clip())
                                           .trust_ratio(variant);
        detail::fused_sgd_step(params[k], grads[k], options, base_->state(), trust_ratios_);
      }
    }
    if (adapted.size() < param_groups_.size()) {
      GradientsHidden adapted_grads_hidden(params); // the base steps the excluded groups only
      base_->step();
    }
    return loss;
  }
  {
    at::NoGradGuard no_grad;
    for (const auto k : c10::irange(adapted.size())) {
      if (params[k].empty()) {
        continue;
      }
      at::Tensor ratios = at::empty({static_cast<int64_t>(params[k].size())}, params[k][0].options().dtype(at::kFloat));
      lars_scale_gradients_(
          params[k],
          grads[k],
          weight_decays[k],
          at::scalar_tensor(param_groups_[adapted[k]].options().get_lr(), at::kDouble),
          options_.eps(),
          options_.trust_coef(),
          options_.clip(),
          variant,
          ratios);
      trust_ratios_.add(params[k], std::move(ratios));
    }
  }
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

void LARS::update_step(const std::vector<size_t>& adapted, const std::vector<std::vector<at::Tensor>>& params) {
  trust_ratios_.clear();
  std::vector<std::vector<at::Tensor>> before(adapted.size()); // the parameters before the base's step
  {
    at::NoGradGuard no_grad;
    for (const auto k : c10::irange(adapted.size())) {
      for (const at::Tensor& param : params[k]) {
        before[k].push_back(at::empty_like(param));
      }
      at::_foreach_copy_(before[k], params[k]);
    }
  }
  base_->step();
  at::NoGradGuard no_grad;
  for (const auto k : c10::irange(adapted.size())) {
    const at::Tensor lr = at::scalar_tensor(param_groups_[adapted[k]].options().get_lr(), at::kDouble);
    for (auto& [bucket_params, ratios] :
         lars_update_(params[k], before[k], lr, options_.eps(), options_.trust_coef(), options_.clip())) {
      trust_ratios_.add(std::move(bucket_params), ratios.to(at::kFloat));
    }
  }
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
  check_options(options, param_groups_.size());
  copy_param_groups_to_base(); // groups added through the LARS since the last step, which the archive has
  base_->load(archive);
  options_ = std::move(options);
  param_groups_.clear();
  for (const auto& group : base_->param_groups()) {
    param_groups_.emplace_back(group);
  }
  trust_ratios_.clear();
}

} // namespace lars
