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

// Whether LARS and the base step as one fused operator (lars/fused.h): around
// torch::optim::SGD itself (a subclass may step otherwise), for CPU parameters. CUDA tensors
// keep the foreach path: the operator has a CPU kernel only.
bool steps_fused(const Optimizer& base, const std::vector<std::vector<at::Tensor>>& params) {
  if (typeid(base) != typeid(torch::optim::SGD)) {
    return false;
  }
  for (const auto& group : params) {
    for (const auto& param : group) {
      if (!param.device().is_cpu() || !at::isFloatingType(param.scalar_type())) {
        return false;
      }
    }
  }
  return true;
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
  // Every refusal comes before the first gradient is touched: a weight decay LARS cannot
  // take over, and param groups added to the base behind the LARS's back.
  std::vector<double> weight_decays;
  weight_decays.reserve(adapted.size());
  for (const size_t index : adapted) {
    weight_decays.push_back(weight_decay_of(param_groups_[index].options()));
  }
  copy_param_groups_to_base();
  if (steps_fused(*base_, params)) {
    // Forgets the parameters that no longer exist.
    for (auto carried = carried_norms_.begin(); carried != carried_norms_.end();) {
      carried = carried->second.param.expired() ? carried_norms_.erase(carried) : std::next(carried);
    }
    {
      at::NoGradGuard no_grad;
      for (const auto k : c10::irange(adapted.size())) {
        fused_sgd_step(adapted[k], params[k], grads[k]);
      }
    }
    if (adapted.size() < param_groups_.size()) {
      GradientsHidden adapted_grads_hidden(params); // the base steps the excluded groups only
      base_->step();
    }
    return loss;
  }
  carried_norms_.clear(); // the parameters are written by other means from here on
  {
    at::NoGradGuard no_grad;
    for (const auto k : c10::irange(adapted.size())) {
      auto& group_options = param_groups_[adapted[k]].options();
      lars_scale_gradients_(
          params[k],
          grads[k],
          weight_decays[k],
          at::scalar_tensor(group_options.get_lr(), at::kDouble),
          options_.eps(),
          options_.trust_coef(),
          options_.clip());
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

void LARS::fused_sgd_step(
    size_t group_index, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
  const auto& options = static_cast<const torch::optim::SGDOptions&>(param_groups_[group_index].options());
  // One operator call per dtype, and per first step: parameters without a momentum buffer
  // yet get one, set by the step as torch::optim::SGD's first step sets it.
  struct Call {
    c10::ScalarType dtype;
    bool is_first_step;
    std::vector<at::Tensor> params, grads, momentum_buffers;
  };
  std::vector<Call> calls;
  auto& state = base_->state();
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
  const at::Tensor lr = at::scalar_tensor(options.lr(), at::kDouble);
  for (const auto& call : calls) {
    // The carried norms if every one is still true, else all of them recomputed by the step
    // itself, from the parameters it reads anyway.
    at::Tensor norms = carried_param_norms(call.params);
    const bool recompute = !norms.defined();
    if (recompute) {
      norms = at::empty({static_cast<int64_t>(call.params.size())}, at::kFloat);
    }
    lars_sgd_(
        call.params, call.grads, call.momentum_buffers, norms, lr, options.weight_decay(), options.momentum(),
        options.dampening(), options.nesterov(), /*maximize=*/false, call.is_first_step, options_.eps(),
        options_.trust_coef(), options_.clip(), std::nullopt, std::nullopt, recompute);
    const auto carried = norms.accessor<float, 1>();
    for (const auto j : c10::irange(call.params.size())) {
      const at::Tensor& param = call.params[j];
      const auto known = carried_norms_.find(param.unsafeGetTensorImpl());
      if (known == carried_norms_.end()) {
        carried_norms_.emplace(
            param.unsafeGetTensorImpl(),
            CarriedNorm{
                c10::weak_intrusive_ptr<c10::TensorImpl>(param.getIntrusivePtr()), param.const_data_ptr(),
                param._version(), carried[j]});
      } else { // the same tensor: its weak reference keeps the address from being reused
        known->second.data = param.const_data_ptr();
        known->second.version = param._version();
        known->second.norm = carried[j];
      }
    }
  }
}

at::Tensor LARS::carried_param_norms(const std::vector<at::Tensor>& params) const {
  at::Tensor norms = at::empty({static_cast<int64_t>(params.size())}, at::kFloat);
  auto out = norms.accessor<float, 1>();
  for (const auto j : c10::irange(params.size())) {
    const auto carried = carried_norms_.find(params[j].unsafeGetTensorImpl());
    if (carried == carried_norms_.end() || carried->second.data != params[j].const_data_ptr() ||
        carried->second.version != params[j]._version()) {
      return {};
    }
    out[j] = carried->second.norm;
  }
  return norms;
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
  copy_param_groups_to_base(); // groups added through the LARS since the last step, which the archive has
  base_->load(archive);
  options_ = std::move(options);
  param_groups_.clear();
  for (const auto& group : base_->param_groups()) {
    param_groups_.emplace_back(group);
  }
  carried_norms_.clear(); // the norms of the loaded parameters are recomputed, to the same bits
}

} // namespace lars
