#include <lars/lamb.h>

#include <lars/detail/param_groups.h>

#include <lars/functional.h>
#include <lars/fused.h>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/irange.h>
#include <torch/optim/adamw.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>

namespace lars {

LAMBOptions::LAMBOptions(double lr) : lr_(lr) {}

bool operator==(const LAMBOptions& lhs, const LAMBOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.eps() == rhs.eps() &&
      lhs.weight_decay() == rhs.weight_decay() && lhs.trust_coef() == rhs.trust_coef() &&
      lhs.trust_eps() == rhs.trust_eps() && lhs.trust_clip() == rhs.trust_clip() &&
      lhs.always_adapt() == rhs.always_adapt() && lhs.bias_correction() == rhs.bias_correction() &&
      lhs.max_grad_norm() == rhs.max_grad_norm() && lhs.maximize() == rhs.maximize() &&
      lhs.lars_exclude() == rhs.lars_exclude();
}

void LAMBOptions::serialize(torch::serialize::OutputArchive& archive) const {
  // torch::optim::AdamWOptions's fields, by its names and types: a plain AdamW reads these.
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  archive.write("amsgrad", c10::IValue(false));
  // LAMB's own, which a plain AdamW skips.
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(trust_coef);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(trust_eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(trust_clip);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(always_adapt);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(bias_correction);
  if (max_grad_norm()) {
    archive.write("max_grad_norm", c10::IValue(*max_grad_norm()));
  }
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lars_exclude);
}

void LAMBOptions::serialize(torch::serialize::InputArchive& archive) {
  c10::IValue value;
  if (archive.try_read("lr", value)) lr(value.toDouble());
  if (archive.try_read("betas", value)) betas(value.to<betas_t>());
  if (archive.try_read("eps", value)) eps(value.toDouble());
  if (archive.try_read("weight_decay", value)) weight_decay(value.toDouble());
  if (archive.try_read("trust_coef", value)) trust_coef(value.toDouble());
  if (archive.try_read("trust_eps", value)) trust_eps(value.toDouble());
  if (archive.try_read("trust_clip", value)) trust_clip(value.toBool());
  if (archive.try_read("always_adapt", value)) always_adapt(value.toBool());
  if (archive.try_read("bias_correction", value)) bias_correction(value.toBool());
  max_grad_norm(archive.try_read("max_grad_norm", value) ? std::optional<double>(value.toDouble()) : std::nullopt);
  if (archive.try_read("maximize", value)) maximize(value.toBool());
  if (archive.try_read("lars_exclude", value)) lars_exclude(value.toBool());
}

double LAMBOptions::get_lr() const {
  return lr();
}

void LAMBOptions::set_lr(const double lr) {
  this->lr(lr);
}

namespace {

using torch::optim::AdamWParamState;
using torch::optim::OptimizerParamGroup;

// Refuses what timm's Lamb and torch's AdamW refuse, naming the option and where it was set.
void check_options(const LAMBOptions& options, const std::string& where) {
  const std::string who = "lars::LAMB (" + where + ")";
  const auto [beta1, beta2] = options.betas();
  // Written so that NaN is refused too.
  TORCH_CHECK_VALUE(options.lr() >= 0, who, ": lr must be non-negative, got ", options.lr());
  TORCH_CHECK_VALUE(
      beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, who, ": betas must be in [0, 1), got (", beta1, ", ", beta2,
      ")");
  TORCH_CHECK_VALUE(options.eps() >= 0, who, ": eps must be non-negative, got ", options.eps());
  TORCH_CHECK_VALUE(
      options.weight_decay() >= 0, who, ": weight_decay must be non-negative, got ", options.weight_decay());
  TORCH_CHECK_VALUE(options.trust_coef() >= 0, who, ": trust_coef must be non-negative, got ", options.trust_coef());
  TORCH_CHECK_VALUE(options.trust_eps() >= 0, who, ": trust_eps must be non-negative, got ", options.trust_eps());
  TORCH_CHECK_VALUE(
      !options.max_grad_norm() || *options.max_grad_norm() > 0, who, ": max_grad_norm must be positive (or unset), got ",
      options.max_grad_norm().value_or(0));
}

std::string group_name(size_t index) {
  return "param group " + std::to_string(index);
}

const LAMBOptions& options_of(const OptimizerParamGroup& group, size_t index) {
  return detail::options_of<LAMBOptions>(group, index, "lars::LAMB", "lars::LAMBOptions");
}

// The divisor of every gradient under max_grad_norm: max(|all gradients| / max_grad_norm, 1),
// a 0-dim fp64 tensor on the device of the first gradient (timm's rule; no host sync).
at::Tensor grad_clip_divisor(const std::vector<at::Tensor>& grads, double max_grad_norm) {
  std::vector<at::Tensor> norms;
  for (const at::Tensor& grad : grads) {
    norms.push_back(at::linalg_vector_norm(grad, 2, std::nullopt, false, at::kDouble).to(grads[0].device()));
  }
  return at::clamp_min(at::linalg_vector_norm(at::stack(norms), 2) / max_grad_norm, 1.0);
}

// The fused operator's maths (fused.h's lamb_) in ATen ops, one parameter at a time, in fp32
// for half types: for the parameters the operator cannot step (e.g. CUDA ones). Returns r.
at::Tensor lamb_step_aten(
    const at::Tensor& param,
    const at::Tensor& grad,
    const at::Tensor& exp_avg,
    const at::Tensor& exp_avg_sq,
    double step,
    const LAMBOptions& options,
    bool adapt,
    const at::Tensor& grad_divisor) {
  const auto [beta1, beta2] = options.betas();
  const auto opmath = at::toOpMathType(param.scalar_type());
  at::Tensor g = grad.to(opmath);
  if (grad_divisor.defined()) {
    g = g / grad_divisor.to(g.device());
  }
  if (options.maximize()) {
    g = g.neg();
  }
  const at::Tensor m = exp_avg.to(opmath).mul(beta1).add_(g, 1 - beta1);
  const at::Tensor v = exp_avg_sq.to(opmath).mul(beta2).addcmul_(g, g, 1 - beta2);
  exp_avg.copy_(m);
  exp_avg_sq.copy_(v);
  const double bias_correction1 = options.bias_correction() ? 1 - std::pow(beta1, step) : 1.0;
  const double bias_correction2 = options.bias_correction() ? 1 - std::pow(beta2, step) : 1.0;
  const at::Tensor w = param.to(opmath);
  at::Tensor u = (exp_avg.to(opmath) / bias_correction1) /
      (exp_avg_sq.to(opmath).sqrt() / std::sqrt(bias_correction2) + options.eps());
  if (options.weight_decay() != 0) {
    u = u + options.weight_decay() * w;
  }
  const at::Tensor lr = at::scalar_tensor(options.lr(), at::TensorOptions(param.device()).dtype(at::kDouble));
  at::Tensor ratio = at::ones({}, at::TensorOptions(param.device()).dtype(opmath));
  if (adapt) {
    ratio = trust_ratio(
        at::linalg_vector_norm(w), at::linalg_vector_norm(u), 0.0, lr, options.trust_eps(), options.trust_coef(), false,
        TrustRatio::kUpdate);
    ratio = options.trust_clip() ? at::clamp_max(ratio, 1.0) : ratio;
  }
  param.copy_(w - u * (ratio * options.lr()));
  return ratio;
}

} // namespace

LAMB::LAMB(const std::vector<OptimizerParamGroup>& param_groups, LAMBOptions defaults)
    : Optimizer(std::vector<OptimizerParamGroup>{}, std::make_unique<LAMBOptions>(defaults)) {
  check_options(defaults, "the defaults");
  for (const auto& group : param_groups) {
    add_param_group(group);
  }
}

void LAMB::add_param_group(const OptimizerParamGroup& param_group) {
  const size_t index = param_groups_.size();
  if (param_group.has_options()) {
    check_options(options_of(param_group, index), group_name(index));
  }
  detail::add_param_group_with_options(*this, param_group);
}

torch::Tensor LAMB::step(LossClosure closure) {
  torch::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  // Every refusal comes before the first parameter is written.
  const auto& defaults = static_cast<const LAMBOptions&>(*defaults_);
  check_options(defaults, "the defaults");
  std::vector<const LAMBOptions*> options(param_groups_.size());
  std::vector<std::vector<at::Tensor>> params(param_groups_.size());
  std::vector<at::Tensor> all_grads;
  for (const auto i : c10::irange(param_groups_.size())) {
    options[i] = &options_of(param_groups_[i], i);
    check_options(*options[i], group_name(i));
    const auto& group_params = param_groups_[i].params();
    for (const auto j : c10::irange(group_params.size())) {
      const at::Tensor& param = group_params[j];
      const at::Tensor& grad = param.grad();
      if (!grad.defined()) {
        continue;
      }
      TORCH_CHECK_VALUE(
          !grad.is_sparse(), "lars::LAMB does not support sparse gradients: parameter ", j, " of param group ", i,
          " has one; use a dense gradient.");
      TORCH_CHECK_VALUE(
          grad.sizes() == param.sizes() && grad.scalar_type() == param.scalar_type() && grad.device() == param.device(),
          "lars::LAMB: the gradient of parameter ", j, " of param group ", i, " (", grad.scalar_type(), grad.sizes(),
          " on ", grad.device(), ") does not match the parameter (", param.scalar_type(), param.sizes(), " on ",
          param.device(), ")");
      params[i].push_back(param);
      all_grads.push_back(grad);
    }
  }
  trust_ratios_.clear();
  at::NoGradGuard no_grad;
  const at::Tensor grad_divisor = defaults.max_grad_norm() && !all_grads.empty()
      ? grad_clip_divisor(all_grads, *defaults.max_grad_norm())
      : at::Tensor();
  for (const auto i : c10::irange(param_groups_.size())) {
    const LAMBOptions& group = *options[i];
    const bool adapt = !group.lars_exclude() && (group.weight_decay() != 0 || group.always_adapt());
    // The fused operator's calls, one per dtype, with their state; the others step one by one.
    struct Call {
      std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    };
    std::vector<std::pair<c10::ScalarType, Call>> calls;
    for (const at::Tensor& param : params[i]) {
      auto& param_state = state_[param.unsafeGetTensorImpl()];
      if (!param_state) {
        auto adamw_state = std::make_unique<AdamWParamState>();
        adamw_state->exp_avg(at::zeros_like(param, at::MemoryFormat::Preserve));
        adamw_state->exp_avg_sq(at::zeros_like(param, at::MemoryFormat::Preserve));
        param_state = std::move(adamw_state);
      }
      auto& state = static_cast<AdamWParamState&>(*param_state);
      state.step(state.step() + 1);
      if (!detail::fused_step_supports({param})) {
        const at::Tensor ratio = lamb_step_aten(
            param, param.grad(), state.exp_avg(), state.exp_avg_sq(), static_cast<double>(state.step()), group, adapt,
            grad_divisor);
        if (adapt) {
          trust_ratios_.add({param}, ratio.to(at::kFloat).reshape({1}));
        }
        continue;
      }
      auto call = std::find_if(calls.begin(), calls.end(), [&](const auto& c) { return c.first == param.scalar_type(); });
      if (call == calls.end()) {
        call = calls.insert(calls.end(), {param.scalar_type(), Call{}});
      }
      call->second.params.push_back(param);
      call->second.grads.push_back(param.grad());
      call->second.exp_avgs.push_back(state.exp_avg());
      call->second.exp_avg_sqs.push_back(state.exp_avg_sq());
      call->second.steps.push_back(at::scalar_tensor(static_cast<double>(state.step()), at::kFloat));
    }
    for (auto& [dtype, call] : calls) {
      const at::Tensor ratios = lamb_(
          call.params, call.grads, call.exp_avgs, call.exp_avg_sqs, call.steps, group, adapt,
          grad_divisor.defined() ? std::optional<at::Tensor>(grad_divisor.cpu()) : std::nullopt);
      if (adapt) {
        trust_ratios_.add(std::move(call.params), ratios.to(at::kFloat));
      }
    }
  }
  return loss;
}

void LAMB::save(torch::serialize::OutputArchive& archive) const {
  for (const auto i : c10::irange(param_groups_.size())) {
    options_of(param_groups_[i], i);
  }
  // torch::optim::AdamW's own layout: its state type, and options that write AdamW's fields.
  torch::optim::serialize<AdamWParamState, LAMBOptions>(archive, *this);
}

void LAMB::load(torch::serialize::InputArchive& archive) {
  for (const auto i : c10::irange(param_groups_.size())) {
    options_of(param_groups_[i], i);
  }
  torch::optim::serialize<AdamWParamState, LAMBOptions>(archive, *this);
  trust_ratios_.clear();
}

} // namespace lars
